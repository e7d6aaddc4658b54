// What went wrong talking to the token issuer (IMDS or Entra ID), classified so
// the cache knows what to retry and the server knows what to answer the pod.
import { codes, NmiError } from '../errors/errors.js';
import { limits } from '../config/limits.js';

/**
 * - `client`: a 4xx other than 429; passed on to the pod as it came, never retried.
 * - `throttled`: 429; retried, honouring Retry-After.
 * - `updating`: IMDS's 404 or 410, which it documents as "being updated" (410: back within 70 s);
 *   retried for longer than the others (retry.ts's updatingRetryWindowMs).
 * - `server`: 5xx, or a 2xx the issuer got wrong; retried.
 * - `timeout`, `network`: no answer; retried.
 */
export type UpstreamKind = 'client' | 'throttled' | 'updating' | 'server' | 'timeout' | 'network';

export const upstreamKinds: readonly UpstreamKind[] = ['client', 'throttled', 'updating', 'server', 'timeout', 'network'];

/** The issuer's own error, as IMDS and Entra ID both spell it. */
export interface UpstreamErrorBody {
  error: string;
  error_description: string;
}

export interface UpstreamErrorDetails {
  /** The issuer's HTTP status, when it answered. */
  status?: number;
  body?: UpstreamErrorBody;
  /** From the issuer's Retry-After header. */
  retryAfterMs?: number;
  cause?: unknown;
}

export class UpstreamError extends NmiError {
  readonly kind: UpstreamKind;
  readonly status: number | undefined;
  readonly body: UpstreamErrorBody | undefined;
  readonly retryAfterMs: number | undefined;

  constructor(kind: UpstreamKind, message: string, details: UpstreamErrorDetails = {}) {
    super(codes.UPSTREAM, message, { cause: details.cause });
    this.name = 'UpstreamError';
    this.kind = kind;
    this.status = details.status;
    this.body = details.body;
    this.retryAfterMs = details.retryAfterMs;
  }

  /** Worth another attempt: the issuer may answer differently later. */
  get retryable(): boolean {
    return this.kind !== 'client';
  }
}

/** Who issues a token: IMDS for managed identities, Entra ID for service principals. */
export type Issuer = 'IMDS' | 'Entra ID';

/** IMDS's 404 and 410 mean it is being updated; Entra ID's are the client's. */
export function kindForStatus(status: number, issuer: Issuer): UpstreamKind {
  if (status === 429) return 'throttled';
  if (issuer === 'IMDS' && (status === 404 || status === 410)) return 'updating';
  if (status >= 400 && status < 500) return 'client';
  return 'server';
}

/**
 * Retry-After as delay-seconds or an HTTP date, in ms, at most limits.maxRetryAfterMs: an upstream asking
 * for a day must not stop the node (or its pods, told it again) that long. Undefined when absent or unreadable.
 */
export function parseRetryAfter(value: string | undefined, nowMs: number): number | undefined {
  if (!value) return undefined;
  const trimmed = value.trim();
  const ms = /^\d+$/.test(trimmed) ? Number(trimmed) * 1000 : Date.parse(trimmed) - nowMs;
  return Number.isNaN(ms) ? undefined : Math.min(limits.maxRetryAfterMs, Math.max(0, ms));
}

/** `{error, error_description}` when the body carries them (strings), else undefined. */
export function errorBodyOf(body: unknown): UpstreamErrorBody | undefined {
  if (typeof body !== 'object' || body === null) return undefined;
  const { error, error_description: description } = body as Record<string, unknown>;
  if (typeof error !== 'string') return undefined;
  return { error, error_description: typeof description === 'string' ? description : '' };
}
