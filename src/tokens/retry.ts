// Which failed token calls are tried again, and when; which failures are
// remembered instead, because asking again soon would not change them.
import { codes, isNmiError } from '../errors/errors.js';
import { UpstreamError } from './upstream-error.js';

export interface RetryOptions {
  /** Upstream calls per fetch, the first included. */
  attempts?: number;
  baseDelayMs?: number;
  maxDelayMs?: number;
  /** No retry starts once this much time has gone since the first attempt. */
  retryWindowMs?: number;
  /** The same for IMDS being updated (its 404 and 410), retried without a count: IMDS documents 70 s. */
  updatingRetryWindowMs?: number;
}

export const retryDefaults: Required<RetryOptions> = { attempts: 4, baseDelayMs: 250, maxDelayMs: 4_000, retryWindowMs: 10_000, updatingRetryWindowMs: 70_000 };

/**
 * How long to wait before the next attempt, or undefined for none: not retryable, past the count, or
 * when it would end past the retry window. Full jitter on half the exponential step; the upstream's Retry-After wins.
 */
export function retryDelay(retry: Required<RetryOptions>, err: unknown, attempt: number, elapsedMs: number, random: () => number): number | undefined {
  if (!(err instanceof UpstreamError) || !err.retryable) return undefined;
  const updating = err.kind === 'updating';
  if (!updating && attempt >= retry.attempts) return undefined;
  const ceiling = Math.min(retry.maxDelayMs, retry.baseDelayMs * 2 ** (attempt - 1));
  const delay = err.retryAfterMs ?? Math.round(ceiling * (0.5 + random() / 2));
  return elapsedMs + delay > (updating ? retry.updatingRetryWindowMs : retry.retryWindowMs) ? undefined : delay;
}

/**
 * A failure that asking again soon would not change: the issuer's rejection (4xx), or an identity its Secret or
 * certificate makes unusable (NmiError BINDINGS or TOKEN) until the bindings change, which drops the entry.
 */
export function lasting(err: unknown): boolean {
  return (err instanceof UpstreamError && err.kind === 'client') || isNmiError(err, codes.BINDINGS) || isNmiError(err, codes.TOKEN);
}
