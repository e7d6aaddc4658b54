// /host/token for processes of the node itself, which name the pod they act
// for (headers `podns`, `podname`). aad-pod-identity's NMI served it on TCP, so
// any host process could get any pod's token. Here it is served two ways:
// - `--host-token-socket`: a unix socket only root can connect to, answering in
//   IMDS's shape;
// - `--host-token-address`: TCP at NMI's address in NMI's shape, for the Key
//   Vault CSI provider, every connection attested first (attest/host-callers.ts)
//   and refused 403 unless --host-token-allow lets its process in.
// Data flow: (TCP: the caller's verdict) → checkHostRequest (path, method,
// headers, query) → findPod → identitiesFor → selectIdentity → getToken → answers.ts.
//
// Who may connect to the socket: private-socket.ts.
import { once } from 'node:events';
import http from 'node:http';
import net from 'node:net';
import type { HostVerdict } from '../attest/host-callers.js';
import type { AzureIdentity, PodIdentities } from '../bindings/model.js';
import type { HostPort } from '../config/values.js';
import { messageOf } from '../errors/errors.js';
import type { Pod } from '../kubelet/pod.js';
import type { Logger } from '../log/logger.js';
import type { Token } from '../tokens/token.js';
import { nmiTokenAnswer, problemAnswer, problems, tokenAnswer, writeAnswer, type Answer, type Problem } from './answers.js';
import { checks, parseQuery, pathProblem, resourceAndSelector, type IdSelector, type RequestHeaders } from './request.js';
import { limits } from '../config/limits.js';
import type { MultipleIdentities } from '../config/commands.js';
import type { RefusalSink } from './refusal.js';
import { answerIdentityToken } from './core.js';
import { drainable } from './drain.js';
import { bindHostTokenSocket, verifyHostTokenSocket } from './private-socket.js';

export const HOST_TOKEN_PATH = '/host/token';

export interface HostTokenDeps {
  /** The live pod named by `podns`/`podname` (after at most one coalesced kubelet refresh), or undefined when this node has none such. */
  findPod(namespace: string, name: string): Promise<Pod | undefined>;
  identitiesFor(pod: Pod): PodIdentities;
  /** As on the token endpoint: what decides the pod's identities is read first. */
  settle?(pod: Pod): Promise<void>;
  /** Cache + credential resolution; rejects with an UpstreamFailure when Entra ID or IMDS fails. */
  getToken(identity: AzureIdentity, resource: string, pod: Pod): Promise<Token>;
  /** Told what each pod was refused, as the token endpoint tells it. */
  refusals?: RefusalSink;
  /** --multiple-identities, as on the token endpoint. */
  multipleIdentities: MultipleIdentities;
  log: Logger;
}

export interface HostTokenServerDeps extends HostTokenDeps {
  socketPath: string;
  /** The socket as src/lifecycle/listeners.ts holds it (bindHostTokenSocket's, or adopted), owned by the server once it listens. */
  fd?: number;
}

export interface HostTokenTcpDeps extends HostTokenDeps {
  address: HostPort;
  /** A listener held for the process (src/lifecycle/listeners.ts), owned by the server once it listens; else it binds `address`. */
  fd?: number;
  /** The verdict on one accepted connection (attest/host-callers.ts); never rejects. */
  admit(socket: net.Socket): Promise<HostVerdict>;
}

export interface HostTokenServer {
  /** Binds (the socket 0600, and verified); rejects with a UsageError when the socket's path cannot be made private. */
  listen(): Promise<void>;
  /** Stops accepting, lets in-flight requests finish (at most limits.drainTimeoutMs); a unix socket's file stays (daemon.ts removes it when nothing holds the socket on). Idempotent. */
  close(): Promise<void>;
}

export interface HostTokenRequest {
  namespace: string;
  name: string;
  resource: string;
  selector?: IdSelector;
}

const bad = (error: string, error_description: string, status = 400): Problem => ({ status, error, error_description });

/** The texts of this endpoint's own answers; the query checks are request.ts's. */
export const hostChecks = {
  notFound: bad('not_found', 'The requested path was not found', 404),
  method: { ...bad('method_not_allowed', 'Only GET is allowed on the host token endpoint', 405), allow: 'GET' },
  headerMissing: (name: string) => bad('invalid_request', `Required header ${name} not specified`),
  headerRepeated: (name: string) => bad('invalid_request', `Header ${name} is specified more than once`),
  podNotFound: (namespace: string, name: string) => bad('not_found', `Pod ${namespace}/${name} not found on this node`, 404),
} as const;

/** The socket: root only, IMDS's shape. */
export function createHostTokenServer(deps: HostTokenServerDeps): HostTokenServer {
  const { socketPath, log } = deps;
  const server = hostHttpServer(deps, (req) => answerHost(deps, req, tokenAnswer));
  return closingOnce(server, async () => {
    // Adopted (a restart's or a predecessor's): the file is checked again, it may have been changed since.
    let fd = deps.fd;
    if (fd === undefined) fd = await bindHostTokenSocket(socketPath);
    else await verifyHostTokenSocket(socketPath);
    await once(server.listen({ fd }), 'listening');
    log.info({ socket: socketPath }, 'host token socket listening');
  });
}

/** TCP: NMI's shape, for callers --host-token-allow lets in; the verdict is reached once per connection, when it is accepted. */
export function createHostTokenTcpServer(deps: HostTokenTcpDeps): HostTokenServer {
  const { address, log } = deps;
  const verdicts = new WeakMap<net.Socket, Promise<HostVerdict>>();
  const server = hostHttpServer(deps, async (req) => {
    const verdict = await (verdicts.get(req.socket) ?? deps.admit(req.socket));
    if (!verdict.allowed) return problemAnswer(problems.hostCallerRefused);
    return answerHost(deps, req, nmiTokenAnswer);
  });
  server.on('connection', (socket: net.Socket) => verdicts.set(socket, deps.admit(socket)));
  return closingOnce(server, async () => {
    await once(deps.fd === undefined ? server.listen(address.port, address.host) : server.listen({ fd: deps.fd }), 'listening');
    log.info({ address: `${address.host}:${address.port}` }, 'host token endpoint listening');
  });
}

async function answerHost(deps: HostTokenDeps, req: http.IncomingMessage, render: (token: Token) => Answer): Promise<Answer> {
  const checked = checkHostRequest(req.method ?? '', req.url ?? '', req.headersDistinct);
  if ('status' in checked) return problemAnswer(checked);
  const pod = await deps.findPod(checked.namespace, checked.name);
  if (!pod) return problemAnswer(hostChecks.podNotFound(checked.namespace, checked.name));
  await deps.settle?.(pod);
  return answerIdentityToken(deps, pod, deps.identitiesFor(pod).identities, checked, { notFound: problems.identityNotFound, multipleIdentities: deps.multipleIdentities, render });
}

function hostHttpServer(deps: HostTokenDeps, answer: (req: http.IncomingMessage) => Promise<Answer>): http.Server {
  return http.createServer(
    {
      maxHeaderSize: limits.maxHeaderSize,
      headersTimeout: limits.headersTimeoutMs,
      requestTimeout: limits.requestTimeoutMs,
      keepAliveTimeout: limits.keepAliveTimeoutMs,
    },
    (req, res) => {
      answer(req).then(
        (result) => writeAnswer(res, result),
        (err: unknown) => {
          deps.log.warn({ err: messageOf(err) }, 'host token request failed');
          writeAnswer(res, problemAnswer(problems.internal));
        },
      );
    },
  );
}

/** The socket's file stays when its server closes: a restart's nmi takes it over; until then nothing answers there. */
function closingOnce(server: http.Server, listen: () => Promise<void>): HostTokenServer {
  let stopped: Promise<void> | undefined;
  const drain = drainable(server);
  return {
    listen,
    close() {
      stopped ??= drain.drain(limits.drainTimeoutMs);
      return stopped;
    },
  };
}

/** Path, method, headers and query of one request (no I/O); the first failure wins. */
export function checkHostRequest(method: string, target: string, headers: RequestHeaders): Problem | HostTokenRequest {
  if (!target.startsWith('/')) return checks.target;
  const queryAt = target.indexOf('?');
  const pathname = queryAt < 0 ? target : target.slice(0, queryAt);
  const hygiene = pathProblem(pathname);
  if (hygiene) return hygiene;
  if (pathname !== HOST_TOKEN_PATH && pathname !== `${HOST_TOKEN_PATH}/`) return hostChecks.notFound;
  if (method !== 'GET') return hostChecks.method;

  const namespace = singleHeader(headers, 'podns');
  if (typeof namespace !== 'string') return namespace;
  const name = singleHeader(headers, 'podname');
  if (typeof name !== 'string') return name;

  const params = parseQuery(queryAt < 0 ? '' : target.slice(queryAt + 1));
  if (!params) return checks.badQuery;
  const wanted = resourceAndSelector(params);
  return 'status' in wanted ? wanted : { namespace, name, ...wanted };
}

/** req.headersDistinct keeps repeated headers apart, so a second `podns` cannot hide behind a join. */
function singleHeader(headers: RequestHeaders, name: string): string | Problem {
  const value = headers[name];
  const values = typeof value === 'string' ? [value] : (value ?? []);
  if (values.length > 1) return hostChecks.headerRepeated(name);
  const [only] = values;
  return only ? only : hostChecks.headerMissing(name);
}
