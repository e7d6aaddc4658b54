// The `native` token server (--server native): the adapter between the C++
// server (native/server.h) and the request core. The C++ side owns the socket
// and answers the one hot case itself: a valid token request from a caller in
// its caller table whose token is in its token table. Everything else is
// deferred here as raw bytes (read by raw-request.ts), goes through the same
// request core as the js server (core.ts: request → caller → identity → token
// → answer), and goes back as the bytes node:http would have written for the
// js server. The C++ takes every bound and rule from here, at start.
//
// The tables it answers hits from are tables.ts's, pushed here.
import {
  addon,
  type NativeDeferError,
  type NativeIdentityRow,
  type NativeServerStats,
  type NativeTokenRow,
} from '../native/addon.js';
import { toAnswer } from '../tokens/token.js';
import { clientErrorBytes, problemAnswer, problems, serializeAnswer, statusAndHeaders, type Problem } from './answers.js';
import { createImdsProxy } from './proxy.js';
import { parseRawRequest } from './raw-request.js';
import { IDENTITY_API_VERSIONS } from './request.js';
import { packCallers, tellingServed, tokenKey, type CallerEntry, type TableFedServer, type TableToken, type TokenServedListener } from './tables.js';
import { limits, serverBounds } from '../config/limits.js';
import { answerWhole, createRequestCore, type TokenServerDeps } from './core.js';

export interface NativeTokenServer extends TableFedServer {
  /** Serves on `fd` when given (a listener kept across restarts, which the server then owns), else binds host:port. */
  listen(host: string, port: number, fd?: number): Promise<void>;
  /** Stops accepting, lets answers under way go out (at most drainMs), then closes every connection. Idempotent. */
  close(drainMs?: number): Promise<void>;
  /** The bound port, once listening. */
  readonly port: number | undefined;
  /** Counters of the native side; undefined unless listening. */
  stats(): NativeServerStats | undefined;
  /** With countHits: [token key, answers the native side gave from it] since the last call, the last ones once after close(). */
  takeHits(): [string, number][];
}

/** Requests deferred without a request, each answered and the connection closed: as node answers what llhttp refuses, or IMDS-shaped. */
const DEFER_ANSWERS: Record<Exclude<NativeDeferError, 'stopped'>, () => Buffer | string> = {
  malformed: () => clientErrorBytes('HPE_INVALID'),
  overflow: () => clientErrorBytes('HPE_HEADER_OVERFLOW'),
  timeout: () => clientErrorBytes('ERR_HTTP_REQUEST_TIMEOUT'),
  // A Transfer-Encoding body is not taken by the native server.
  body: () => clientErrorBytes('HPE_UNEXPECTED_CONTENT_LENGTH'),
  'body-not-allowed': () => serializeAnswer(problemAnswer(problems.bodyNotAllowed), false, false),
  'too-large': () => serializeAnswer(problemAnswer(problems.bodyTooLarge), false, false),
};

/** The native side keys callers "address#cgroup" when it reads the eBPF peers map (0: none recorded). */
function splitCaller(remote: string): { remoteAddress: string; cgroup?: bigint | null } {
  const hash = remote.indexOf('#');
  if (hash < 0) return { remoteAddress: remote };
  const cgroup = BigInt(remote.slice(hash + 1));
  return { remoteAddress: remote.slice(0, hash), cgroup: cgroup === 0n ? null : cgroup };
}

/**
 * peerMapFd: --rules ebpf's peers map, so the C++ side can attest connections as it accepts them; countHits:
 * --audit-log takes the native side's answers per token entry (takeHits).
 */
export function createNativeTokenServer(deps: TokenServerDeps, side: { peerMapFd?: number; countHits?: boolean } = {}): NativeTokenServer {
  const { options, log } = deps;
  const listeners: TokenServedListener[] = [];
  const core = createRequestCore(tellingServed(deps, listeners));
  const proxy = createImdsProxy({ upstream: deps.upstreamImds, timeoutMs: options.proxyTimeoutMs ?? limits.proxyTimeoutMs, budgets: deps.proxyBudgets });
  const native = addon();
  let id: number | undefined;
  let port: number | undefined;
  let closing = false;
  let stopped: Promise<void> | undefined;
  let onStopped: () => void = () => {};
  // Tables set before listen() are pushed once the native server exists.
  let earlyCallers: CallerEntry[] = [];
  // Taken as the native thread ends, while the server can still be named.
  let lastHits: [string, number][] = [];
  const earlyTokens = new Map<string, TableToken>();

  function pushCallers(serverId: number, callers: CallerEntry[]): void {
    // Lowercased here with toLowerCase, as selectIdentity compares.
    const { lists, rows } = packCallers(callers, (id, key): NativeIdentityRow => [key, id.clientID.toLowerCase(), id.resourceID.toLowerCase()]);
    native.serverSetCallers(serverId, lists, rows);
  }

  function respond(connId: number, requestId: number, bytes: Buffer | string, close: boolean): void {
    if (id !== undefined) native.serverRespond(id, connId, requestId, Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes, 'latin1'), close);
  }

  function onRequest(connId: number, requestId: number, raw: Buffer | null, remoteAddress: string, error: NativeDeferError | null): void {
    if (error === 'stopped') {
      if (id !== undefined && side.countHits) lastHits = native.serverTakeHits(id) ?? [];
      return onStopped();
    }
    if (error !== null) return respond(connId, requestId, DEFER_ANSWERS[error](), true);
    if (raw === null) return respond(connId, requestId, clientErrorBytes(undefined), true);
    const request = parseRawRequest(raw);
    if (request === 'malformed') return respond(connId, requestId, clientErrorBytes(undefined), true);
    if (request === 'no-host') return respond(connId, requestId, noHostBytes(), true);
    const started = process.hrtime.bigint();
    const { route, answer } = answerWhole(core, proxy, log, { ...request, ...splitCaller(remoteAddress) });
    void answer.then((whole) => {
      const keepAlive = request.keepAlive && !closing;
      respond(connId, requestId, serializeAnswer(whole, request.method === 'HEAD', keepAlive), !keepAlive);
      deps.metrics?.observe(route, whole.status, Number(process.hrtime.bigint() - started) / 1e9);
    });
  }

  async function stop(drainMs: number): Promise<void> {
    closing = true;
    if (id !== undefined) {
      const done = new Promise<void>((resolve) => (onStopped = resolve));
      if (native.serverStop(id, drainMs)) await done;
      id = undefined;
    }
    await proxy.close();
  }

  return {
    get port() {
      return port;
    },
    async listen(host, wantedPort, fd) {
      const started = native.serverStart(
        {
          fd: fd ?? native.listenTcp(host, wantedPort, limits.backlog),
          ...serverBounds(options.maxConnectionsPerSource),
          maxHeaderBytes: limits.maxHeaderSize,
          maxBodyBytes: limits.maxBodyBytes,
          headerTimeoutMs: limits.headersTimeoutMs,
          keepAliveTimeoutMs: limits.keepAliveTimeoutMs,
          maxUnsentBytes: limits.maxUnsentBytes,
          busyAnswer: fixedAnswer(problems.busy),
          tooManyConnectionsAnswer: fixedAnswer(problems.tooManyConnections),
          metadataHeaderRequired: options.metadataHeaderRequired,
          multipleIdentities: options.multipleIdentities,
          apiVersions: [...IDENTITY_API_VERSIONS],
          ...side,
        },
        onRequest,
      );
      id = started.id;
      port = started.port;
      pushCallers(id, earlyCallers);
      native.serverUpdateTokens(id, [...earlyTokens.values()].map(tokenRow), []);
      earlyCallers = [];
      earlyTokens.clear();
    },
    close(drainMs = limits.drainTimeoutMs) {
      stopped ??= stop(drainMs);
      return stopped;
    },
    setCallers(callers) {
      if (id === undefined) earlyCallers = callers;
      else pushCallers(id, callers);
    },
    updateTokens(upserts, removals) {
      if (id !== undefined) return native.serverUpdateTokens(id, upserts.map(tokenRow), removals.map((t) => [t.identityKey, t.resource]));
      for (const t of removals) earlyTokens.delete(tokenKey(t));
      for (const t of upserts) earlyTokens.set(tokenKey(t), t);
    },
    onTokenServed(listener) {
      listeners.push(listener);
    },
    stats() {
      return id === undefined ? undefined : (native.serverStats(id) ?? undefined);
    },
    takeHits() {
      if (id !== undefined) return native.serverTakeHits(id) ?? [];
      const hits = lastHits;
      lastHits = [];
      return hits;
    },
  };
}

/** The answer body split around expires_in, which the native side counts at answer time. */
export function tokenRow({ identityKey: key, resource, token, serveUntilMs }: TableToken): NativeTokenRow {
  const { access_token, client_id, expires_in: _, ...rest } = toAnswer(token);
  const prefix = `${JSON.stringify({ access_token, client_id }).slice(0, -1)},"expires_in":"`;
  const suffix = `",${JSON.stringify(rest).slice(1)}`;
  return [key, resource, prefix, suffix, token.expiresOn, serveUntilMs];
}

/** An answer the native side writes itself, which adds Date and Connection as serializeAnswer does. */
function fixedAnswer(problem: Problem): [string, string] {
  const answer = problemAnswer(problem);
  return [statusAndHeaders(answer), answer.body.toString('latin1')];
}

/** What node:http answers an HTTP/1.1 request without Host (requireHostHeader). */
function noHostBytes(nowMs = Date.now()): string {
  return `HTTP/1.1 400 Bad Request\r\nConnection: close\r\nDate: ${new Date(nowMs).toUTCString()}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n`;
}
