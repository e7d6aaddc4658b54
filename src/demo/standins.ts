// The demo's stand-ins for what a real node has: a kubelet listing one pod, and
// IMDS issuing tokens. Plain HTTP on the demo node's loopback; the tests use
// fuller ones (mTLS, failures) under test/standins/.
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import http from 'node:http';
import type { AddressInfo } from 'node:net';

export interface Standin {
  url: string;
  /** Requests answered so far. */
  calls: number;
  close(): void;
}

async function serve(handler: (req: http.IncomingMessage, res: http.ServerResponse) => void): Promise<Standin> {
  const server = http.createServer((req, res) => {
    standin.calls += 1;
    handler(req, res);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const standin: Standin = {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    calls: 0,
    close: () => {
      server.close();
      server.closeAllConnections();
    },
  };
  return standin;
}

export function json(res: http.ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json; charset=utf-8', 'Content-Length': Buffer.byteLength(text) });
  res.end(text);
}

export interface DemoPod {
  name: string;
  namespace: string;
  ip: string;
  labels: Record<string, string>;
  /** metadata.uid; `demo-<name>` when not given (the eBPF bench needs a real UUID: it names the pod's cgroup). */
  uid?: string;
  /** spec.serviceAccountName [default] */
  serviceAccount?: string;
}

export const podUid = (p: DemoPod): string => p.uid ?? `demo-${p.name}`;

/** GET /pods as a v1 PodList. */
export function startKubelet(pods: DemoPod[]): Promise<Standin> {
  return serve((req, res) => {
    if (req.url !== '/pods') return json(res, 404, { kind: 'Status', status: 'Failure', code: 404 });
    json(res, 200, {
      kind: 'PodList',
      apiVersion: 'v1',
      items: pods.map((p) => ({
        metadata: { name: p.name, namespace: p.namespace, uid: podUid(p), labels: p.labels },
        spec: { nodeName: 'demo-node', serviceAccountName: p.serviceAccount ?? 'default' },
        status: { phase: 'Running', podIP: p.ip, podIPs: [{ ip: p.ip }] },
      })),
    });
  });
}

/**
 * GET /metadata/identity/oauth2/token/ as IMDS answers it, with a token that says
 * it is a demo, padded to tokenBytes (the bench uses real sizes, 1.5-2.5 KB).
 */
export function startImds(tokenBytes = 0): Promise<Standin> {
  return serve((req, res) => {
    const url = new URL(req.url ?? '/', 'http://imds');
    if (!url.pathname.startsWith('/metadata/identity/oauth2/token') || req.headers.metadata !== 'true') {
      return json(res, 400, { error: 'invalid_request', error_description: 'Required metadata header not specified' });
    }
    const now = Math.floor(Date.now() / 1000);
    const [aud, appid] = [url.searchParams.get('resource'), url.searchParams.get('client_id')];
    // uti and oid as Entra ID's tokens carry them (the audit records them), derived from what was asked: every nmi
    // asking gets the same token (times aside), so a demo's uti names a (client, resource), not each token.
    const digest = (text: string) => createHash('sha256').update(text).digest();
    const uti = digest(`${appid}\n${aud}`).subarray(0, 16).toString('base64url');
    const oid = digest(`oid:${appid}`).toString('hex').replace(/^(.{8})(.{4})(.{4})(.{4})(.{12}).*$/, '$1-$2-$3-$4-$5');
    const payload = Buffer.from(JSON.stringify({ aud, appid, uti, oid, demo: true })).toString('base64url');
    json(res, 200, {
      access_token: `eyJhbGciOiJub25lIn0.${payload}.demo-signature`.padEnd(tokenBytes, 'x'),
      client_id: url.searchParams.get('client_id') ?? '',
      expires_in: '86399',
      expires_on: String(now + 86399),
      ext_expires_in: '86399',
      not_before: String(now),
      resource: url.searchParams.get('resource') ?? '',
      token_type: 'Bearer',
    });
  });
}
