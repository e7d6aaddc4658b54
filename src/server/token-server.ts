// The `js` token server, and the request core it shares with the native one
// (native-server.ts). Data flow of one token request:
//   request.ts (hygiene, route, checks 1–5) → caller by source address (6),
//   attested by the connection's cgroup with --rules ebpf (attest/)
//   → bound identities, filtered by the requested id (7) → getToken (8)
//   → answers.ts. Other /metadata categories and exception pods go to proxy.ts.
import http from 'node:http';
import type { Socket } from 'node:net';
import { performance } from 'node:perf_hooks';
import type { CgroupAttestation } from '../attest/attestation.js';
import type { AzureIdentity, PodIdentities } from '../bindings/model.js';
import { codes } from '../errors/errors.js';
import { plainAddress } from '../kubelet/pod-index.js';
import type { CallerLookup, Pod } from '../kubelet/pod.js';
import type { Logger } from '../log/logger.js';
import type { Token } from '../tokens/token.js';
import { problemAnswer, problems, tokenAnswer, unavailable, writeAnswer, type Answer, type Problem } from './answers.js';
import type { ServerMetrics } from './metrics.js';
import { createImdsProxy } from './proxy.js';
import { checkedHeaders, classifyRequest, type Classification, type IdSelector, type RequestHeaders, type RouteName, type TokenRequest } from './request.js';

export interface TokenServerOptions {
  metadataHeaderRequired: boolean;
  blockInstanceMetadata: boolean;
  retryAfter: boolean;
  proxyTimeoutMs?: number;
}

export interface TokenServerDeps {
  /** Caller's source IPv4 → its pod (after one coalesced refresh), or undefined. */
  callers: CallerLookup;
  /** --rules ebpf: callers are the pods whose cgroups made the connections, checked against their addresses. */
  attestation?: Pick<CgroupAttestation, 'cgroupOf' | 'resolve' | 'resolveNow'>;
  identitiesFor(pod: Pod): PodIdentities;
  /** Cache + credential resolution; rejects with an UpstreamFailure when Entra ID or IMDS fails. */
  getToken(identity: AzureIdentity, resource: string): Promise<Token>;
  /** A fresh cached token without waiting, or undefined (then getToken decides). */
  peekToken?(identity: AzureIdentity, resource: string): Token | undefined;
  /** The real IMDS: proxied categories and exception pods' pass-through. */
  upstreamImds: URL;
  options: TokenServerOptions;
  log: Logger;
  metrics?: ServerMetrics;
}

export interface TokenServer {
  server: http.Server;
  listen(host: string, port: number): Promise<void>;
  /** Stops accepting, lets in-flight requests finish (at most drainMs), then closes every connection. Idempotent. */
  close(drainMs?: number): Promise<void>;
}

/** How getToken fails when the upstream does (the token cache defines the class; matched by shape). */
export interface UpstreamFailure {
  code: typeof codes.UPSTREAM;
  kind: 'client' | 'throttled' | 'server' | 'timeout' | 'network';
  status?: number;
  body?: { error: string; error_description: string };
  retryAfterMs?: number;
}

export const limits = {
  maxHeaderSize: 16 * 1024, // bytes, request line + headers
  headersTimeoutMs: 10_000, // to receive the headers
  requestTimeoutMs: 30_000, // to receive the whole request
  keepAliveTimeoutMs: 5_000, // idle keep-alive connection
  maxConnections: 4_096,
  drainTimeoutMs: 10_000, // close(): in-flight requests get this long
  proxyTimeoutMs: 10_000,
  upstreamRetryAfterS: 5, // when the upstream gave no Retry-After
} as const;

/** A request as both servers see it: node's IncomingMessage (js) or the parsed raw bytes (native). */
export interface IncomingRequest {
  method: string;
  /** The raw request-target. */
  target: string;
  headers: RequestHeaders;
  /** The caller's address as the pod index keys it. */
  remoteAddress: string | undefined;
  /** With attestation: the cgroup that made the connection, null when none was recorded. */
  cgroup?: bigint | null;
}

/** What to do with a request: write this answer, or forward it to the real IMDS. */
export type Outcome = Answer | { proxy: string };

export interface Handled {
  /** Known before any I/O, for metrics. */
  route: RouteName;
  /** A cache hit is known at once; anything else is a promise that never rejects (an unexpected failure is logged and answered 500). */
  outcome: Outcome | Promise<Outcome>;
}

export type RequestCore = (req: IncomingRequest) => Handled;

/** request → caller → identity → token → answer, shared by the js and native servers. */
export function createRequestCore(deps: Pick<TokenServerDeps, 'callers' | 'attestation' | 'identitiesFor' | 'getToken' | 'peekToken' | 'options' | 'log'>): RequestCore {
  const { options, log, attestation } = deps;

  /** The hit case without a single await: a known caller with one identity and a fresh cached token. */
  function answerTokenNow({ remoteAddress, cgroup = null }: IncomingRequest, request: TokenRequest): Outcome | undefined {
    if (remoteAddress === undefined) return undefined;
    const pod = attestation ? attestation.resolveNow(remoteAddress, cgroup) : deps.callers.known?.(remoteAddress);
    if (!pod || !deps.peekToken) return undefined;
    const bound = deps.identitiesFor(pod);
    if (bound.exception) return undefined;
    const identity = selectIdentity(bound.identities, request.selector);
    if (typeof identity === 'string') return undefined;
    const token = deps.peekToken(identity, request.resource);
    return token && tokenAnswer(token);
  }

  /** Step 6: the pod that owns the source address; with attestation, the pod whose cgroup connected, if it does. */
  async function findCaller({ remoteAddress, cgroup = null }: IncomingRequest): Promise<Pod | Problem> {
    if (remoteAddress === undefined) return problems.unknownCaller;
    const caller = attestation ? await attestation.resolve(remoteAddress, cgroup) : await deps.callers.lookup(remoteAddress);
    if (caller === 'spoof') return problems.callerMismatch;
    if (caller === 'unattested') return problems.callerUnattested;
    return caller ?? problems.unknownCaller;
  }

  async function answerToken(req: IncomingRequest, request: TokenRequest): Promise<Outcome> {
    const pod = await findCaller(req);
    if ('status' in pod) return problemAnswer(pod);
    const bound = deps.identitiesFor(pod);
    if (bound.exception) return { proxy: request.target };

    return answerIdentityToken(deps, bound.identities, request, options.retryAfter ? problems.identityNotYet : problems.identityNotFound);
  }

  async function respond(classified: Classification, req: IncomingRequest): Promise<Outcome> {
    if (classified.kind === 'reject') return problemAnswer(classified.problem);
    if (classified.kind === 'proxy') return { proxy: classified.target };
    return answerToken(req, classified.request);
  }

  return (req) => {
    const classified = classifyRequest(req.method, req.target, req.headers, options);
    const now = classified.kind === 'token' ? answerTokenNow(req, classified.request) : undefined;
    if (now) return { route: classified.route, outcome: now };
    const outcome = respond(classified, req).catch((err: unknown): Outcome => {
      log.warn({ err: errorSummary(err) }, 'token server request failed');
      return problemAnswer(problems.internal);
    });
    return { route: classified.route, outcome };
  };
}

/** Steps 7 and 8, shared with /host/token: the one bound identity the request names, then its token. */
export async function answerIdentityToken(
  deps: Pick<TokenServerDeps, 'getToken' | 'log'>,
  identities: AzureIdentity[],
  request: { resource: string; selector?: IdSelector },
  notFound: Problem,
): Promise<Answer> {
  const identity = selectIdentity(identities, request.selector);
  if (identity === 'none') return problemAnswer(notFound);
  if (identity === 'ambiguous') return problemAnswer(problems.multipleIdentities);
  let token: Token;
  try {
    token = await deps.getToken(identity, request.resource);
  } catch (err) {
    if (!isUpstreamFailure(err)) throw err;
    deps.log.debug({ kind: err.kind, status: err.status, identity: identity.name, namespace: identity.namespace }, 'token upstream failed');
    return upstreamAnswer(err);
  }
  return tokenAnswer(token);
}

export function createTokenServer(deps: TokenServerDeps): TokenServer {
  const { options, log } = deps;
  const proxy = createImdsProxy({ upstream: deps.upstreamImds, timeoutMs: options.proxyTimeoutMs ?? limits.proxyTimeoutMs });
  const core = createRequestCore(deps);
  const inFlight = new Set<http.ServerResponse>();
  /** The caller of each connection, read once when it is accepted (socket.remoteAddress costs more per request). */
  const callers = new WeakMap<Socket, Pick<IncomingRequest, 'remoteAddress' | 'cgroup'>>();
  let closing = false;
  let stopped: Promise<void> | undefined;

  function handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    const started = performance.now();
    const caller = callers.get(req.socket);
    const { route, outcome } = core({
      method: req.method ?? '',
      target: req.url ?? '',
      headers: checkedHeaders(req.rawHeaders),
      remoteAddress: caller?.remoteAddress,
      cgroup: caller?.cgroup,
    });
    if (!(outcome instanceof Promise) && !('proxy' in outcome)) {
      // A cache hit, written before this returns: a finished answer needs no tracking for close() or metrics.
      if (closing) res.setHeader('Connection', 'close');
      writeAnswer(res, outcome);
      observe(res, route, started);
      return;
    }
    track(res, route, started);
    if (!(outcome instanceof Promise)) {
      void proxy.forward(req, res, outcome.proxy);
      return;
    }
    outcome
      .then((result) => ('proxy' in result ? proxy.forward(req, res, result.proxy) : writeAnswer(res, result)))
      .catch((err: unknown) => {
        log.warn({ err: errorSummary(err) }, 'token server request failed');
        if (res.headersSent) res.destroy();
        else writeAnswer(res, problemAnswer(problems.internal));
      });
  }

  function observe(res: http.ServerResponse, route: RouteName, started: number): void {
    deps.metrics?.observe(route, res.headersSent ? String(res.statusCode) : 'aborted', (performance.now() - started) / 1000);
  }

  function track(res: http.ServerResponse, route: RouteName, started: number): void {
    inFlight.add(res);
    if (closing) res.setHeader('Connection', 'close');
    res.once('close', () => {
      inFlight.delete(res);
      observe(res, route, started);
      // A keep-alive connection whose answer was already under way when close() began is idle now.
      if (closing) setImmediate(() => server.closeIdleConnections());
    });
  }

  async function drain(drainMs: number): Promise<void> {
    closing = true;
    for (const res of inFlight) if (!res.headersSent) res.setHeader('Connection', 'close');
    const closed = new Promise<void>((resolve) => server.close(() => resolve()));
    server.closeIdleConnections();
    const deadline = setTimeout(() => server.closeAllConnections(), drainMs);
    await closed;
    clearTimeout(deadline);
    await proxy.close();
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
  server.on('clientError', answerClientError);
  const { attestation } = deps;
  server.on('connection', (socket: Socket) =>
    callers.set(socket, { remoteAddress: socket.remoteAddress && plainAddress(socket.remoteAddress), cgroup: attestation?.cgroupOf(socket) }),
  );

  return {
    server,
    listen(host, port) {
      return new Promise((resolve, reject) => {
        server.once('error', reject);
        server.listen(port, host, () => {
          server.off('error', reject);
          resolve();
        });
      });
    },
    close(drainMs = limits.drainTimeoutMs) {
      stopped ??= drain(drainMs);
      return stopped;
    },
  };
}

/**
 * Step 7: the pod's identities filtered by the requested id. client_id and
 * msi_res_id compare case-insensitively (Azure ids are). The CRs carry no
 * object id, so an object_id request never matches: "Identity not found".
 * Several identities sharing the requested id are one Azure identity: the first wins.
 */
export function selectIdentity(identities: AzureIdentity[], selector?: IdSelector): AzureIdentity | 'none' | 'ambiguous' {
  if (!selector) {
    if (identities.length > 1) return 'ambiguous';
    return identities[0] ?? 'none';
  }
  const wanted = selector.value.toLowerCase();
  const field = selector.param === 'client_id' ? 'clientID' : selector.param === 'msi_res_id' ? 'resourceID' : undefined;
  const match = field && identities.find((identity) => identity[field] !== '' && identity[field].toLowerCase() === wanted);
  return match || 'none';
}

export function isUpstreamFailure(err: unknown): err is UpstreamFailure {
  return typeof err === 'object' && err !== null && (err as { code?: unknown }).code === codes.UPSTREAM && typeof (err as { kind?: unknown }).kind === 'string';
}

/** A 4xx from the upstream is the client's to see as it came; anything else after retries is 503. */
export function upstreamAnswer(err: UpstreamFailure) {
  if (err.kind === 'client' && err.status !== undefined && err.status >= 400 && err.status < 500) {
    const body = err.body ?? { error: 'invalid_request', error_description: 'The token request was refused' };
    return problemAnswer({ status: err.status, error: body.error, error_description: body.error_description });
  }
  const seconds = err.retryAfterMs === undefined ? limits.upstreamRetryAfterS : Math.max(1, Math.ceil(err.retryAfterMs / 1000));
  return problemAnswer(unavailable(seconds));
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

/** The whole answer to a request node's parser refused (llhttp error code), ending the connection. */
export function clientErrorBytes(code: string | undefined): string {
  const problem = clientErrorProblem(code);
  const body = JSON.stringify({ error: problem.error, error_description: problem.error_description });
  return (
    `HTTP/1.1 ${problem.status} ${http.STATUS_CODES[problem.status]}\r\n` +
    'Content-Type: application/json; charset=utf-8\r\n' +
    `Content-Length: ${Buffer.byteLength(body)}\r\n` +
    'Cache-Control: no-store\r\n' +
    'Connection: close\r\n\r\n' +
    body
  );
}

function clientErrorProblem(code: string | undefined): Problem {
  if (code === 'HPE_HEADER_OVERFLOW') return { status: 431, error: 'invalid_request', error_description: 'Request header fields too large' };
  if (code === 'ERR_HTTP_REQUEST_TIMEOUT') return { status: 408, error: 'invalid_request', error_description: 'Request timed out' };
  return { status: 400, error: 'invalid_request', error_description: 'Malformed HTTP request' };
}

function errorSummary(err: unknown): { code?: unknown; message: string } {
  return err instanceof Error ? { code: (err as { code?: unknown }).code, message: err.message } : { message: String(err) };
}
