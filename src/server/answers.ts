// The bytes of every answer nmi writes itself (proxied answers excepted). The
// native fast path must reproduce them exactly, so the header set is small and
// fixed, in this order:
//
//   Content-Type: application/json; charset=utf-8
//   Content-Length: <body bytes>
//   Cache-Control: no-store          (a token answer is a secret: nothing may keep it)
//   Allow: GET                       (405 only)
//   Retry-After: <seconds>           (429 and 503 only)
//
// node:http then adds Date, and Connection: keep-alive + Keep-Alive: timeout=5
// (or Connection: close). The body is compact JSON (no spaces), every value a
// string, keys in the order written here or by toAnswer.
import http, { type ServerResponse } from 'node:http';
import { toAnswer, type Token } from '../tokens/token.js';
import { limits } from '../config/limits.js';

/** An error answer: IMDS's `{"error","error_description"}` body with a status. */
export interface Problem {
  status: number;
  error: string;
  error_description: string;
  /** Seconds, for 429 and 503 answers. */
  retryAfter?: number;
  /** 405 answers name the allowed method. */
  allow?: string;
}

export interface Answer {
  status: number;
  headers: Array<[string, string]>;
  body: Buffer;
}

export function jsonAnswer(status: number, body: object, extra: { allow?: string; retryAfter?: number } = {}): Answer {
  const bytes = Buffer.from(JSON.stringify(body), 'utf8');
  const headers: Array<[string, string]> = [
    ['Content-Type', 'application/json; charset=utf-8'],
    ['Content-Length', String(bytes.length)],
    ['Cache-Control', 'no-store'],
  ];
  if (extra.allow !== undefined) headers.push(['Allow', extra.allow]);
  if (extra.retryAfter !== undefined) headers.push(['Retry-After', String(extra.retryAfter)]);
  return { status, headers, body: bytes };
}

export function problemAnswer(problem: Problem): Answer {
  const { status, error, error_description, allow, retryAfter } = problem;
  return jsonAnswer(status, { error, error_description }, { allow, retryAfter });
}

/**
 * The answer only changes when expires_in does, once a second: a busy pod's polls
 * share it. Only this second's answers are kept: one kept per cached token held its
 * body's 8 KiB Buffer pool slab alive.
 */
let recentSecond = NaN;
let recentAnswers = new Map<Token, Answer>();

/** 200 with the token as IMDS answers it; expires_in is counted now. */
export function tokenAnswer(token: Token, nowMs = Date.now()): Answer {
  const second = Math.floor(nowMs / 1000);
  if (second !== recentSecond) {
    recentSecond = second;
    recentAnswers = new Map();
  }
  let answer = recentAnswers.get(token);
  if (!answer) recentAnswers.set(token, (answer = jsonAnswer(200, toAnswer(token, nowMs))));
  return answer;
}

/**
 * 200 in aad-pod-identity's /host/token/ shape, which the Key Vault CSI provider reads: the token
 * (numbers as strings, as NMI wrote them) beside the identity's client id.
 */
export function nmiTokenAnswer(token: Token, nowMs = Date.now()): Answer {
  const { access_token, expires_in, expires_on, not_before, resource, token_type, client_id } = toAnswer(token, nowMs);
  return jsonAnswer(200, { token: { access_token, expires_in, expires_on, not_before, resource, token_type }, clientid: client_id });
}

const flatByAnswer = new WeakMap<Answer, string[]>();

function flatHeaders(answer: Answer): string[] {
  let flat = flatByAnswer.get(answer);
  if (!flat) flatByAnswer.set(answer, (flat = answer.headers.flat()));
  return flat;
}

export function writeAnswer(res: ServerResponse, answer: Answer): void {
  if (res.headersSent || res.destroyed) return;
  res.writeHead(answer.status, flatHeaders(answer));
  res.end(answer.body);
}

/** The answers of steps 6–8 and of the server itself; checks 1–5 are in request.ts. */
export const problems = {
  unknownCaller: {
    status: 404,
    error: 'not_found',
    error_description: 'No pod of this node owns the source address of the request',
  },
  /** --rules ebpf: the connection came from one pod's cgroup but another pod's address. */
  callerMismatch: {
    status: 403,
    error: 'access_denied',
    error_description: 'The calling socket does not belong to the pod that owns the source address',
  },
  /** --host-token-address: the connecting socket is not one --host-token-allow lets in. */
  hostCallerRefused: {
    status: 403,
    error: 'access_denied',
    error_description: 'The calling process is not allowed to request tokens for pods on this node',
  },
  /** --rules ebpf: no pod's cgroup made the connection. */
  callerUnattested: {
    status: 403,
    error: 'access_denied',
    error_description: 'The calling socket could not be attested to a pod of this node',
  },
  identityNotFound: { status: 400, error: 'invalid_request', error_description: 'Identity not found' },
  /** --retry-after: the binding may not have landed yet, so ask the client to come back. */
  identityNotYet: { status: 503, error: 'invalid_request', error_description: 'Identity not found', retryAfter: 20 },
  multipleIdentities: {
    status: 400,
    error: 'invalid_request',
    error_description:
      'Multiple user assigned identities exist, please specify the clientId / resourceId of the identity in the token request',
  },
  internal: { status: 500, error: 'internal_error', error_description: 'The token request could not be completed' },
  /** The bound identity's own configuration is wrong (its Secret, key or certificate): said in the log, never here. */
  identityUnusable: {
    status: 500,
    error: 'internal_error',
    error_description: "The identity bound to this pod cannot be used as configured; the node agent's log says why",
  },
  upstreamTimeout: { status: 504, error: 'gateway_timeout', error_description: 'The instance metadata service did not answer in time' },
  bodyTooLarge: { status: 413, error: 'invalid_request', error_description: 'Request body too large' },
  /** A body on the token path or on a GET or HEAD: refused before it is read. */
  bodyNotAllowed: { status: 400, error: 'invalid_request', error_description: 'A request body is not allowed here' },
  /** The caller holds --max-connections-per-source connections already: this one is answered and closed. */
  tooManyConnections: {
    status: 429,
    error: 'too_many_requests',
    error_description: 'Too many connections from this caller, retry later',
    retryAfter: limits.busyRetryAfterS,
  },
  /** The server holds as many requests waiting on the main thread as it may: retried in a second, they go through. */
  busy: {
    status: 503,
    error: 'temporarily_unavailable',
    error_description: 'The node agent is busy, retry later',
    retryAfter: limits.busyRetryAfterS,
  },
  upstreamUnreachable: { status: 502, error: 'bad_gateway', error_description: 'The instance metadata service could not be reached' },
  /** A proxied answer over limits.maxProxiedAnswerBytes: read no further, not passed on. */
  upstreamAnswerTooLarge: { status: 502, error: 'bad_gateway', error_description: 'The instance metadata service answered more than the node agent passes on' },
} as const satisfies Record<string, Problem>;

/** The token service stayed unavailable after the cache's retries. */
export function unavailable(retryAfterSeconds: number): Problem {
  return {
    status: 503,
    error: 'temporarily_unavailable',
    error_description: 'The token service is temporarily unavailable, retry later',
    retryAfter: retryAfterSeconds,
  };
}

/** IMDS's own throttling answer: a pod over its bounds, or a call that could not get its turn in the budget. */
export function throttled(retryAfterSeconds: number, description: string): Problem {
  return { status: 429, error: 'too_many_requests', error_description: description, retryAfter: retryAfterSeconds };
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

// ---- an answer's bytes, written as node:http writes them (for answers written without node:http) ----

const KEEP_ALIVE_HEADER = `timeout=${limits.keepAliveTimeoutMs / 1000}`;

/** The status line and the answer's headers in order, each line ending CRLF. */
export function statusAndHeaders(answer: Answer): string {
  let text = `HTTP/1.1 ${answer.status} ${http.STATUS_CODES[answer.status] ?? 'unknown'}\r\n`;
  for (const [name, value] of answer.headers) text += `${name}: ${value}\r\n`;
  return text;
}

/** Status line, the answer's headers in order, then Date, Connection, Keep-Alive as node adds them. */
export function serializeAnswer(answer: Answer, head: boolean, keepAlive: boolean, nowMs = Date.now()): Buffer {
  const names = new Set(answer.headers.map(([name]) => name.toLowerCase()));
  let text = statusAndHeaders(answer);
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
