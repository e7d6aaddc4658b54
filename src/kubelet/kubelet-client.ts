// Reads this node's pods from the kubelet API (`GET <kubelet-url>/pods`) over
// mTLS and/or a bearer token. Credential files are re-read on every call, so
// rotated certificates and tokens are picked up without a restart.
import { readFile } from 'node:fs/promises';
import { Agent, request } from '../net/undici.js';
import { codes, NmiError } from '../errors/errors.js';
import { verifyServerName } from '../net/server-name.js';
import { TlsAgent } from '../net/tls-agent.js';
import type { Pod } from './pod.js';

export interface KubeletClientOptions {
  /** --kubelet-url; `/pods` is read below its path. */
  url: URL;
  /** Paths of the CA bundle, client certificate and client key (PEM). */
  ca?: string;
  clientCert?: string;
  clientKey?: string;
  /** Path of a bearer token file, re-read on every call. */
  tokenFile?: string;
  /** Name to verify in the serving certificate instead of the URL's host (the kubelet's cert is often CN-only). */
  serverName?: string;
  /** Applies to connecting, to the headers, and to the whole exchange. */
  timeoutMs?: number;
  maxBodyBytes?: number;
}

const defaults = {
  timeoutMs: 5_000, // 5 seconds: a token request may be waiting on this call
  maxBodyBytes: 64 * 1024 * 1024, // 64 MiB: 250 pods of very large specs fit with room to spare
};

type TlsMaterial = {
  ca?: string;
  cert?: string;
  key?: string;
};

export class KubeletClient {
  private readonly podsUrl: URL;
  private readonly timeoutMs: number;
  private readonly agent: TlsAgent;

  constructor(private readonly options: KubeletClientOptions) {
    const { url, clientCert, clientKey, timeoutMs = defaults.timeoutMs, maxBodyBytes = defaults.maxBodyBytes } = options;
    if (Boolean(clientCert) !== Boolean(clientKey)) {
      throw new NmiError(codes.KUBELET, '--kubelet-client-cert and --kubelet-client-key must be given together');
    }
    for (const [name, value] of Object.entries({ timeoutMs, maxBodyBytes })) {
      if (!Number.isInteger(value) || value <= 0) throw new NmiError(codes.KUBELET, `kubelet client ${name} must be a positive integer, got ${value}`);
    }
    this.podsUrl = new URL(`${url.pathname.replace(/\/*$/, '')}/pods`, url);
    this.timeoutMs = timeoutMs;
    this.agent = new TlsAgent(
      (tls) =>
        new Agent({
          connect: { ...tls, ...(options.serverName ? verifyServerName(options.serverName) : {}), timeout: timeoutMs },
          headersTimeout: timeoutMs,
          bodyTimeout: timeoutMs,
          maxResponseSize: maxBodyBytes,
        }),
    );
  }

  /** Every pod the kubelet runs, parsed; throws NmiError(KUBELET) on any failure. */
  async fetchPods(): Promise<Pod[]> {
    const headers: Record<string, string> = { accept: 'application/json' };
    const token = await this.readToken();
    if (token) headers.authorization = `Bearer ${token}`;
    const dispatcher = await this.currentAgent();

    let status: number;
    let body: unknown;
    try {
      const res = await request(this.podsUrl, { method: 'GET', headers, dispatcher, signal: AbortSignal.timeout(this.timeoutMs) });
      status = res.statusCode;
      if (status !== 200) {
        await res.body.dump();
      } else {
        body = await res.body.json();
      }
    } catch (err) {
      throw new NmiError(codes.KUBELET, `kubelet GET ${this.podsUrl.pathname} failed: ${describe(err)}`, { cause: err });
    }
    if (status !== 200) {
      const hint = status === 403 ? ' (nmi needs get on nodes/pods, or on nodes/proxy from kubelets before Kubernetes 1.33: deploy/grants/kubelet-proxy)' : '';
      throw new NmiError(codes.KUBELET, `kubelet GET ${this.podsUrl.pathname} answered ${status}${hint}`);
    }
    return parsePodList(body);
  }

  async close(): Promise<void> {
    await this.agent.close();
  }

  private async readToken(): Promise<string | undefined> {
    const { tokenFile } = this.options;
    if (!tokenFile) return undefined;
    const token = (await readCredential(tokenFile, '--kubelet-token-file')).trim();
    if (!token) throw new NmiError(codes.KUBELET, `--kubelet-token-file ${tokenFile} is empty`);
    return token;
  }

  /** The agent for the current TLS files, rebuilt (and the old one closed) when they change. */
  private async currentAgent(): Promise<Agent> {
    const { ca, clientCert, clientKey } = this.options;
    const material: TlsMaterial = {};
    if (ca) material.ca = await readCredential(ca, '--kubelet-ca');
    if (clientCert && clientKey) {
      material.cert = await readCredential(clientCert, '--kubelet-client-cert');
      material.key = await readCredential(clientKey, '--kubelet-client-key');
    }
    return this.agent.for(material);
  }
}

async function readCredential(file: string, flag: string): Promise<string> {
  try {
    return await readFile(file, 'utf8');
  } catch (err) {
    throw new NmiError(codes.KUBELET, `cannot read ${flag} ${file}: ${(err as NodeJS.ErrnoException).code ?? 'error'}`, { cause: err });
  }
}

/** The error's code and message: undici and TLS errors name the failure, never a header value. */
function describe(err: unknown): string {
  const e = err as { code?: string; name?: string; message?: string; cause?: { code?: string; message?: string } };
  if (e.name === 'TimeoutError') return 'timed out';
  const parts = [e.code, e.message, e.cause?.code, e.cause?.message].filter((p): p is string => Boolean(p));
  return [...new Set(parts)].join(': ') || String(err);
}

// ---- PodList parsing: the kubelet's JSON, tolerant of missing or null fields.

type Json = Record<string, unknown>;

function obj(v: unknown): Json {
  return v !== null && typeof v === 'object' && !Array.isArray(v) ? (v as Json) : {};
}

function str(v: unknown): string {
  return typeof v === 'string' ? v : '';
}

function labelsOf(v: unknown): Record<string, string> {
  const labels: Record<string, string> = {};
  for (const [k, val] of Object.entries(obj(v))) if (typeof val === 'string') labels[k] = val;
  return labels;
}

function ipsOf(status: Json): string[] {
  const listed = Array.isArray(status.podIPs) ? status.podIPs.map((e) => str(obj(e).ip)) : [];
  const ips = listed.filter(Boolean);
  // Older kubelets only set podIP.
  if (ips.length === 0 && str(status.podIP)) ips.push(str(status.podIP));
  return [...new Set(ips)];
}

export function parsePod(item: unknown): Pod {
  const o = obj(item);
  const metadata = obj(o.metadata);
  const spec = obj(o.spec);
  const status = obj(o.status);
  return {
    uid: str(metadata.uid),
    namespace: str(metadata.namespace),
    name: str(metadata.name),
    labels: labelsOf(metadata.labels),
    ips: ipsOf(status),
    hostNetwork: spec.hostNetwork === true,
    phase: str(status.phase),
    nodeName: str(spec.nodeName),
    ...(str(spec.serviceAccountName) && { serviceAccount: str(spec.serviceAccountName) }),
    ...(str(metadata.creationTimestamp) && { createdAt: str(metadata.creationTimestamp) }),
    ...(str(metadata.deletionTimestamp) && { deletingSince: str(metadata.deletionTimestamp) }),
  };
}

/** `v1.PodList` JSON → Pod[]. A body that is not an object is an error; `items: null` is an empty node. */
export function parsePodList(body: unknown): Pod[] {
  if (body === null || typeof body !== 'object' || Array.isArray(body)) {
    throw new NmiError(codes.KUBELET, 'kubelet /pods did not answer a PodList object');
  }
  const items = (body as Json).items;
  if (items === undefined || items === null) return [];
  if (!Array.isArray(items)) throw new NmiError(codes.KUBELET, 'kubelet /pods answered a PodList whose items is not a list');
  return items.filter((i) => i !== null && typeof i === 'object').map(parsePod);
}
