// The `native` token server (--server native). The C++ side (native/server.cc)
// owns the socket and answers the one hot case itself: a valid token request
// from a routed caller whose token is in its table. Everything else arrives
// here as raw bytes, goes through the same request core as the js server
// (core.ts: request → caller → identity → token → answer), and goes
// back as the bytes node:http would have written for the js server.
//
// The tables it answers hits from are tables.ts's, pushed here.
import http from 'node:http';
import { identityKey } from '../bindings/model.js';
import {
  addon,
  type NativeHandoffError,
  type NativeIdentityRow,
  type NativeServerStats,
  type NativeTokenRow,
} from '../native/addon.js';
import { toAnswer } from '../tokens/token.js';
import { clientErrorBytes, problemAnswer, problems, serializeAnswer, statusAndHeaders, type Problem } from './answers.js';
import { createImdsProxy } from './proxy.js';
import type { RequestHeaders } from './request.js';
import { packRoutes, tellingServed, tokenKey, type Route, type TableFedServer, type TableToken, type TokenServedListener } from './tables.js';
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
}

/** Hand-overs without a request, each answered and the connection closed: as node answers what llhttp refuses, or IMDS-shaped. */
const HANDOFF_ANSWERS: Record<Exclude<NativeHandoffError, 'stopped'>, () => Buffer | string> = {
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

/** peerMapFd: --rules ebpf's peers map, so the C++ side can attest connections as it accepts them. */
export function createNativeTokenServer(deps: TokenServerDeps, attest: { peerMapFd?: number } = {}): NativeTokenServer {
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
  let earlyRoutes: Route[] = [];
  const earlyTokens = new Map<string, TableToken>();

  function pushRoutes(serverId: number, routes: Route[]): void {
    // Lowercased here with toLowerCase, as selectIdentity compares.
    const { lists, rows } = packRoutes(routes, (id): NativeIdentityRow => [identityKey(id), id.clientID.toLowerCase(), id.resourceID.toLowerCase()]);
    native.serverSetRoutes(serverId, lists, rows);
  }

  function respond(connId: number, requestId: number, bytes: Buffer | string, close: boolean): void {
    if (id !== undefined) native.serverRespond(id, connId, requestId, Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes, 'latin1'), close);
  }

  function onRequest(connId: number, requestId: number, raw: Buffer | null, remoteAddress: string, error: NativeHandoffError | null): void {
    if (error === 'stopped') return onStopped();
    if (error !== null) return respond(connId, requestId, HANDOFF_ANSWERS[error](), true);
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
          headerTimeoutMs: limits.headersTimeoutMs,
          maxUnsentBytes: limits.maxUnsentBytes,
          busyAnswer: fixedAnswer(problems.busy),
          tooManyConnectionsAnswer: fixedAnswer(problems.tooManyConnections),
          metadataHeaderRequired: options.metadataHeaderRequired,
          firstOfSeveral: options.multipleIdentities === 'first',
          ...attest,
        },
        onRequest,
      );
      id = started.id;
      port = started.port;
      pushRoutes(id, earlyRoutes);
      native.serverUpdateTokens(id, [...earlyTokens.values()].map(tokenRow), []);
      earlyRoutes = [];
      earlyTokens.clear();
    },
    close(drainMs = limits.drainTimeoutMs) {
      stopped ??= stop(drainMs);
      return stopped;
    },
    setRoutes(routes) {
      if (id === undefined) earlyRoutes = routes;
      else pushRoutes(id, routes);
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
  };
}

/** The answer body split around expires_in, which the native side counts at answer time. */
export function tokenRow({ identityKey: key, resource, token, serveUntilMs }: TableToken): NativeTokenRow {
  const { access_token, client_id, expires_in: _, ...rest } = toAnswer(token);
  const prefix = `${JSON.stringify({ access_token, client_id }).slice(0, -1)},"expires_in":"`;
  const suffix = `",${JSON.stringify(rest).slice(1)}`;
  return [key, resource, prefix, suffix, token.expiresOn, serveUntilMs];
}

// ---- the request bytes, read as node:http reads them ----

export interface RawRequest {
  method: string;
  target: string;
  /** name, value, name, value... as node's rawHeaders. */
  rawHeaders: string[];
  /** As node's req.headers: lower-case names, duplicates joined or dropped as node does. */
  headers: RequestHeaders;
  body: Buffer;
  keepAlive: boolean;
}

// The target as llhttp accepts it: no control characters, no space (a raw NUL once slipped through).
const REQUEST_LINE = /^([A-Z]+) ([^\x00-\x20\x7f]+) HTTP\/1\.([01])$/;
const HEADER_LINE = /^([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*(.*?)[ \t]*$/;
const BAD_VALUE = /[\x00-\x08\x0a-\x1f\x7f]/;
/** Headers node keeps only the first of (its matchKnownFields). */
const SINGLE = new Set([
  'content-type', 'content-length', 'user-agent', 'referer', 'host', 'authorization', 'proxy-authorization',
  'if-modified-since', 'if-unmodified-since', 'from', 'location', 'max-forwards', 'retry-after', 'etag',
  'last-modified', 'server', 'age', 'expires',
]);
const METHODS = new Set(http.METHODS);

/** One complete request as the native side framed it; 'malformed' where llhttp would refuse it. */
export function parseRawRequest(raw: Buffer): RawRequest | 'malformed' | 'no-host' {
  const headEnd = raw.indexOf('\r\n\r\n');
  if (headEnd < 0) return 'malformed';
  const [requestLine = '', ...lines] = raw.subarray(0, headEnd).toString('latin1').split('\r\n');
  const line = REQUEST_LINE.exec(requestLine);
  if (!line || !METHODS.has(line[1]!)) return 'malformed';
  const [, method, target, minor] = line as unknown as [string, string, string, string];
  const rawHeaders: string[] = [];
  const headers: Record<string, string | string[]> = {};
  for (const text of lines) {
    const header = HEADER_LINE.exec(text);
    if (!header || BAD_VALUE.test(header[2]!)) return 'malformed';
    const [, name, value] = header as unknown as [string, string, string];
    rawHeaders.push(name, value);
    addHeader(headers, name.toLowerCase(), value);
  }
  if (minor === '1' && headers['host'] === undefined) return 'no-host';
  const connection = String(headers['connection'] ?? '').toLowerCase().split(',').map((t) => t.trim());
  const keepAlive = minor === '1' ? !connection.includes('close') : connection.includes('keep-alive') && !connection.includes('close');
  return { method, target, rawHeaders, headers, body: raw.subarray(headEnd + 4), keepAlive };
}

function addHeader(headers: Record<string, string | string[]>, name: string, value: string): void {
  const seen = headers[name];
  if (seen === undefined) headers[name] = name === 'set-cookie' ? [value] : value;
  else if (name === 'set-cookie') (seen as string[]).push(value);
  else if (SINGLE.has(name)) return;
  else headers[name] = `${seen as string}${name === 'cookie' ? '; ' : ', '}${value}`;
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

