// The js server's HTTP side, in a worker thread that token-server.ts starts.
// Here: node:http with the server's limits, path hygiene and checks 1–5
// (request.ts), and cache hits answered from the tables (tables.ts) the main
// thread feeds it, as the native server answers them. Any other request is
// deferred to the main thread's token core whole, and its answer comes back to be
// written here. Every resource a caller can make it hold is bounded: bodies,
// connections (per source and in all), requests waiting on the main thread,
// and output its peer does not take.
//
// Why a thread: in the daemon's isolate, undici, TLS, the watches and the logs
// pass many object shapes through node's own stream and HTTP functions, which
// then run megamorphic for every request; a worker's isolate has its own copy
// of them and sees only this server's sockets (bench/README.md, "The js server
// against node:http"). So this file imports nothing that does I/O of its own.
import http from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { performance } from 'node:perf_hooks';
import { parentPort, workerData } from 'node:worker_threads';
import { attestedKey, connectionCgroup, PeerMap } from '../attest/peers.js';
import { plainAddress } from '../kubelet/pod-index.js';
import { clientErrorBytes, problemAnswer, problems, serializeAnswer, tokenAnswer, writeAnswer, type Answer } from './answers.js';
import { limits, type ServerBounds } from '../config/limits.js';
import { drainable } from './drain.js';
import { RequestCounts } from './request-counts.js';
import { checkedHeaders, classifyRequest, type Classification, type RequestHeaders, type RequestPolicy, type RouteName, type TokenRequest } from './request.js';
import type { MultipleIdentities } from '../config/commands.js';
import { selectIdentity } from './select-identity.js';
import type { CallerRow, TableToken, TokenId } from './tables.js';
import type { WholeRequest } from './core.js';

export interface WorkerSetup {
  policy: RequestPolicy;
  multipleIdentities: MultipleIdentities;
  /** --rules ebpf: the peers map; callers are then keyed by address and the cgroup that connected. */
  peerMapFd?: number;
  /** Where to count requests (ServerMetrics.segment()), when metrics are kept. */
  counts?: SharedArrayBuffer;
  bounds: ServerBounds;
}

/** An identity as the tables hold it: what selectIdentity compares, and the key its tokens are filed under. */
export interface TableIdentity {
  key: string;
  clientID: string;
  resourceID: string;
}

export type ToWorker =
  | { type: 'listen'; host: string; port: number; fd?: number }
  | { type: 'callers'; lists: TableIdentity[][]; rows: CallerRow[] }
  | { type: 'tokens'; upserts: TableToken[]; removals: TokenId[] }
  | { type: 'answer'; id: number; answer: Answer }
  | { type: 'close'; drainMs: number };

export type FromWorker =
  | { type: 'listening'; port: number }
  | { type: 'listen-failed'; message: string; code?: string }
  | { type: 'request'; id: number; request: WholeRequest }
  | { type: 'closed' };

interface Caller {
  remoteAddress: string | undefined;
  cgroup?: bigint | null;
  /** Its key in the caller table; undefined when it can have no entry (unattested). */
  tableKey: string | undefined;
}

/** An accepted connection: its caller, read once (socket.remoteAddress costs more per request), and what it holds. */
interface Connection {
  caller: Caller;
  /** What --max-connections-per-source counts by: the attested key, else the address. */
  source: string;
  /** Its requests waiting on the main thread, by id, and their bytes. */
  deferred: Set<number>;
  deferredBytes: number;
  /** The output the kernel had taken when its pending output was last seen to move, and when that was. */
  flushed: number;
  stalledSince: number | undefined;
}

/** A request waiting on the main thread. */
interface Deferred {
  res: http.ServerResponse;
  bytes: number;
  connection: Connection;
}

/** A request's body as its head declares it: a length (0: none), or chunked. */
type DeclaredBody = number | 'chunked';

const port = parentPort;
if (!port) throw new Error('js-worker.ts runs only as the js server\'s worker thread');
const setup = workerData as WorkerSetup;
const bounds = setup.bounds;
const peers = setup.peerMapFd === undefined ? undefined : new PeerMap(setup.peerMapFd);
const counts = setup.counts && new RequestCounts(setup.counts);
const post = (message: FromWorker) => port.postMessage(message);

/** The accepted connections; refused ones are not here. */
const connections = new Map<Socket, Connection>();
/** Accepted connections by Connection.source. */
const perSource = new Map<string, number>();
let callers = new Map<string, { exception: boolean; identities: TableIdentity[] }>();
/** identity key → resource → token. */
const tokens = new Map<string, Map<string, TableToken>>();
/** Requests deferred to the main thread, by id, until answered or gone. */
const deferred = new Map<number, Deferred>();
/** Their bytes, as Deferred.bytes counts them. */
let deferredBytes = 0;
let nextId = 0;
const noBody = new Uint8Array(0);
const bodyNotAllowed = problemAnswer(problems.bodyNotAllowed);
const bodyTooLarge = problemAnswer(problems.bodyTooLarge);
const busy = problemAnswer(problems.busy);

function handle(req: http.IncomingMessage, res: http.ServerResponse): void {
  const started = performance.now();
  // Every connection node:http parses went through accept().
  const connection = connections.get(req.socket)!;
  const method = req.method ?? '';
  const target = req.url ?? '';
  const headers = checkedHeaders(req.rawHeaders);
  const classified = classifyRequest(method, target, headers, setup.policy);
  const body = declaredBody(headers);
  let now = answerNow(method, classified, body, connection);
  // Sized only when it is to wait on the main thread: a cache hit is not.
  const bytes = now ? 0 : deferredSize(method, target, req.rawHeaders, body);
  now ??= hasRoom(connection, bytes) ? undefined : busy;
  if (now) {
    // A body left unread: what follows it on the connection cannot be told apart from it.
    writeAnswer(res, body === 0 ? now : closing(now));
    observe(res, classified.route, started);
    return;
  }
  const id = nextId++;
  deferred.set(id, { res, bytes, connection });
  deferredBytes += bytes;
  connection.deferred.add(id);
  connection.deferredBytes += bytes;
  res.once('close', () => {
    release(id);
    observe(res, classified.route, started);
  });
  void readBody(req, body).then((read) => {
    if (read === 'too-large') return writeAnswer(res, closing(bodyTooLarge));
    const request = { method, target, headers, rawHeaders: req.rawHeaders, body: read, ...connection.caller };
    post({ type: 'request', id, request });
  });
}

/** The answer this thread gives at once (a refusal, a cache hit), or undefined when the main thread must judge it. */
function answerNow(method: string, classified: Classification, body: DeclaredBody, connection: Connection): Answer | undefined {
  if (body !== 0 && (classified.route === 'token' || method === 'GET' || method === 'HEAD')) return bodyNotAllowed;
  if (classified.kind === 'reject') return problemAnswer(classified.problem);
  if (classified.kind === 'token') return fromTables(connection.caller, classified.request);
  return body !== 'chunked' && body > limits.maxBodyBytes ? bodyTooLarge : undefined;
}

/** Whether another request of `bytes` may wait on the main thread, for the server and for its connection. */
function hasRoom(connection: Connection, bytes: number): boolean {
  return (
    deferred.size < bounds.maxDeferredRequests &&
    deferredBytes + bytes <= bounds.maxDeferredBytes &&
    connection.deferredBytes + bytes <= bounds.maxDeferredBytesPerConnection
  );
}

/** The body as its head declares it (a length; 0 for none), from the headers checkedHeaders kept. */
function declaredBody(headers: RequestHeaders): DeclaredBody {
  if (headers['transfer-encoding'] !== undefined) return 'chunked';
  return Number(headers['content-length'] ?? 0);
}

/** A request's size while it waits on the main thread, roughly: its head, and its body (chunked: what it may grow to). */
function deferredSize(method: string, target: string, rawHeaders: readonly string[], body: DeclaredBody): number {
  let size = method.length + target.length + (body === 'chunked' ? limits.maxBodyBytes : body);
  for (const part of rawHeaders) size += part.length;
  return size;
}

/** The request no longer waits on the main thread: answered, or its client gone. */
function release(id: number): Deferred | undefined {
  const request = deferred.get(id);
  if (!request) return undefined;
  deferred.delete(id);
  deferredBytes -= request.bytes;
  request.connection.deferred.delete(id);
  request.connection.deferredBytes -= request.bytes;
  return request;
}

/** The answer, after which the connection ends; Connection: close where node:http puts its own, after answers.ts's headers. */
function closing(answer: Answer): Answer {
  return { ...answer, headers: [...answer.headers, ['Connection', 'close']] };
}

/** The cache hit, as the native server answers it: a caller in the caller table, one identity the request names, its token within its window. */
function fromTables(caller: Caller, request: TokenRequest): Answer | undefined {
  const callerEntry = caller.tableKey === undefined ? undefined : callers.get(caller.tableKey);
  if (!callerEntry || callerEntry.exception) return undefined;
  const identity = selectIdentity(callerEntry.identities, request.selector, setup.multipleIdentities);
  if (typeof identity === 'string') return undefined;
  const entry = tokens.get(identity.key)?.get(request.resource);
  return entry && entry.serveUntilMs > Date.now() ? tokenAnswer(entry.token) : undefined;
}

function observe(res: http.ServerResponse, route: RouteName, started: number): void {
  counts?.observe(route, res.headersSent ? res.statusCode : 'aborted', (performance.now() - started) / 1000);
}

/**
 * A proxied request's body, whole (at most maxBodyBytes: a longer declared one never gets here); bodiless
 * requests need not wait for the stream's end. A chunked one is refused as soon as it passes the limit, and
 * what follows is dropped unread. Never settles when the client goes away mid-body.
 */
function readBody(req: http.IncomingMessage, body: DeclaredBody): Promise<Uint8Array | 'too-large'> {
  if (body === 0) return Promise.resolve(noBody);
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const onData = (chunk: Buffer) => {
      size += chunk.length;
      if (size <= limits.maxBodyBytes) return void chunks.push(chunk);
      req.off('data', onData);
      resolve('too-large');
    };
    req.on('data', onData);
    req.on('end', () => resolve(Buffer.concat(chunks)));
  });
}

function answer(id: number, given: Answer): void {
  // Gone: the client went away meanwhile. Once closing, drain() (or drain.ts, for later requests) has said Connection: close.
  // Answered, it no longer counts against the defer bounds, even while its peer has yet to take it.
  const request = release(id);
  if (!request) return;
  // Structured cloning made the body a plain Uint8Array.
  writeAnswer(request.res, { ...given, body: Buffer.from(given.body.buffer, given.body.byteOffset, given.body.byteLength) });
}

function setCallers(lists: TableIdentity[][], rows: CallerRow[]): void {
  const next = new Map<string, { exception: boolean; identities: TableIdentity[] }>();
  for (const [address, exception, list] of rows) next.set(address, { exception, identities: lists[list] ?? [] });
  callers = next;
}

function updateTokens(upserts: TableToken[], removals: TokenId[]): void {
  for (const { identityKey, resource } of removals) {
    const byResource = tokens.get(identityKey);
    byResource?.delete(resource);
    if (byResource?.size === 0) tokens.delete(identityKey);
  }
  for (const entry of upserts) {
    let byResource = tokens.get(entry.identityKey);
    if (!byResource) tokens.set(entry.identityKey, (byResource = new Map()));
    byResource.set(entry.resource, entry);
  }
}

function listen(host: string, wanted: number, fd: number | undefined): void {
  const failed = (err: NodeJS.ErrnoException) => post({ type: 'listen-failed', message: err.message, code: err.code });
  server.once('error', failed);
  const done = () => {
    server.off('error', failed);
    // From now on only accepting fails (EMFILE: out of descriptors); libuv has dropped that connection and the server goes on.
    server.on('error', () => {});
    post({ type: 'listening', port: (server.address() as AddressInfo).port });
  };
  if (fd === undefined) server.listen({ port: wanted, host, backlog: limits.backlog }, done);
  else server.listen({ fd }, done);
}

/** Stops accepting, lets deferred requests be answered (at most drainMs), then closes every connection. */
async function drain(drainMs: number): Promise<void> {
  for (const { res } of deferred.values()) if (!res.headersSent) res.setHeader('Connection', 'close');
  await draining.drain(drainMs);
  post({ type: 'closed' });
}

/** Malformed requests never reach the handler: answer them in IMDS's shape, then hang up. */
function answerClientError(err: NodeJS.ErrnoException, socket: Socket): void {
  // An answer already on this connection cannot be followed by another status line.
  const busy = (socket as { _httpMessage?: unknown })._httpMessage != null;
  // Bytes after a request that said Connection: close: the answers up to it are still due, and the last of them ends
  // the connection. Meanwhile what follows is read and dropped (node:http calls here again for it), never reset.
  if (err.code === 'HPE_CLOSED_CONNECTION' && busy) return;
  if (err.code === 'ECONNRESET' || !socket.writable || busy) {
    socket.destroy();
    return;
  }
  socket.end(clientErrorBytes(err.code));
}

const server = http.createServer(
  {
    maxHeaderSize: limits.maxHeaderSize,
    headersTimeout: limits.headersTimeoutMs,
    requestTimeout: limits.requestTimeoutMs,
    keepAliveTimeout: limits.keepAliveTimeoutMs,
    keepAlive: true, // TCP keep-alive probes, so dead peers do not hold connection slots
  },
  handle,
);

const tooManyConnections = problemAnswer(problems.tooManyConnections);

function callerOf(socket: Socket): Caller {
  const remoteAddress = socket.remoteAddress && plainAddress(socket.remoteAddress);
  if (!peers) return { remoteAddress, tableKey: remoteAddress };
  const cgroup = connectionCgroup(peers, socket);
  return { remoteAddress, cgroup, tableKey: remoteAddress && cgroup !== null ? attestedKey(remoteAddress, cgroup) : undefined };
}

/** Within the bounds, a connection goes to node:http; past them it is answered 429 (its source's) or 503 (the server's) and closed. */
function accept(socket: Socket): void {
  const caller = callerOf(socket);
  const source = caller.tableKey ?? caller.remoteAddress ?? '';
  const held = perSource.get(source) ?? 0;
  if (held >= bounds.maxConnectionsPerSource) return refuse(socket, tooManyConnections);
  // Not server.maxConnections: node resets the connections past it.
  if (connections.size >= bounds.maxConnections) return refuse(socket, busy);
  perSource.set(source, held + 1);
  const connection: Connection = { caller, source, deferred: new Set(), deferredBytes: 0, flushed: 0, stalledSince: undefined };
  connections.set(socket, connection);
  socket.once('close', () => {
    connections.delete(socket);
    // node:http closes only the answer under way; those queued behind it (pipelined) never close.
    for (const id of connection.deferred) release(id);
    const left = perSource.get(source)! - 1;
    if (left === 0) perSource.delete(source);
    else perSource.set(source, left);
  });
  parseConnection.call(server, socket);
}

/**
 * The answer and a FIN at once. What the client sends is read and dropped until it hangs up (at most as long as
 * an idle keep-alive connection is kept), so it is not reset before it reads the answer.
 */
function refuse(socket: Socket, answer: Answer): void {
  socket.on('error', () => {}); // the client's reset: there is nothing left to tell it
  const lingering = setTimeout(() => socket.destroy(), limits.keepAliveTimeoutMs);
  socket.once('close', () => clearTimeout(lingering));
  socket.resume();
  socket.end(serializeAnswer(answer, false, false));
}

/**
 * node:http stops reading a connection whose answers its peer does not take, but nothing ends it: one whose
 * pending output has not moved in writeTimeoutMs is cut. A request waiting on the main thread (up to ~70 s)
 * has no output pending, so it never counts as stalled.
 */
function cutStalled(): void {
  const now = performance.now();
  for (const [socket, connection] of connections) {
    if (socket.writableLength === 0) {
      connection.stalledSince = undefined;
      continue;
    }
    // What the kernel has taken: bytesWritten counts the queued bytes too.
    const flushed = socket.bytesWritten - socket.writableLength;
    if (connection.stalledSince === undefined || flushed !== connection.flushed) {
      connection.flushed = flushed;
      connection.stalledSince = now;
    } else if (now - connection.stalledSince >= bounds.writeTimeoutMs) socket.destroy();
  }
}

// node:http's own 'connection' listener gives a connection its parser. A refused one must never get one, or a
// request read on it would be answered after the refusal: accept() calls it for the connections it keeps.
const parseConnection = server.listeners('connection')[0] as (this: http.Server, socket: Socket) => void;
server.removeAllListeners('connection');
server.on('connection', accept);
const draining = drainable(server);
server.on('clientError', answerClientError);
setInterval(cutStalled, bounds.writeTimeoutMs / 4).unref();

port.on('message', (message: ToWorker) => {
  switch (message.type) {
    case 'listen':
      return listen(message.host, message.port, message.fd);
    case 'callers':
      return setCallers(message.lists, message.rows);
    case 'tokens':
      return updateTokens(message.upserts, message.removals);
    case 'answer':
      return answer(message.id, message.answer);
    case 'close':
      return void drain(message.drainMs);
  }
});
