// A stand-in kubelet: HTTPS on 127.0.0.1, `GET /pods` answers a v1 PodList built
// from a mutable list. Like a real kubelet with anonymous auth off, it requires
// a client certificate signed by the test CA, or, when `token` is set, accepts
// `Authorization: Bearer <token>` instead.
//
//   const pki = createPki();
//   const kubelet = await startKubelet({ pki, pods: [makePodJson({ name: 'a', ip: '10.0.0.5' })] });
//   // nmi flags: --kubelet-url kubelet.url --kubelet-ca kubelet.caFile
//   //   --kubelet-client-cert kubelet.client.cert --kubelet-client-key kubelet.client.key
//   kubelet.pods.push(makePodJson({ name: 'b', ip: '10.0.0.6' }));  // seen on the next call
//   kubelet.failWith(500) / failWith('hang') / failWith('close') / failWith(null)
//   await kubelet.stop(); await kubelet.start();                     // down and back, same port
//   kubelet.calls                                                    // /pods requests seen
//   await kubelet.close();
import { randomUUID } from 'node:crypto';
import { once } from 'node:events';
import type http from 'node:http';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import type { TLSSocket } from 'node:tls';
import type { CertFiles, Pki } from './pki.js';

export interface PodJsonOptions {
  name: string;
  namespace?: string;
  uid?: string;
  /** status.podIP; also the first status.podIPs entry unless `ips` is given. */
  ip?: string;
  /** status.podIPs, in order (dual-stack: an IPv4 and an IPv6 address). */
  ips?: string[];
  labels?: Record<string, string>;
  hostNetwork?: boolean;
  /** Pending, Running, Succeeded, Failed, Unknown. Default Running. */
  phase?: string;
  nodeName?: string;
  /** spec.serviceAccountName; the API server's admission sets `default` when a pod names none. */
  serviceAccount?: string;
  /** metadata.deletionTimestamp: the pod is being deleted (still listed, and running, for its grace period). */
  deletionTimestamp?: string;
}

/** A pod in the kubelet's JSON shape (fields as the kubelet writes them, `omitempty` honoured). */
export function makePodJson(o: PodJsonOptions): Record<string, unknown> {
  const ips = o.ips ?? (o.ip ? [o.ip] : []);
  const podIP = o.ip ?? ips[0];
  return {
    metadata: {
      name: o.name,
      namespace: o.namespace ?? 'default',
      uid: o.uid ?? randomUUID(),
      resourceVersion: '1',
      creationTimestamp: '2024-01-01T00:00:00Z',
      ...(o.deletionTimestamp ? { deletionTimestamp: o.deletionTimestamp, deletionGracePeriodSeconds: 30 } : {}),
      ...(o.labels ? { labels: o.labels } : {}),
      annotations: { 'kubernetes.io/config.source': 'api' },
    },
    spec: {
      containers: [{ name: 'app', image: 'registry.k8s.io/pause:3.9', resources: {} }],
      restartPolicy: 'Always',
      serviceAccountName: o.serviceAccount ?? 'default',
      nodeName: o.nodeName ?? 'node1',
      ...(o.hostNetwork ? { hostNetwork: true } : {}),
    },
    status: {
      phase: o.phase ?? 'Running',
      hostIP: '10.240.0.4',
      ...(podIP ? { podIP } : {}),
      ...(ips.length > 0 ? { podIPs: ips.map((ip) => ({ ip })) } : {}),
    },
  };
}

export interface KubeletOptions {
  pki: Pki;
  pods?: object[];
  /** Subject alternative names of the serving certificate. Default ['127.0.0.1']; [] makes it CN-only, like a kubelet's self-signed cert. */
  serverNames?: string[];
  /** CN of the serving certificate. Default `node1@1700000000`, the kubelet's `<hostname>@<timestamp>` form. */
  serverCn?: string;
  /** When set, a bearer token is accepted and a client certificate becomes optional. */
  token?: string;
}

export type FailMode = number | 'hang' | 'close' | null;

export interface Kubelet {
  /** https://127.0.0.1:<port> */
  url: URL;
  /** The serving certificate's CN: pass as serverName / --kubelet-server-name when it is CN-only. */
  serverName: string;
  /** The CA that signed the serving and client certificates. */
  caFile: string;
  /** A client certificate the stand-in accepts. */
  client: CertFiles;
  /** Served as `items` on each call; push, splice or replace freely. */
  pods: object[];
  /** The accepted bearer token (when token auth is on); change it to simulate rotation. */
  token: string | undefined;
  /** `/pods` requests received, failed ones included. */
  readonly calls: number;
  /** Answer every `/pods` with this status, hold it unanswered ('hang'), or drop the connection ('close'); null: serve normally. */
  failWith(mode: FailMode): void;
  /** Stop listening (the kubelet is down); start() listens again on the same port. */
  stop(): Promise<void>;
  start(): Promise<void>;
  close(): Promise<void>;
}

export async function startKubelet(options: KubeletOptions): Promise<Kubelet> {
  const { pki, serverNames = ['127.0.0.1'], serverCn = 'node1@1700000000' } = options;
  const serving = pki.server(serverCn, serverNames);
  const client = pki.client('nmi-kubelet-client', 'system:masters');
  let fail: FailMode = null;
  let calls = 0;
  let port = 0;
  const hanging = new Set<http.ServerResponse>();

  const state: Kubelet = {
    url: new URL('https://127.0.0.1'),
    serverName: serverCn,
    caFile: pki.caFile,
    client,
    pods: options.pods ?? [],
    token: options.token,
    get calls() {
      return calls;
    },
    failWith(mode) {
      fail = mode;
    },
    stop,
    start,
    close: stop,
  };

  const tokenMode = options.token !== undefined;
  const server = https.createServer(
    {
      cert: serving.certPem,
      key: serving.keyPem,
      ca: pki.caPem,
      requestCert: true,
      // Certificate-only: the handshake itself rejects clients without a valid certificate.
      rejectUnauthorized: !tokenMode,
    },
    (req, res) => {
      const authorized = (req.socket as TLSSocket).authorized || (state.token !== undefined && req.headers.authorization === `Bearer ${state.token}`);
      if (!authorized) return send(res, 401, { kind: 'Status', apiVersion: 'v1', status: 'Failure', message: 'Unauthorized', code: 401 });
      const path = new URL(req.url ?? '/', 'https://kubelet').pathname;
      if (req.method !== 'GET' || path !== '/pods') return send(res, 404, { message: '404 page not found' });
      calls += 1;
      if (fail === 'hang') {
        hanging.add(res);
        res.on('close', () => hanging.delete(res));
        return;
      }
      if (fail === 'close') return void req.socket.destroy();
      if (typeof fail === 'number') return send(res, fail, { message: `stand-in failure ${fail}` });
      return send(res, 200, { kind: 'PodList', apiVersion: 'v1', metadata: {}, items: state.pods });
    },
  );

  async function start(): Promise<void> {
    server.listen(port, '127.0.0.1');
    await once(server, 'listening');
    port = (server.address() as AddressInfo).port;
    state.url = new URL(`https://127.0.0.1:${port}`);
  }

  async function stop(): Promise<void> {
    if (!server.listening) return;
    for (const res of hanging) res.destroy();
    const closed = once(server, 'close');
    server.close();
    server.closeAllConnections();
    await closed;
  }

  await start();
  return state;
}

function send(res: http.ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}
