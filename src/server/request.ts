// What a request is, from its method, raw request-target and headers alone (no
// I/O): path hygiene first, then the route, then the token endpoint's checks
// 1–5 in the contract's order. Steps 6–8 need the caller and live in
// core.ts.
import type { Problem } from './answers.js';

export const TOKEN_PATH = '/metadata/identity/oauth2/token';
export const PROXY_CATEGORIES = ['instance', 'versions', 'attested', 'loadbalancer', 'scheduledevents'] as const;
export type ProxyCategory = (typeof PROXY_CATEGORIES)[number];
/** Bounded on purpose: it labels metrics. */
export type RouteName = 'token' | ProxyCategory | 'other';

/** IMDS api-versions that serve identity tokens (2018-02-01 onwards); the native server takes this list at start (native-server.ts). */
export const IDENTITY_API_VERSIONS: ReadonlySet<string> = new Set([
  '2018-02-01', '2019-03-11', '2019-06-01', '2019-06-04', '2019-08-01', '2019-08-15', '2019-11-01',
  '2020-06-01', '2020-07-15', '2020-09-01', '2020-10-01', '2020-12-01', '2021-01-01', '2021-02-01',
  '2021-03-01', '2021-05-01', '2021-08-01', '2021-10-01', '2021-11-01', '2021-11-15', '2021-12-13',
  '2022-02-01', '2022-03-01', '2022-07-01', '2022-08-01', '2022-09-01', '2023-07-01', '2023-11-15',
  '2024-03-15', '2024-07-17', '2025-04-07',
]);

/** Which identity the caller asked for; `mi_res_id` arrives as `msi_res_id`. */
export interface IdSelector {
  param: 'client_id' | 'object_id' | 'msi_res_id';
  value: string;
}

export interface TokenRequest {
  /** The raw request-target, for the pass-through of exception pods. */
  target: string;
  apiVersion: string;
  resource: string;
  selector?: IdSelector;
}

export type Classification =
  | { kind: 'reject'; route: RouteName; problem: Problem }
  | { kind: 'token'; route: 'token'; request: TokenRequest }
  | { kind: 'proxy'; route: ProxyCategory; target: string };

export interface RequestPolicy {
  metadataHeaderRequired: boolean;
  blockInstanceMetadata: boolean;
}

/** node:http's req.headers: lower-case names, repeated values joined or listed. */
export type RequestHeaders = Readonly<Record<string, string | string[] | undefined>>;

const ID_PARAMS = ['client_id', 'object_id', 'msi_res_id', 'mi_res_id'] as const;

const bad = (error: string, error_description: string, status = 400): Problem => ({ status, error, error_description });

/** The texts of every check, so tests and the native path compare against one place. */
export const checks = {
  target: bad('invalid_request', 'Invalid request target: only an absolute path is accepted'),
  backslash: bad('invalid_request', 'Invalid request path: backslashes are not allowed'),
  encodedSlash: bad('invalid_request', 'Invalid request path: encoded slashes are not allowed'),
  doubledSlash: bad('invalid_request', 'Invalid request path: doubled slashes are not allowed'),
  dotSegment: bad('invalid_request', 'Invalid request path: dot segments are not allowed'),
  badEscape: bad('invalid_request', 'Invalid request path: malformed percent-encoding'),
  notFound: bad('not_found', 'The requested metadata path was not found', 404),
  blocked: bad('forbidden', 'Access to instance metadata is blocked on this node', 403),
  method: { ...bad('method_not_allowed', 'Only GET is allowed on the token endpoint', 405), allow: 'GET' },
  metadataHeader: bad('invalid_request', 'Required metadata header not specified'),
  forwarded: bad('invalid_request', 'Forwarded requests are not allowed: X-Forwarded-For, Forwarded or Via header present'),
  badQuery: bad('invalid_request', 'Malformed query string'),
  apiVersionMissing: bad('bad_request', 'Required api-version parameter not specified'),
  apiVersionBad: bad('bad_request', 'Invalid or bad API version specified'),
  resourceMissing: bad('invalid_request', 'Required audience parameter not specified'),
  duplicate: bad('invalid_request', 'A query parameter is specified more than once'),
  twoIds: bad('invalid_request', 'Only one of client_id, object_id, msi_res_id or mi_res_id may be specified'),
  emptyId: bad('invalid_request', 'The identity parameter (client_id, object_id, msi_res_id or mi_res_id) is empty'),
} as const satisfies Record<string, Problem>;

/** What a request-target alone decides; the same target is parsed once (pods poll with identical URLs). */
interface ParsedTarget {
  problem?: Problem;
  route: RouteName;
  /** Token route: what checks 4-5 on the query decide, returned as is once the header checks 1-3 pass. */
  query?: Classification;
}

const MEMO_LIMIT = 1024;
const parsedTargets = new Map<string, ParsedTarget>();

function parseTarget(target: string): ParsedTarget {
  const memo = parsedTargets.get(target);
  if (memo) return memo;
  let parsed: ParsedTarget;
  if (!target.startsWith('/')) parsed = { problem: checks.target, route: 'other' };
  else {
    const queryAt = target.indexOf('?');
    const path = queryAt < 0 ? target : target.slice(0, queryAt);
    const problem = pathProblem(path);
    const route = problem ? 'other' : routeOf(path);
    parsed = problem ? { problem, route } : { route, ...(route === 'token' ? { query: classifyTokenQuery(target, queryAt < 0 ? '' : target.slice(queryAt + 1)) } : {}) };
  }
  if (parsedTargets.size >= MEMO_LIMIT) parsedTargets.clear();
  parsedTargets.set(target, parsed);
  return parsed;
}

export function classifyRequest(method: string, target: string, headers: RequestHeaders, policy: RequestPolicy): Classification {
  const { problem, route, query } = parseTarget(target);
  if (problem) return { kind: 'reject', route, problem };
  if (route === 'token') {
    const headerProblem = checkTokenHeaders(method, headers, policy);
    return headerProblem ? { kind: 'reject', route, problem: headerProblem } : (query as Classification);
  }
  if (route === 'other') return { kind: 'reject', route, problem: checks.notFound };
  if (route === 'instance' && policy.blockInstanceMetadata) return { kind: 'reject', route, problem: checks.blocked };
  return { kind: 'proxy', route, target };
}

/** Spellings that different parsers resolve differently are refused, so nmi and the upstream see one path. */
export function pathProblem(path: string): Problem | undefined {
  if (path.includes('\\')) return checks.backslash;
  if (/%(2f|5c)/i.test(path)) return checks.encodedSlash;
  if (path.includes('//')) return checks.doubledSlash;
  if (path.split('/').some((segment) => /^(\.|%2e){1,2}$/i.test(segment))) return checks.dotSegment;
  if (/%(?![0-9a-f]{2})/i.test(path)) return checks.badEscape;
  return undefined;
}

export function routeOf(path: string): RouteName {
  if (path === TOKEN_PATH || path === `${TOKEN_PATH}/`) return 'token';
  const match = /^\/metadata\/([a-z]+)(\/|$)/.exec(path);
  const category = PROXY_CATEGORIES.find((name) => name === match?.[1]);
  return category ?? 'other';
}

/** Checks 1–5 of the contract, in its order; the first failure wins. */
export function checkTokenRequest(
  method: string,
  query: string,
  headers: RequestHeaders,
  policy: Pick<RequestPolicy, 'metadataHeaderRequired'>,
): Problem | Omit<TokenRequest, 'target'> {
  return checkTokenHeaders(method, headers, policy) ?? checkTokenQuery(query);
}

/**
 * The request headers checks 1-3 read, and the two that say whether a body follows (refused on the token
 * path and on GETs before it is read); no other header decides an answer nmi writes itself.
 */
const CHECKED_HEADERS: ReadonlySet<string> = new Set(['metadata', 'x-forwarded-for', 'forwarded', 'via', 'content-length', 'transfer-encoding']);
const CHECKED_LENGTHS: ReadonlySet<number> = new Set([...CHECKED_HEADERS].map((name) => name.length));

/**
 * The checked headers from node's rawHeaders, repeats joined with ", " as
 * req.headers joins them. Reading req.headers makes node build an object of
 * every header, which costs a cache hit more than this.
 */
export function checkedHeaders(rawHeaders: readonly string[]): RequestHeaders {
  const headers: Record<string, string> = {};
  for (let i = 0; i + 1 < rawHeaders.length; i += 2) {
    const raw = rawHeaders[i]!;
    if (!CHECKED_LENGTHS.has(raw.length)) continue;
    const name = raw.toLowerCase();
    if (!CHECKED_HEADERS.has(name)) continue;
    const seen = headers[name];
    headers[name] = seen === undefined ? rawHeaders[i + 1]! : `${seen}, ${rawHeaders[i + 1]!}`;
  }
  return headers;
}

/** Checks 1–3: method, Metadata header (before any lookup), no forwarding headers. */
function checkTokenHeaders(method: string, headers: RequestHeaders, policy: Pick<RequestPolicy, 'metadataHeaderRequired'>): Problem | undefined {
  if (method !== 'GET') return checks.method;
  if (policy.metadataHeaderRequired && !isTrue(headers['metadata'])) return checks.metadataHeader;
  // X-Forwarded-For, Forwarded, Via: spelled out, no closure, as this runs for every request.
  if (headers['x-forwarded-for'] !== undefined || headers['forwarded'] !== undefined || headers['via'] !== undefined) return checks.forwarded;
  return undefined;
}

/** Checks 4-5 as a classification of the whole target, so the memo holds the very object a request gets. */
function classifyTokenQuery(target: string, query: string): Classification {
  const checked = checkTokenQuery(query);
  return 'status' in checked ? { kind: 'reject', route: 'token', problem: checked } : { kind: 'token', route: 'token', request: { ...checked, target } };
}

/** Checks 4–5, on the query alone. */
function checkTokenQuery(query: string): Problem | Omit<TokenRequest, 'target'> {
  const params = parseQuery(query);
  if (!params) return checks.badQuery;
  // A repeated api-version or resource is judged by its first value here and refused as a duplicate below.
  const apiVersion = params.get('api-version')?.[0];
  if (apiVersion === undefined) return checks.apiVersionMissing;
  if (!IDENTITY_API_VERSIONS.has(apiVersion)) return checks.apiVersionBad;
  const target = resourceAndSelector(params);
  return 'status' in target ? target : { apiVersion, ...target };
}

/** The end of check 5, shared with /host/token: resource present, no duplicated parameter, at most one id. */
export function resourceAndSelector(params: Map<string, string[]>): Problem | { resource: string; selector?: IdSelector } {
  const resource = params.get('resource')?.[0];
  if (!resource) return checks.resourceMissing;
  if ([...params.values()].some((values) => values.length > 1)) return checks.duplicate;
  const given = ID_PARAMS.filter((name) => params.has(name));
  if (given.length > 1) return checks.twoIds;
  const [name] = given;
  if (name === undefined) return { resource };
  const value = params.get(name)?.[0] ?? '';
  if (value === '') return checks.emptyId;
  return { resource, selector: { param: name === 'mi_res_id' ? 'msi_res_id' : name, value } };
}

/**
 * application/x-www-form-urlencoded as URLSearchParams reads it ('&' separates,
 * the first '=' splits, '+' is a space), but strict: a malformed escape or
 * invalid UTF-8 gives undefined instead of being kept or replaced.
 */
export function parseQuery(query: string): Map<string, string[]> | undefined {
  const params = new Map<string, string[]>();
  for (const pair of query.split('&')) {
    if (pair === '') continue;
    const eq = pair.indexOf('=');
    const name = decodeComponent(eq < 0 ? pair : pair.slice(0, eq));
    const value = decodeComponent(eq < 0 ? '' : pair.slice(eq + 1));
    if (name === undefined || value === undefined) return undefined;
    const values = params.get(name);
    if (values) values.push(value);
    else params.set(name, [value]);
  }
  return params;
}

function decodeComponent(text: string): string | undefined {
  try {
    return decodeURIComponent(text.replaceAll('+', ' '));
  } catch {
    return undefined;
  }
}

function isTrue(value: string | string[] | undefined): boolean {
  return typeof value === 'string' && value.toLowerCase() === 'true';
}
