// The request core both token servers share (token-server.ts's js server and
// native-server.ts), and /host/token's steps 7 and 8. Data flow of one token request:
//   request.ts (hygiene, route, checks 1–5) → caller by source address (6),
//   attested by the connection's cgroup with --rules ebpf (attest/)
//   → bound identities, filtered by the requested id (7) → getToken (8)
//   → answers.ts. Other /metadata categories (for a caller that passes step 6 only)
//   and exception pods go to proxy.ts.
import type { CgroupAttestation } from '../attest/attestation.js';
import { BudgetError, type ThrottleReason } from '../budget/budget.js';
import { identityKey, type AzureIdentity, type PodIdentities } from '../bindings/model.js';
import { codes, errorSummary, isNmiError } from '../errors/errors.js';
import type { RefusalKind, RefusalSink } from './refusal.js';
import type { CallerLookup, Pod } from '../kubelet/pod.js';
import type { Logger } from '../log/logger.js';
import type { Token } from '../tokens/token.js';
import type { UpstreamKind } from '../tokens/upstream-error.js';
import { LogLimiter } from '../util/log-limiter.js';
import { problemAnswer, problems, throttled, tokenAnswer, unavailable, type Answer, type Problem } from './answers.js';
import { limits } from '../config/limits.js';
import type { ServerMetrics } from './metrics.js';
import type { ImdsProxy, ProxyBudgets } from './proxy.js';
import { classifyRequest, type Classification, type IdSelector, type RequestHeaders, type RouteName, type TokenRequest } from './request.js';
import type { MultipleIdentities } from '../config/commands.js';
import { selectIdentity } from './select-identity.js';

export interface TokenServerOptions {
  metadataHeaderRequired: boolean;
  blockInstanceMetadata: boolean;
  retryAfter: boolean;
  multipleIdentities: MultipleIdentities;
  proxyTimeoutMs?: number;
  /** --max-connections-per-source; limits.maxConnectionsPerSource when unset. */
  maxConnectionsPerSource?: number;
}

export interface TokenServerDeps {
  /** Caller's source IPv4 → its pod (after one coalesced refresh), or undefined. */
  callers: CallerLookup;
  /** --rules ebpf: callers are the pods whose cgroups made the connections, checked against their addresses. */
  attestation?: Pick<CgroupAttestation, 'resolve' | 'resolveNow'>;
  identitiesFor(pod: Pod): PodIdentities;
  /** Resolves once what decides the pod's identities was read (its ServiceAccount, for a pod just listed): before identitiesFor on the slow path. */
  settle?(pod: Pod): Promise<void>;
  /** Cache + credential resolution for the calling pod; rejects with an UpstreamFailure when Entra ID or IMDS fails, a BudgetError when the pod is over its bounds. */
  getToken(identity: AzureIdentity, resource: string, pod: Pod): Promise<Token>;
  /** A fresh cached token without waiting, or undefined (then getToken decides); `pod`: whom it is for. */
  peekToken?(identity: AzureIdentity, resource: string, pod?: Pod): Token | undefined;
  /** The real IMDS: proxied categories and exception pods' pass-through. */
  upstreamImds: URL;
  /** Told what each pod was refused, for `nmi explain` and the pod's Events. */
  refusals?: RefusalSink;
  /** Budgets the proxied calls wait their turn in; none: they go at once. */
  proxyBudgets?: ProxyBudgets;
  options: TokenServerOptions;
  log: Logger;
  metrics?: ServerMetrics;
}

/** How getToken fails when the upstream does (the token cache defines the class; matched by shape). */
export interface UpstreamFailure {
  code: typeof codes.UPSTREAM;
  kind: UpstreamKind;
  status?: number;
  body?: { error: string; error_description: string };
  retryAfterMs?: number;
}

/** A request as the token core sees it, from either server's hand-over. */
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

/** A request read whole, as the native server and the js server's worker hand it over. */
export interface WholeRequest extends IncomingRequest {
  /** name, value, name, value... as node's rawHeaders. */
  rawHeaders: string[];
  body: Uint8Array;
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
export function createRequestCore(deps: Pick<TokenServerDeps, 'callers' | 'attestation' | 'identitiesFor' | 'settle' | 'getToken' | 'peekToken' | 'refusals' | 'options' | 'log'>): RequestCore {
  const { options, log, attestation } = deps;

  /** The hit case without a single await: a known caller with one identity and a fresh cached token. */
  function answerTokenNow({ remoteAddress, cgroup = null }: IncomingRequest, request: TokenRequest): Outcome | undefined {
    if (remoteAddress === undefined) return undefined;
    const pod = attestation ? attestation.resolveNow(remoteAddress, cgroup) : deps.callers.known?.(remoteAddress);
    if (!pod || !deps.peekToken) return undefined;
    const bound = deps.identitiesFor(pod);
    if (bound.exception) return undefined;
    const identity = selectIdentity(bound.identities, request.selector, options.multipleIdentities);
    if (typeof identity === 'string') return undefined;
    const token = deps.peekToken(identity, request.resource, pod);
    return token && tokenAnswer(token);
  }

  /** Step 6: the pod that owns the source address; with attestation, the pod whose cgroup connected, if it does. */
  async function findCaller({ remoteAddress, cgroup = null }: IncomingRequest): Promise<Pod | Problem> {
    if (remoteAddress === undefined) return problems.unknownCaller;
    const caller = attestation ? await attestation.resolve(remoteAddress, cgroup) : await deps.callers.lookup(remoteAddress);
    if (caller === 'spoof') return problems.callerMismatch;
    if (caller === 'unattested') return problems.callerUnattested;
    if (!caller) deps.refusals?.unknownCaller(remoteAddress);
    return caller ?? problems.unknownCaller;
  }

  async function answerToken(req: IncomingRequest, request: TokenRequest): Promise<Outcome> {
    const pod = await findCaller(req);
    if ('status' in pod) return problemAnswer(pod);
    await deps.settle?.(pod);
    const bound = deps.identitiesFor(pod);
    if (bound.exception) return { proxy: request.target };

    const notFound = options.retryAfter ? problems.identityNotYet : problems.identityNotFound;
    return answerIdentityToken(deps, pod, bound.identities, request, { notFound, multipleIdentities: options.multipleIdentities });
  }

  /** The other /metadata categories: a pod of this node's, as for a token (step 6); for anyone else nothing reaches IMDS. */
  async function answerProxied(req: IncomingRequest, target: string): Promise<Outcome> {
    const caller = await findCaller(req);
    return 'status' in caller ? problemAnswer(caller) : { proxy: target };
  }

  async function respond(classified: Classification, req: IncomingRequest): Promise<Outcome> {
    if (classified.kind === 'reject') return problemAnswer(classified.problem);
    if (classified.kind === 'proxy') return answerProxied(req, classified.target);
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

/** A request handed over whole: its route at once, its answer (the upstream's, when proxied) in time; the promise never rejects. */
export function answerWhole(core: RequestCore, proxy: ImdsProxy, log: Logger, request: WholeRequest): { route: RouteName; answer: Promise<Answer> } {
  const { route, outcome } = core(request);
  const answer = Promise.resolve(outcome)
    .then((result) => ('proxy' in result ? proxy.fetch(request.method, result.proxy, request.rawHeaders, Buffer.from(request.body), request.remoteAddress) : result))
    .catch((err: unknown) => {
      log.warn({ err: errorSummary(err) }, 'token server request failed');
      return problemAnswer(problems.internal);
    });
  return { route, answer };
}

/**
 * Identity lists (one per pods bound alike, new with every bindings change) whose first was served to a
 * request naming none: said once per list, not per request.
 */
const firstServed = new WeakSet<readonly AzureIdentity[]>();
/** A pod looping on an unusable identity: said once a minute per pod and identity, whichever endpoint it asks. */
const unusableSaid = new LogLimiter(60_000);

/** Steps 7 and 8, shared with /host/token: the bound identity the request names (or the policy picks), then its token. */
export async function answerIdentityToken(
  deps: Pick<TokenServerDeps, 'getToken' | 'refusals' | 'log'>,
  pod: Pod,
  identities: readonly AzureIdentity[],
  request: { resource: string; selector?: IdSelector },
  choice: { notFound: Problem; multipleIdentities: MultipleIdentities; render?: (token: Token) => Answer },
): Promise<Answer> {
  const refuse = (kind: RefusalKind, problem: Problem, about: { identity?: AzureIdentity; cause?: string } = {}): Answer => {
    const { status, error, error_description } = problem;
    const identity = about.identity && identityKey(about.identity);
    deps.refusals?.refused(pod, kind, { status, error, error_description, resource: request.resource, identity, cause: about.cause });
    return problemAnswer(problem);
  };
  const identity = selectIdentity(identities, request.selector, choice.multipleIdentities);
  if (identity === 'none') return refuse('no-identity', choice.notFound, { cause: request.selector && `no bound identity has ${request.selector.param} ${request.selector.value}` });
  if (identity === 'ambiguous') return refuse('several-identities', problems.multipleIdentities);
  if (!request.selector && identities.length > 1 && !firstServed.has(identities)) {
    firstServed.add(identities);
    deps.log.info(
      { namespace: pod.namespace, pod: pod.name, served: identityKey(identity), bound: identities.map(identityKey) },
      'several identities bound and none requested: serving the first (--multiple-identities first)',
    );
  }
  let token: Token;
  try {
    token = await deps.getToken(identity, request.resource, pod);
  } catch (err) {
    if (err instanceof BudgetError) return refuse('budget', budgetProblem(err), { identity, cause: err.message });
    // Its Secret or certificate, named in the message (never a value): the operator's to fix, the pod's to retry.
    if (isNmiError(err, codes.BINDINGS) || isNmiError(err, codes.TOKEN)) {
      const key = identityKey(identity);
      if (unusableSaid.due(`${pod.uid}\0${key}`)) deps.log.warn({ namespace: pod.namespace, pod: pod.name, identity: key, err: errorSummary(err) }, 'the bound identity cannot be used');
      return refuse('identity-unusable', problems.identityUnusable, { identity, cause: err.message });
    }
    if (!isUpstreamFailure(err)) throw err;
    deps.log.debug({ kind: err.kind, status: err.status, identity: identity.name, namespace: identity.namespace }, 'token upstream failed');
    const problem = upstreamProblem(err);
    return refuse(problem.status < 500 ? 'upstream-refused' : 'upstream-unavailable', problem, { identity, cause: `${err.kind} failure upstream${err.status ? ` (${err.status})` : ''}` });
  }
  return (choice.render ?? tokenAnswer)(token);
}

/** What a pod reads when it is over its bounds or the budget could not give its call a turn in time. */
const budgetDescriptions: Record<ThrottleReason, string> = {
  'pod-tokens': 'Too many distinct tokens requested by this pod, retry later',
  'pod-pending': 'Too many token requests from this pod are waiting, retry later',
  'queue-timeout': 'Too many requests on this node, retry later',
};

function budgetProblem(err: BudgetError): Problem {
  return throttled(err.retryAfterS, budgetDescriptions[err.reason]);
}

export function isUpstreamFailure(err: unknown): err is UpstreamFailure {
  return typeof err === 'object' && err !== null && (err as { code?: unknown }).code === codes.UPSTREAM && typeof (err as { kind?: unknown }).kind === 'string';
}

/** A 4xx from the upstream is the client's to see as it came; anything else after retries is 503. */
function upstreamProblem(err: UpstreamFailure): Problem {
  if (err.kind === 'client' && err.status !== undefined && err.status >= 400 && err.status < 500) {
    const body = err.body ?? { error: 'invalid_request', error_description: 'The token request was refused' };
    return { status: err.status, error: body.error, error_description: body.error_description };
  }
  const seconds = err.retryAfterMs === undefined ? limits.upstreamRetryAfterS : Math.max(1, Math.ceil(err.retryAfterMs / 1000));
  return unavailable(seconds);
}
