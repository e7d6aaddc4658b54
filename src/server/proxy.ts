// Forwards a request to the real IMDS unchanged: same method, path, query,
// body and end-to-end headers (Metadata included). Hop-by-hop headers are
// dropped and nothing is added: no X-Forwarded-For, Forwarded or Via, which
// IMDS would refuse. Only the upstream URL's origin is used. Each call waits
// its turn in IMDS's budget: the identity endpoint's (exception pods' token
// requests) or the other categories' general one. An answer is passed on only up to
// limits.maxProxiedAnswerBytes: past that it is read no further.
import { BudgetError, type UpstreamBudget } from '../budget/budget.js';
import { Pool, type Dispatcher } from '../net/undici.js';
import { problemAnswer, problems, throttled, type Answer, type Problem } from './answers.js';
import { limits } from '../config/limits.js';
import { parseRetryAfter } from '../tokens/upstream-error.js';
import { TOKEN_PATH } from './request.js';

export interface ImdsProxy {
  /**
   * The upstream's answer, whole, to `target` (a raw origin-form request-target) asked as the request was: both
   * servers pass requests on read whole. `podKey` (here the caller's address) is whose queue the call waits in.
   */
  fetch(method: string, target: string, rawHeaders: string[], body: Buffer, podKey?: string): Promise<Answer>;
  /** Waits for requests under way to finish, then closes upstream connections. */
  close(): Promise<void>;
}

export interface ProxyOptions {
  upstream: URL;
  /** Bounds connecting, waiting for the answer's headers, and each pause in its body. */
  timeoutMs: number;
  budgets?: ProxyBudgets;
}

export interface ProxyBudgets {
  /** IMDS's identity endpoint. */
  identity: UpstreamBudget;
  /** IMDS's other categories. */
  metadata: UpstreamBudget;
}

/** Connection-scoped headers (RFC 9110 7.6.1), plus Host (undici sets it) and Expect (undici refuses it). */
const HOP_BY_HOP = new Set([
  'connection', 'keep-alive', 'proxy-connection', 'te', 'trailer', 'transfer-encoding', 'upgrade',
  'proxy-authenticate', 'proxy-authorization', 'host', 'expect',
]);
const TIMEOUT_CODES = new Set(['UND_ERR_CONNECT_TIMEOUT', 'UND_ERR_HEADERS_TIMEOUT', 'UND_ERR_BODY_TIMEOUT']);

export function createImdsProxy({ upstream, timeoutMs, budgets }: ProxyOptions): ImdsProxy {
  const pool = new Pool(upstream.origin, {
    connections: 32,
    connect: { timeout: timeoutMs },
    headersTimeout: timeoutMs,
    bodyTimeout: timeoutMs,
  });

  /** The upstream's answer, or the IMDS-shaped answer for why there is none. */
  async function send(options: Omit<Parameters<Pool['request']>[0], 'path'> & { target: string }): Promise<Awaited<ReturnType<Pool['request']>> | Answer> {
    const { target, ...rest } = options;
    try {
      return await pool.request({ ...rest, path: target });
    } catch (err) {
      return problemAnswer(failure(err));
    }
  }

  /** The answer, and for an upstream 429 how long the budget pauses: its Retry-After, or 0 for the budget's default. */
  async function forward(method: string, target: string, rawHeaders: string[], body: Buffer): Promise<{ answer: Answer; throttledMs?: number }> {
    const answer = await send({ method: method as Dispatcher.HttpMethod, target, headers: endToEnd(rawHeaders), body: body.length > 0 ? body : null });
    if ('status' in answer) return { answer };
    const kept = endToEndObject(answer.headers);
    const headers = Object.entries(kept).flatMap(([name, value]) => [value].flat().map((one): [string, string] => [name, one]));
    const whole = await readBounded(answer.body, answer.headers['content-length']);
    if (!Buffer.isBuffer(whole)) return { answer: problemAnswer(whole) };
    const result = { answer: { status: answer.statusCode, headers, body: whole } };
    if (answer.statusCode !== 429) return result;
    const retryAfter = [kept['retry-after']].flat()[0];
    return { ...result, throttledMs: parseRetryAfter(retryAfter, Date.now()) ?? 0 };
  }

  return {
    async fetch(method, target, rawHeaders, body, podKey = '') {
      if (!budgets) return (await forward(method, target, rawHeaders, body)).answer;
      const budget = target.startsWith(`${TOKEN_PATH}?`) || target.startsWith(`${TOKEN_PATH}/`) ? budgets.identity : budgets.metadata;
      let release;
      try {
        budget.admit(podKey);
        release = await budget.request({ kind: 'first', pods: [podKey] }).granted;
      } catch (err) {
        if (err instanceof BudgetError) return problemAnswer(throttled(err.retryAfterS, 'Too many metadata requests from this caller are waiting, retry later'));
        throw err;
      }
      let result;
      try {
        result = await forward(method, target, rawHeaders, body);
      } finally {
        release(result?.throttledMs !== undefined ? { throttledMs: result.throttledMs } : undefined);
      }
      return result.answer;
    },
    close: () => pool.close(),
  };
}

/** Why an upstream call gave no answer: it timed out (504) or failed otherwise (502). */
function failure(err: unknown): Problem {
  return TIMEOUT_CODES.has(String((err as { code?: unknown }).code)) ? problems.upstreamTimeout : problems.upstreamUnreachable;
}

/**
 * The answer's body whole, or why not: one larger than limits.maxProxiedAnswerBytes (as declared, or as it
 * streams in) is destroyed unread past that point, so a broken or hostile upstream cannot fill nmi's memory.
 */
async function readBounded(body: Dispatcher.ResponseData['body'], declaredLength: string | string[] | undefined): Promise<Buffer | Problem> {
  if (Number(declaredLength) > limits.maxProxiedAnswerBytes) {
    body.destroy();
    return problems.upstreamAnswerTooLarge;
  }
  const chunks: Buffer[] = [];
  let size = 0;
  try {
    for await (const chunk of body as AsyncIterable<Buffer>) {
      size += chunk.length;
      if (size > limits.maxProxiedAnswerBytes) {
        body.destroy();
        return problems.upstreamAnswerTooLarge;
      }
      chunks.push(chunk);
    }
  } catch (err) {
    return failure(err);
  }
  return Buffer.concat(chunks, size);
}

/** rawHeaders (name, value, name, value...) minus hop-by-hop ones and those the Connection header names. */
function endToEnd(rawHeaders: string[]): string[] {
  const drop = connectionScoped(rawHeaders);
  const kept: string[] = [];
  for (let i = 0; i + 1 < rawHeaders.length; i += 2) {
    const name = rawHeaders[i]!;
    if (!drop.has(name.toLowerCase())) kept.push(name, rawHeaders[i + 1]!);
  }
  return kept;
}

function connectionScoped(rawHeaders: string[]): Set<string> {
  const drop = new Set(HOP_BY_HOP);
  for (let i = 0; i + 1 < rawHeaders.length; i += 2) {
    if (rawHeaders[i]!.toLowerCase() !== 'connection') continue;
    for (const token of rawHeaders[i + 1]!.split(',')) drop.add(token.trim().toLowerCase());
  }
  return drop;
}

function endToEndObject(headers: Record<string, string | string[] | undefined>): Record<string, string | string[]> {
  const named = headers['connection'];
  const drop = connectionScoped(named === undefined ? [] : ['connection', [named].flat().join(',')]);
  const kept: Record<string, string | string[]> = {};
  for (const [name, value] of Object.entries(headers)) {
    if (value !== undefined && !drop.has(name)) kept[name] = value;
  }
  return kept;
}
