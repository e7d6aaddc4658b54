// The js server's HTTP side, in a worker thread that token-server.ts starts.
// Here: node:http with the server's limits, path hygiene and checks 1–5
// (request.ts), and cache hits answered from the tables (tables.ts) the main
// thread feeds it, as the native server answers them. Any other request goes
// to the main thread's token core whole, and its answer comes back to be
// written here.
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
import { clientErrorBytes, problemAnswer, problems, tokenAnswer, writeAnswer, type Answer } from './answers.js';
import { limits } from './limits.js';
import { drainable } from './drain.js';
import { RequestCounts } from './request-counts.js';
import { checkedHeaders, classifyRequest, type RequestPolicy, type RouteName, type TokenRequest } from './request.js';
import { selectIdentity, type SeveralPolicy } from './select-identity.js';
import type { RouteRow, TableToken, TokenId } from './tables.js';
import type { WholeRequest } from './core.js';

export interface WorkerSetup {
  policy: RequestPolicy;
  several: SeveralPolicy;
  /** --rules ebpf: the peers map; callers are then routed by address and the cgroup that connected. */
  peerMapFd?: number;
  /** Where to count requests (ServerMetrics.segment()), when metrics are kept. */
  counts?: SharedArrayBuffer;
}

/** An identity as the tables hold it: what selectIdentity compares, and the key its tokens are filed under. */
export interface TableIdentity {
  key: string;
  clientID: string;
  resourceID: string;
}

export type ToWorker =
  | { type: 'listen'; host: string; port: number; fd?: number }
  | { type: 'routes'; lists: TableIdentity[][]; rows: RouteRow[] }
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
  /** Its key in the route table; undefined when it can have no route (unattested). */
  route: string | undefined;
}

const port = parentPort;
if (!port) throw new Error('js-worker.ts runs only as the js server\'s worker thread');
const setup = workerData as WorkerSetup;
const peers = setup.peerMapFd === undefined ? undefined : new PeerMap(setup.peerMapFd);
const counts = setup.counts && new RequestCounts(setup.counts);
const post = (message: FromWorker) => port.postMessage(message);

/** The caller of each connection, read once when it is accepted (socket.remoteAddress costs more per request). */
const callers = new WeakMap<Socket, Caller>();
let routes = new Map<string, { exception: boolean; identities: TableIdentity[] }>();
/** identity key → resource → token. */
const tokens = new Map<string, Map<string, TableToken>>();
/** Requests handed to the main thread, by id, until answered or gone. */
const handedOver = new Map<number, http.ServerResponse>();
let nextId = 0;
const noBody = new Uint8Array(0);

function handle(req: http.IncomingMessage, res: http.ServerResponse): void {
  const started = performance.now();
  const caller = callers.get(req.socket) ?? { remoteAddress: undefined, route: undefined };
  const headers = checkedHeaders(req.rawHeaders);
  const classified = classifyRequest(req.method ?? '', req.url ?? '', headers, setup.policy);
  const now = classified.kind === 'reject' ? problemAnswer(classified.problem) : classified.kind === 'token' ? fromTables(caller, classified.request) : undefined;
  if (now) {
    writeAnswer(res, now);
    observe(res, classified.route, started);
    return;
  }
  const id = nextId++;
  handedOver.set(id, res);
  res.once('close', () => {
    handedOver.delete(id);
    observe(res, classified.route, started);
  });
  void readBody(req).then((body) => {
    if (body === 'too-large') return writeAnswer(res, problemAnswer(problems.bodyTooLarge));
    const request = { method: req.method ?? '', target: req.url ?? '', headers, rawHeaders: req.rawHeaders, body, ...caller };
    post({ type: 'request', id, request });
  });
}

/** The cache hit, as the native server answers it: a routed caller, one identity the request names, its token within its window. */
function fromTables(caller: Caller, request: TokenRequest): Answer | undefined {
  const route = caller.route === undefined ? undefined : routes.get(caller.route);
  if (!route || route.exception) return undefined;
  const identity = selectIdentity(route.identities, request.selector, setup.several);
  if (typeof identity === 'string') return undefined;
  const entry = tokens.get(identity.key)?.get(request.resource);
  return entry && entry.serveUntilMs > Date.now() ? tokenAnswer(entry.token) : undefined;
}

function observe(res: http.ServerResponse, route: RouteName, started: number): void {
  counts?.observe(route, res.headersSent ? res.statusCode : 'aborted', (performance.now() - started) / 1000);
}

/**
 * A proxied request's body, whole (IMDS's are small); bodiless requests need not wait for the stream's end.
 * Past the limit the rest is read and dropped, so the refusal comes after the request as on any connection
 * (node's requestTimeout bounds how long); never settles when the client goes away mid-body.
 */
function readBody(req: http.IncomingMessage): Promise<Uint8Array | 'too-large'> {
  if (req.headers['content-length'] === undefined && req.headers['transfer-encoding'] === undefined) return Promise.resolve(noBody);
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (chunk: Buffer) => {
      size += chunk.length;
      if (size <= limits.maxBodyBytes) chunks.push(chunk);
    });
    req.on('end', () => resolve(size > limits.maxBodyBytes ? 'too-large' : Buffer.concat(chunks)));
  });
}

function answer(id: number, given: Answer): void {
  const res = handedOver.get(id);
  // Gone: the client went away meanwhile. Once closing, drain() (or drain.ts, for later requests) has said Connection: close.
  if (!res) return;
  // Structured cloning made the body a plain Uint8Array.
  writeAnswer(res, { ...given, body: Buffer.from(given.body.buffer, given.body.byteOffset, given.body.byteLength) });
}

function setRoutes(lists: TableIdentity[][], rows: RouteRow[]): void {
  const next = new Map<string, { exception: boolean; identities: TableIdentity[] }>();
  for (const [address, exception, list] of rows) next.set(address, { exception, identities: lists[list] ?? [] });
  routes = next;
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
    post({ type: 'listening', port: (server.address() as AddressInfo).port });
  };
  if (fd === undefined) server.listen({ port: wanted, host, backlog: limits.backlog }, done);
  else server.listen({ fd }, done);
}

/** Stops accepting, lets handed-over requests be answered (at most drainMs), then closes every connection. */
async function drain(drainMs: number): Promise<void> {
  for (const res of handedOver.values()) if (!res.headersSent) res.setHeader('Connection', 'close');
  await draining.drain(drainMs);
  post({ type: 'closed' });
}

/** Malformed requests never reach the handler: answer them in IMDS's shape, then hang up. */
function answerClientError(err: NodeJS.ErrnoException, socket: Socket): void {
  // An answer already on this connection cannot be followed by another status line.
  const busy = (socket as { _httpMessage?: unknown })._httpMessage != null;
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
server.maxConnections = limits.maxConnections;
const draining = drainable(server);
server.on('clientError', answerClientError);
server.on('connection', (socket: Socket) => {
  const remoteAddress = socket.remoteAddress && plainAddress(socket.remoteAddress);
  if (!peers) return callers.set(socket, { remoteAddress, route: remoteAddress });
  const cgroup = connectionCgroup(peers, socket);
  callers.set(socket, { remoteAddress, cgroup, route: remoteAddress && cgroup !== null ? attestedKey(remoteAddress, cgroup) : undefined });
});

port.on('message', (message: ToWorker) => {
  switch (message.type) {
    case 'listen':
      return listen(message.host, message.port, message.fd);
    case 'routes':
      return setRoutes(message.lists, message.rows);
    case 'tokens':
      return updateTokens(message.upserts, message.removals);
    case 'answer':
      return answer(message.id, message.answer);
    case 'close':
      return void drain(message.drainMs);
  }
});
