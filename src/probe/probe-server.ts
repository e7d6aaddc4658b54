// --probe-address: /healthz (process and event loop alive), /readyz, /metrics,
// and /explain for `nmi explain`, which answers loopback callers only, whatever
// the address (a probe address opened for scraping must not tell the network
// about pods), and of those only root's: which pods exist, their identities and
// why they were refused is not for every local user. The kernel names the
// connecting socket's owner (sock_diag, as for /host/token on TCP). Bound to
// loopback by default; it serves no token and no secret.
import http from 'node:http';
import { once } from 'node:events';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import type { Registry } from 'prom-client';
import { peerSocketOwner } from '../attest/host-callers.js';
import { peerEnds, type ConnectionEnds } from '../attest/peers.js';
import type { HostPort } from '../config/values.js';
import { messageOf } from '../errors/errors.js';
import { plainAddress } from '../kubelet/pod-index.js';
import type { SocketOwner } from '../native/addon.js';
import { isRootOrSelf } from '../util/trusted-uid.js';
import type { Readiness } from './readiness.js';

export const PID_HEADER = 'X-Nmi-Pid';

/** Where a probe address is asked (nmi status, a second nmi finding the first). */
export function probeUrl(address: HostPort, path: string): string {
  return `http://${address.host.includes(':') ? `[${address.host}]` : address.host}:${address.port}${path}`;
}

/** What the daemon adds once it has pods and bindings; until then /explain answers 503. */
export interface ProbeDebug {
  explain?: (target: string) => Promise<{ status: number; body: object }>;
}

/** 127.0.0.0/8 and ::1, also as an IPv4-mapped address on a dual-stack socket. */
function isLoopback(address: string | undefined): boolean {
  if (!address) return false;
  const plain = plainAddress(address);
  return plain.startsWith('127.') || plain === '::1';
}

/**
 * Why a loopback connection may not ask /explain, or undefined when it may: its socket must be root's, or nmi's own
 * uid's (nmi run as a user, in tests). `owner` is the kernel's lookup, replaceable only to test the rule.
 */
export function explainRefusal(socket: ConnectionEnds, owner = peerSocketOwner, ownUid = process.geteuid?.() ?? 0): string | undefined {
  const ends = peerEnds(socket);
  let found: SocketOwner | null;
  try {
    found = ends && owner(ends);
  } catch (err) {
    return `explain answers root only, and the kernel could not name the caller (${messageOf(err)})`;
  }
  if (!found) return 'explain answers root only, and the kernel could not name the caller';
  if (isRootOrSelf(found.uid, ownUid)) return undefined;
  return `explain answers root only, and this connection is uid ${found.uid}'s: run nmi explain as root`;
}

/** An event loop stalled longer than this fails liveness. */
const MAX_LOOP_DELAY_MS = 5_000;

/** `fd`: a listener held for the process (src/lifecycle/listeners.ts), which the server owns; else it binds `address`. */
export async function startProbeServer(address: HostPort, readiness: Readiness, registry: Registry, fd?: number, debug: ProbeDebug = {}): Promise<http.Server> {
  // The late timer records the whole stall on the loop's first turn after it, whatever its
  // period: 250 ms wakes an idle daemon 4 times a second where 50 ms woke it 20 times.
  const delay = monitorEventLoopDelay({ resolution: 250 });
  delay.enable();
  const server = http.createServer((req, res) => {
    const [path, query = ''] = (req.url ?? '').split('?');
    const send = (status: number, body: string, type = 'text/plain; charset=utf-8') => {
      // The pid says which nmi answered: another one started beside this one names it (daemon.ts).
      res.writeHead(status, { 'Content-Type': type, 'Content-Length': Buffer.byteLength(body), [PID_HEADER]: process.pid });
      res.end(body);
    };
    if (req.method !== 'GET' && req.method !== 'HEAD') return send(405, 'method not allowed\n');
    if (path === '/healthz') {
      const maxMs = delay.max / 1e6;
      delay.reset();
      return maxMs > MAX_LOOP_DELAY_MS ? send(503, `event loop stalled ${Math.round(maxMs)}ms\n`) : send(200, 'ok\n');
    }
    if (path === '/readyz') {
      const pending = readiness.pending();
      return pending.length === 0 ? send(200, 'ok\n') : send(503, `not ready: ${pending.join(', ')}\n`);
    }
    if (path === '/metrics') {
      registry.metrics().then(
        (text) => send(200, text, registry.contentType),
        (err: Error) => send(500, `${err.message}\n`),
      );
      return;
    }
    if (path === '/explain') {
      const json = (status: number, body: object) => send(status, `${JSON.stringify(body)}\n`, 'application/json; charset=utf-8');
      if (!isLoopback(req.socket.remoteAddress) || !isLoopback(req.socket.localAddress)) return json(403, { error: 'explain answers on loopback only' });
      const refusal = explainRefusal(req.socket);
      if (refusal) return json(403, { error: refusal, reason: 'not-root' });
      const target = new URLSearchParams(query).get('pod');
      if (!target) return json(400, { error: 'name the pod: /explain?pod=<namespace>/<pod> or its address' });
      if (!debug.explain) return json(503, { error: 'nmi is starting: no pods and bindings yet' });
      debug.explain(target).then(
        ({ status, body }) => json(status, body),
        (err: Error) => json(500, { error: err.message }),
      );
      return;
    }
    send(404, 'not found\n');
  });
  server.on('close', () => delay.disable());
  if (fd === undefined) server.listen(address.port, address.host);
  else server.listen({ fd });
  await once(server, 'listening');
  return server;
}
