// The `native` token server (--server native). The C++ side (native/server.cc)
// owns the socket and answers the one hot case itself: a valid token request
// from a routed caller whose token is in its table. Everything else arrives
// here as raw bytes, goes through the same request core as the js server
// (token-server.ts: request → caller → identity → token → answer), and goes
// back as the bytes node:http would have written for the js server.
//
// The tables: routes (caller address → bound identities) are rebuilt from the
// pods and bindings on every change by attachNativeTables, one identity list per
// distinct set; a token enters the table when the js path has just served it,
// for a short window, so a token is never served natively past the point where
// the cache would refresh or drop it by more than that window. Only changed
// tokens cross to C++.
import http from 'node:http';
import type { AzureIdentity, PodIdentities } from '../bindings/model.js';
import type { Pod } from '../kubelet/pod.js';
import { isCaller } from '../kubelet/pod-index.js';
import {
  addon,
  type NativeHandoffError,
  type NativeIdentityRow,
  type NativeRouteRow,
  type NativeServerStats,
  type NativeTokenRow,
} from '../native/addon.js';
import { EXPIRY_MARGIN_MS, identityKey } from '../tokens/token-cache.js';
import { toAnswer, type Token } from '../tokens/token.js';
import { problemAnswer, problems, type Answer } from './answers.js';
import { createImdsProxy } from './proxy.js';
import type { RequestHeaders } from './request.js';
import { clientErrorBytes, createRequestCore, limits, type TokenServerDeps } from './token-server.js';

export interface NativeTokenServer {
  listen(host: string, port: number): Promise<void>;
  /** Stops accepting, lets answers under way go out (at most drainMs), then closes every connection. Idempotent. */
  close(drainMs?: number): Promise<void>;
  /** The bound port, once listening. */
  readonly port: number | undefined;
  /** Replaces the route table in one swap. */
  setRoutes(routes: NativeRoute[]): void;
  /** Adds or replaces `upserts` and removes `removals` from the token table, in one swap. */
  updateTokens(upserts: NativeToken[], removals: NativeTokenId[]): void;
  /** Called each time the js path answers a token, with what it answered. */
  onTokenServed(listener: TokenServedListener): void;
  /** Counters of the native side; undefined unless listening. */
  stats(): NativeServerStats | undefined;
}

export type TokenServedListener = (identity: AzureIdentity, resource: string, token: Token) => void;

export interface NativeRoute {
  address: string;
  /** Exception pods are always handed to the js path (it passes them through). */
  exception: boolean;
  /** Routes given the same array share one list in the native table. */
  identities: readonly AzureIdentity[];
}

/** Which token: one per (identity, resource). */
export interface NativeTokenId {
  identityKey: string;
  /** The resource exactly as requested (after form decoding). */
  resource: string;
}

export interface NativeToken extends NativeTokenId {
  token: Token;
  /** Wall-clock ms; from then on the js path answers again. */
  serveUntilMs: number;
}

const KEEP_ALIVE_HEADER = `timeout=${limits.keepAliveTimeoutMs / 1000}`;
const HANDOFF_ERROR_CODES: Record<Exclude<NativeHandoffError, 'stopped'>, string> = {
  malformed: 'HPE_INVALID',
  overflow: 'HPE_HEADER_OVERFLOW',
  timeout: 'ERR_HTTP_REQUEST_TIMEOUT',
  // A Transfer-Encoding body is not taken by the native server.
  body: 'HPE_UNEXPECTED_CONTENT_LENGTH',
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
  const core = createRequestCore({
    ...deps,
    async getToken(identity, resource) {
      const token = await deps.getToken(identity, resource);
      for (const listener of listeners) listener(identity, resource, token);
      return token;
    },
  });
  const proxy = createImdsProxy({ upstream: deps.upstreamImds, timeoutMs: options.proxyTimeoutMs ?? limits.proxyTimeoutMs });
  const native = addon();
  let id: number | undefined;
  let port: number | undefined;
  let closing = false;
  let stopped: Promise<void> | undefined;
  let onStopped: () => void = () => {};
  // Tables set before listen() are pushed once the native server exists.
  let earlyRoutes: NativeRoute[] = [];
  const earlyTokens = new Map<string, NativeToken>();

  function pushRoutes(serverId: number, routes: NativeRoute[]): void {
    const { lists, rows } = packRoutes(routes);
    native.serverSetRoutes(serverId, lists, rows);
  }

  function respond(connId: number, requestId: number, bytes: Buffer | string, close: boolean): void {
    if (id !== undefined) native.serverRespond(id, connId, requestId, Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes, 'latin1'), close);
  }

  function onRequest(connId: number, requestId: number, raw: Buffer | null, remoteAddress: string, error: NativeHandoffError | null): void {
    if (error === 'stopped') return onStopped();
    if (error !== null || raw === null) return respond(connId, requestId, clientErrorBytes(error === null ? undefined : HANDOFF_ERROR_CODES[error]), true);
    const request = parseRawRequest(raw);
    if (request === 'malformed') return respond(connId, requestId, clientErrorBytes(undefined), true);
    if (request === 'no-host') return respond(connId, requestId, noHostBytes(), true);
    const started = process.hrtime.bigint();
    const { route, outcome } = core({ method: request.method, target: request.target, headers: request.headers, ...splitCaller(remoteAddress) });
    Promise.resolve(outcome)
      .then((result) => ('proxy' in result ? proxy.fetch(request.method, result.proxy, request.rawHeaders, request.body) : result))
      .then((answer) => {
        const keepAlive = request.keepAlive && !closing;
        respond(connId, requestId, serializeAnswer(answer, request.method === 'HEAD', keepAlive), !keepAlive);
        deps.metrics?.observe(route, String(answer.status), Number(process.hrtime.bigint() - started) / 1e9);
      })
      .catch((err: unknown) => {
        log.warn({ err: (err as Error).message }, 'native server request failed');
        respond(connId, requestId, serializeAnswer(problemAnswer(problems.internal), false, false), true);
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
    async listen(host, wantedPort) {
      const started = native.serverStart(
        {
          host,
          port: wantedPort,
          maxConnections: limits.maxConnections,
          maxHeaderBytes: limits.maxHeaderSize,
          headerTimeoutMs: limits.headersTimeoutMs,
          metadataHeaderRequired: options.metadataHeaderRequired,
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

/** One identity list per distinct identities array: 250 pods bound alike are one list, not 250. */
function packRoutes(routes: NativeRoute[]): { lists: NativeIdentityRow[][]; rows: NativeRouteRow[] } {
  const index = new Map<readonly AzureIdentity[], number>();
  const lists: NativeIdentityRow[][] = [];
  const rows = routes.map(({ address, exception, identities }): NativeRouteRow => {
    let i = index.get(identities);
    if (i === undefined) {
      index.set(identities, (i = lists.length));
      // Lowercased here with toLowerCase, as selectIdentity compares.
      lists.push(identities.map((id) => [identityKey(id), id.clientID.toLowerCase(), id.resourceID.toLowerCase()]));
    }
    return [address, exception, i];
  });
  return { lists, rows };
}

function tokenKey({ identityKey: key, resource }: NativeTokenId): string {
  return `${key}\n${resource}`;
}

/** The answer body split around expires_in, which the native side counts at answer time. */
export function tokenRow({ identityKey: key, resource, token, serveUntilMs }: NativeToken): NativeTokenRow {
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

// ---- the answer bytes, written as node:http writes them ----

/** Status line, the answer's headers in order, then Date, Connection, Keep-Alive as node adds them. */
export function serializeAnswer(answer: Answer, head: boolean, keepAlive: boolean, nowMs = Date.now()): Buffer {
  const names = new Set(answer.headers.map(([name]) => name.toLowerCase()));
  let text = `HTTP/1.1 ${answer.status} ${http.STATUS_CODES[answer.status] ?? 'unknown'}\r\n`;
  for (const [name, value] of answer.headers) text += `${name}: ${value}\r\n`;
  if (!names.has('date')) text += `Date: ${new Date(nowMs).toUTCString()}\r\n`;
  text += keepAlive ? `Connection: keep-alive\r\nKeep-Alive: ${KEEP_ALIVE_HEADER}\r\n` : 'Connection: close\r\n';
  const bodyless = head || answer.status === 204 || answer.status === 304;
  // A proxied answer without a length streams chunked from node; one chunk says the same.
  const chunked = !bodyless && !names.has('content-length');
  if (chunked) text += 'Transfer-Encoding: chunked\r\n';
  text += '\r\n';
  if (bodyless) return Buffer.from(text, 'latin1');
  if (!chunked) return Buffer.concat([Buffer.from(text, 'latin1'), answer.body]);
  const chunk = answer.body.length > 0 ? [Buffer.from(`${answer.body.length.toString(16)}\r\n`), answer.body, Buffer.from('\r\n')] : [];
  return Buffer.concat([Buffer.from(text, 'latin1'), ...chunk, Buffer.from('0\r\n\r\n')]);
}

/** What node:http answers an HTTP/1.1 request without Host (requireHostHeader). */
function noHostBytes(nowMs = Date.now()): string {
  return `HTTP/1.1 400 Bad Request\r\nConnection: close\r\nDate: ${new Date(nowMs).toUTCString()}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n`;
}

// ---- the tables ----

export interface NativeTableSources {
  /** Every pod of the last kubelet sync (PodIndex.pods). */
  pods(): readonly Pod[];
  /** The pod's identities as the js path sees them. */
  identitiesFor(pod: Pod): PodIdentities;
  /** BindingStore: 'change' names identities whose tokens must not be served again; 'update' follows every applied set. */
  store?: {
    on(event: 'change', listener: (keys: Set<string>) => void): unknown;
    on(event: 'update', listener: () => void): unknown;
  };
  /** --rules ebpf: the pod's cgroups; routes are then keyed "address#cgroup", one per cgroup. */
  cgroupsOf?(pod: Pod): readonly bigint[];
  /** How long a token the js path served may be served natively [30 s]. */
  serveWindowMs?: number;
  /** How often tokens past their serving window are dropped [5 s]; C++ checks the window on every answer, so this only frees them. */
  pollMs?: number;
}

export interface NativeTables {
  /** Rebuilds the routes from scratch now (call on every pod or bindings change). */
  refresh(): void;
  stop(): void;
}

export function attachNativeTables(server: NativeTokenServer, sources: NativeTableSources): NativeTables {
  const serveWindowMs = sources.serveWindowMs ?? 30_000;
  const tokens = new Map<string, NativeToken>();
  // What changed since the last push: only that crosses to C++.
  const upserts = new Map<string, NativeToken>();
  const removals = new Map<string, NativeToken>();
  let routed = new Set<string>();

  function push(): void {
    if (upserts.size === 0 && removals.size === 0) return;
    server.updateTokens([...upserts.values()], [...removals.values()]);
    upserts.clear();
    removals.clear();
  }

  function remove(key: string, entry: NativeToken): void {
    tokens.delete(key);
    upserts.delete(key);
    removals.set(key, entry);
  }

  // Additions are batched per turn of the event loop; removals are pushed at once.
  let pushScheduled = false;
  function schedulePush(): void {
    if (pushScheduled) return;
    pushScheduled = true;
    setImmediate(() => {
      pushScheduled = false;
      push();
    });
  }

  function refresh(): void {
    const routes = buildRoutes(sources.pods(), sources.identitiesFor, sources.cgroupsOf);
    routed = new Set<string>();
    for (const identities of new Set(routes.map((route) => route.identities))) for (const identity of identities) routed.add(identityKey(identity));
    server.setRoutes(routes);
    for (const [key, entry] of tokens) if (!routed.has(entry.identityKey)) remove(key, entry);
    push();
  }

  server.onTokenServed((identity, resource, token) => {
    const now = Date.now();
    const serveUntilMs = Math.min(now + serveWindowMs, token.expiresOn * 1000 - EXPIRY_MARGIN_MS);
    const key = identityKey(identity);
    if (serveUntilMs <= now || !routed.has(key)) return;
    const entry = { identityKey: key, resource, token, serveUntilMs };
    const id = tokenKey(entry);
    tokens.set(id, entry);
    removals.delete(id);
    upserts.set(id, entry);
    schedulePush();
  });
  sources.store?.on('change', (keys) => {
    for (const [key, entry] of tokens) if (keys.has(entry.identityKey)) remove(key, entry);
    push();
  });
  // Routes follow every bindings set (an exception alone changes no identity) and, through refresh(), every pod change.
  sources.store?.on('update', refresh);
  const timer = setInterval(() => {
    for (const [key, entry] of tokens) if (entry.serveUntilMs <= Date.now()) remove(key, entry);
    push();
  }, sources.pollMs ?? 5_000);
  timer.unref();
  refresh();
  return {
    refresh,
    stop() {
      clearInterval(timer);
    },
  };
}

const none: readonly AzureIdentity[] = [];

/**
 * Addresses of exactly one live pod, as PodIndex indexes them; an address two pods claim is left to the js path.
 * With cgroupsOf, a route per (address, cgroup of that pod): a socket of any other cgroup is left to the js path.
 */
export function buildRoutes(pods: readonly Pod[], identitiesFor: (pod: Pod) => PodIdentities, cgroupsOf?: (pod: Pod) => readonly bigint[]): NativeRoute[] {
  const owners = new Map<string, Set<Pod>>();
  for (const pod of pods) {
    if (!isCaller(pod)) continue;
    for (const ip of pod.ips) owners.set(ip, (owners.get(ip) ?? new Set<Pod>()).add(pod));
  }
  const routes: NativeRoute[] = [];
  for (const [address, set] of owners) {
    const [pod] = set;
    if (!pod || set.size > 1) continue;
    const bound = identitiesFor(pod);
    const keys = cgroupsOf ? cgroupsOf(pod).map((id) => `${address}#${id}`) : [address];
    for (const key of keys) routes.push({ address: key, exception: bound.exception, identities: bound.exception ? none : bound.identities });
  }
  return routes;
}
