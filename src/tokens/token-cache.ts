// Tokens in memory, per (identity, resource). A hit is answered from memory; a
// token past ~80% of its life is refreshed in the background while it is still
// served; concurrent misses share one upstream call; issuer trouble is retried
// (retry.ts) within a time limit, every attempt inside the upstream's budget.
// A failure that will not change soon (an issuer's rejection, an identity its
// Secret or certificate makes unusable) is remembered for a short time.
// Each pod may hold only so many entries (pod-bounds.ts). Identity changes drop
// entries and orphan any in-flight fetch, whose result then reaches the pods
// waiting on it but is never stored.
import { setTimeout as sleepFor } from 'node:timers/promises';
import { LRUCache } from 'lru-cache';
import { identityKey, identityNameOf, IdentityType, type AzureIdentity } from '../bindings/model.js';
import { BudgetError, type ThrottleReason, type Release, type Ticket, type UpstreamBudget } from '../budget/budget.js';
import { messageOf } from '../errors/errors.js';
import type { Logger } from '../log/logger.js';
import type { Credential, TokenProvider } from './msal-provider.js';
import { PodBounds, type PodRef } from './pod-bounds.js';
import { lasting, retryDefaults, retryDelay, type RetryOptions } from './retry.js';
import type { Token } from './token.js';
import { UpstreamError, upstreamKinds, type UpstreamKind } from './upstream-error.js';

export interface TokenCacheOptions {
  provider: TokenProvider;
  /** Entries kept; the least recently used go first. */
  max?: number;
  /** Fraction of a token's lifetime after which it is refreshed in the background. */
  refreshFraction?: number;
  /** Refresh points are spread up to this fraction of the lifetime earlier, so tokens fetched together are not refreshed together. */
  refreshJitter?: number;
  /** A token is served until this close to its expiry (capped at a tenth of its lifetime). */
  expiryMarginMs?: number;
  /** After a failed background refresh, the next one is tried this much later. */
  refreshRetryMs?: number;
  retry?: RetryOptions;
  /** The budget every upstream call for the identity waits its turn in; none: calls go at once. */
  budgetFor?: (identity: AzureIdentity) => UpstreamBudget;
  /** Entries one pod may hold; past it, its misses for new keys are throttled (pod-tokens). */
  maxTokensPerPod?: number;
  /** How long a lasting failure for a key (retry.ts's `lasting`) is answered again without asking. */
  rememberMs?: number;
  /** Counts the throttles the cache makes (pod-tokens); the budgets count their own. */
  onThrottled?: (reason: ThrottleReason) => void;
  /** Milliseconds since the epoch. */
  now?: () => number;
  /** Waits ms; rejects when signal aborts. */
  sleep?: (ms: number, signal: AbortSignal) => Promise<void>;
  /** In [0, 1). */
  random?: () => number;
  logger?: Logger;
}

export type UpstreamTarget = 'imds' | 'entra';

/**
 * A credential, or how to build it when a call is made: then a remembered failure costs no Secret read, and a
 * Secret fetched when first needed is waited for.
 */
export type CredentialSource = Credential | (() => Credential | undefined | Promise<Credential | undefined>);

export interface TokenCacheStats {
  hits: number;
  misses: number;
  /** Answered with a remembered failure. */
  rememberedHits: number;
  /** Background refreshes started. */
  refreshes: number;
  upstreamRequests: Record<UpstreamTarget, number>;
  upstreamErrors: Record<UpstreamKind, number>;
}

/** One cache entry as `nmi explain` shows it. */
export interface CachedTokenInfo {
  identity: string;
  resource: string;
  /** fresh: served from memory; fetching: a call is under way; refused: a lasting failure is answered again; stale: kept, served no more. */
  state: 'fresh' | 'fetching' | 'refused' | 'stale';
  /** Seconds since the epoch. */
  expiresOn?: number;
  refreshAtMs?: number;
  /** The pod asked for it (it counts against the pod's --max-tokens-per-pod). */
  heldByCaller: boolean;
}

const compare = (a: string, b: string): number => (a < b ? -1 : a > b ? 1 : 0);

/** Clients treat a token this close to its expiry as expired; the native table uses the same margin. */
export const EXPIRY_MARGIN_MS = 5 * 60_000;

const defaults = {
  max: 10_000,
  refreshFraction: 0.8,
  refreshJitter: 0.05,
  expiryMarginMs: EXPIRY_MARGIN_MS,
  refreshRetryMs: 30_000,
  maxTokensPerPod: Infinity,
  rememberMs: 30_000,
};

interface Entry {
  /** Its key in the LRU map. */
  readonly key: string;
  readonly identityKey: string;
  readonly identity: AzureIdentity;
  readonly resource: string;
  /** The latest one a request gave; background refreshes sign in with it. */
  credential: CredentialSource | undefined;
  token: Token | undefined;
  refreshAtMs: number;
  /** Served while now is before this. */
  staleAtMs: number;
  /** From then on a refresh goes before first tokens in the budget. */
  urgentAtMs: number;
  inflight: Promise<Token> | undefined;
  /** The keys of the pods waiting on the fetch in flight; its next attempt queues for them. */
  readonly waitingPods: Set<string>;
  /** The attempt waiting for its turn in the budget, which pods asking late join. */
  ticket: Ticket | undefined;
  /** A lasting failure, answered again until untilMs. */
  remembered: { err: unknown; untilMs: number } | undefined;
  /** Aborted when the entry leaves the cache: stops retries of its fetch. */
  readonly dropped: AbortController;
}

export class TokenCache {
  private readonly provider: TokenProvider;
  private readonly entries: LRUCache<string, Entry>;
  /**
   * Entries by the identity object a request resolved to, then resource: a cache
   * hit builds and hashes no key string. Holds dropped entries until they are
   * met (then replaced); an identity object of an old bindings set goes with it.
   */
  private readonly byIdentity = new WeakMap<AzureIdentity, Map<string, Entry>>();
  private readonly refreshFraction: number;
  private readonly refreshJitter: number;
  private readonly expiryMarginMs: number;
  private readonly refreshRetryMs: number;
  private readonly retry: Required<RetryOptions>;
  private readonly budgetFor: TokenCacheOptions['budgetFor'];
  private readonly bounds: PodBounds<Entry>;
  private readonly rememberMs: number;
  private readonly now: () => number;
  private readonly sleep: (ms: number, signal: AbortSignal) => Promise<void>;
  private readonly random: () => number;
  private readonly logger: Logger | undefined;
  private readonly counters: TokenCacheStats = {
    hits: 0,
    misses: 0,
    rememberedHits: 0,
    refreshes: 0,
    upstreamRequests: { imds: 0, entra: 0 },
    upstreamErrors: Object.fromEntries(upstreamKinds.map((kind) => [kind, 0])) as Record<UpstreamKind, number>,
  };

  constructor(options: TokenCacheOptions) {
    const {
      provider,
      max = defaults.max,
      refreshFraction = defaults.refreshFraction,
      refreshJitter = defaults.refreshJitter,
      expiryMarginMs = defaults.expiryMarginMs,
      refreshRetryMs = defaults.refreshRetryMs,
      retry = {},
      budgetFor,
      maxTokensPerPod = defaults.maxTokensPerPod,
      rememberMs = defaults.rememberMs,
      onThrottled,
      now = Date.now,
      sleep = (ms, signal) => sleepFor(ms, undefined, { signal }),
      random = Math.random,
      logger,
    } = options;
    if (!(refreshFraction > 0 && refreshFraction <= 1)) throw new RangeError(`refreshFraction must be in (0, 1], got ${refreshFraction}`);
    if (!(refreshJitter >= 0 && refreshJitter < refreshFraction)) throw new RangeError(`refreshJitter must be in [0, refreshFraction), got ${refreshJitter}`);
    this.provider = provider;
    this.entries = new LRUCache<string, Entry>({ max, dispose: (entry) => this.disposed(entry) });
    this.bounds = new PodBounds(maxTokensPerPod, onThrottled, logger);
    this.refreshFraction = refreshFraction;
    this.refreshJitter = refreshJitter;
    this.expiryMarginMs = expiryMarginMs;
    this.refreshRetryMs = refreshRetryMs;
    this.retry = { ...retryDefaults, ...retry };
    this.budgetFor = budgetFor;
    this.rememberMs = rememberMs;
    this.now = now;
    this.sleep = sleep;
    this.random = random;
    this.logger = logger;
  }

  /**
   * A token for identity and resource: from memory when fresh, else from the issuer (one call for all
   * concurrent askers). With a pod, rejects with BudgetError when that pod is over its bounds.
   */
  get(identity: AzureIdentity, resource: string, credential?: CredentialSource, pod?: PodRef): Promise<Token> {
    let entry = this.find(identity, resource);
    const now = this.now();
    if (entry && this.servable(entry, now)) {
      if (credential) entry.credential = credential;
      return Promise.resolve(this.hit(entry, now));
    }
    if (entry?.remembered) {
      if (now < entry.remembered.untilMs) {
        this.counters.rememberedHits++;
        return Promise.reject(entry.remembered.err);
      }
      entry.remembered = undefined;
    }
    this.counters.misses++;
    try {
      if (pod) this.admit(pod, entry, identity);
    } catch (err) {
      return Promise.reject(err);
    }
    if (!entry) {
      entry = newEntry(identity, resource);
      this.entries.set(entry.key, entry);
      this.remember(identity, entry);
    }
    entry.credential = credential;
    if (pod) {
      this.bounds.hold(pod.key, entry);
      entry.waitingPods.add(pod.key);
      entry.ticket?.join(pod.key);
    }
    return entry.inflight ?? this.startFetch(entry);
  }

  /** Forgets the bounds of pods not in podKeys (gone from the node). */
  retainPods(podKeys: Iterable<string>): void {
    this.bounds.retain(podKeys);
  }

  /** The fresh token in memory, if any, without waiting: the js server's cache hits, and what the native fast path is given. */
  peek(identity: AzureIdentity, resource: string): Token | undefined {
    const entry = this.find(identity, resource);
    const now = this.now();
    return entry && this.servable(entry, now) ? this.hit(entry, now) : undefined;
  }

  /** Drops every entry of the identity the bindings name `namespace/name` (changed or deleted), every service account's; fetches in flight for it are never stored. */
  invalidate(identityName: string): void {
    for (const [key, entry] of this.entries.entries()) {
      if (identityNameOf(entry.identityKey) === identityName) this.entries.delete(key);
    }
  }

  /** Drops entries of identities not in keys (no pod uses them any more). */
  retainOnly(identityKeys: Iterable<string>): void {
    const keep = new Set(identityKeys);
    for (const [key, entry] of this.entries.entries()) {
      if (!keep.has(entry.identityKey)) this.entries.delete(key);
    }
  }

  /** What the cache holds for these identities, for `nmi explain`: when each token ends, never the token. */
  describe(identityKeys: ReadonlySet<string>, podKey?: string): CachedTokenInfo[] {
    const now = this.now();
    const out: CachedTokenInfo[] = [];
    for (const entry of this.entries.values()) {
      if (!identityKeys.has(entry.identityKey)) continue;
      const refused = this.remembers(entry, now);
      out.push({
        identity: entry.identityKey,
        resource: entry.resource,
        state: this.servable(entry, now) ? 'fresh' : entry.inflight ? 'fetching' : refused ? 'refused' : 'stale',
        expiresOn: entry.token?.expiresOn,
        refreshAtMs: entry.token ? entry.refreshAtMs : undefined,
        heldByCaller: podKey !== undefined && this.bounds.holds(podKey, entry),
      });
    }
    return out.sort((a, b) => compare(a.identity, b.identity) || compare(a.resource, b.resource));
  }

  /** Entries holding a token or fetching one; remembered failures are not counted. */
  get size(): number {
    let remembered = 0;
    for (const entry of this.entries.values()) if (entry.remembered) remembered++;
    return this.entries.size - remembered;
  }

  stats(): TokenCacheStats {
    const { upstreamRequests, upstreamErrors } = this.counters;
    return { ...this.counters, upstreamRequests: { ...upstreamRequests }, upstreamErrors: { ...upstreamErrors } };
  }

  /**
   * Throws BudgetError when the pod may not wait for another fetch: it holds its maximum of other
   * entries (pod-tokens), or has its maximum of calls queued (pod-pending).
   */
  private admit(pod: PodRef, entry: Entry | undefined, identity: AzureIdentity): void {
    try {
      if (!entry || !this.bounds.holds(pod.key, entry)) {
        const now = this.now();
        const idle = (e: Entry) => !this.servable(e, now) && !e.inflight && !this.remembers(e, now);
        this.bounds.admitNewKey(pod, idle, (e) => this.entries.delete(e.key));
      }
      // A call is queued for it: a new fetch, or one waiting for its turn that it joins. A fetch already under way costs nothing.
      const queues = !entry?.inflight || (entry.ticket !== undefined && !entry.waitingPods.has(pod.key));
      if (queues) this.budgetFor?.(identity).admit(pod.key);
    } catch (err) {
      if (err instanceof BudgetError) this.bounds.throttled(pod, err, this.now());
      throw err;
    }
  }

  private remembers(entry: Entry, now: number): boolean {
    return entry.remembered !== undefined && now < entry.remembered.untilMs;
  }

  private disposed(entry: Entry): void {
    entry.dropped.abort();
    this.bounds.release(entry);
  }

  /** The entry in the cache for identity and resource (marked most recently used), if any. */
  private find(identity: AzureIdentity, resource: string): Entry | undefined {
    const known = this.byIdentity.get(identity)?.get(resource);
    if (known && !known.dropped.signal.aborted) {
      this.entries.get(known.key);
      return known;
    }
    const entry = this.entries.get(entryKey(identity, resource));
    if (entry) this.remember(identity, entry);
    return entry;
  }

  private remember(identity: AzureIdentity, entry: Entry): void {
    let byResource = this.byIdentity.get(identity);
    if (!byResource) this.byIdentity.set(identity, (byResource = new Map()));
    byResource.set(entry.resource, entry);
  }

  private servable(entry: Entry, now = this.now()): boolean {
    return entry.token !== undefined && now < entry.staleAtMs;
  }

  private hit(entry: Entry, now: number): Token {
    this.counters.hits++;
    const token = entry.token as Token;
    if (!entry.inflight && now >= entry.refreshAtMs) this.refreshInBackground(entry);
    return token;
  }

  private refreshInBackground(entry: Entry): void {
    this.counters.refreshes++;
    this.startFetch(entry).catch((err: unknown) => {
      // The current token stays served until it goes stale; try again later.
      entry.refreshAtMs = this.now() + this.refreshRetryMs;
      this.logger?.warn({ identity: entry.identityKey, resource: entry.resource, err: describe(err) }, 'token refresh failed');
    });
  }

  private startFetch(entry: Entry): Promise<Token> {
    const fetched = this.fetchWithRetry(entry).then(
      (token) => {
        // An entry dropped meanwhile is out of the map: what it holds is never served.
        this.store(entry, token);
        return token;
      },
      (err: unknown) => {
        // A failed refresh keeps the token it meant to replace. With nothing servable, a lasting failure is
        // remembered for a while (a pod retrying a bad resource or a broken identity costs one call); otherwise the entry goes.
        if (!this.servable(entry) && this.entries.peek(entry.key) === entry) {
          if (lasting(err)) entry.remembered = { err, untilMs: this.now() + this.rememberMs };
          else this.entries.delete(entry.key);
        }
        throw err;
      },
    );
    entry.inflight = fetched;
    const clear = (): void => {
      if (entry.inflight !== fetched) return;
      entry.inflight = undefined;
      entry.waitingPods.clear();
    };
    fetched.then(clear, clear);
    return fetched;
  }

  private store(entry: Entry, token: Token): void {
    const now = this.now();
    const expiresAtMs = token.expiresOn * 1000;
    const lifetimeMs = Math.max(0, expiresAtMs - now);
    const fraction = this.refreshFraction - this.random() * this.refreshJitter;
    entry.token = token;
    entry.refreshAtMs = now + lifetimeMs * fraction;
    entry.staleAtMs = expiresAtMs - Math.min(this.expiryMarginMs, lifetimeMs / 10);
    entry.urgentAtMs = entry.refreshAtMs + (entry.staleAtMs - entry.refreshAtMs) / 2;
  }

  private async fetchWithRetry(entry: Entry): Promise<Token> {
    const target: UpstreamTarget = entry.identity.type === IdentityType.UserAssignedMSI ? 'imds' : 'entra';
    const startedAt = this.now();
    for (let attempt = 1; ; attempt++) {
      // Built before the turn: a credential that cannot be built spends nothing of the budget.
      const credential = typeof entry.credential === 'function' ? await entry.credential() : entry.credential;
      const release = await this.turn(entry, attempt);
      this.counters.upstreamRequests[target]++;
      try {
        const token = await this.provider.fetch(entry.identity, entry.resource, credential);
        release();
        return token;
      } catch (err) {
        release(err instanceof UpstreamError && err.kind === 'throttled' ? { throttledMs: err.retryAfterMs ?? 0 } : undefined);
        if (err instanceof UpstreamError) this.counters.upstreamErrors[err.kind]++;
        const delay = retryDelay(this.retry, err, attempt, this.now() - startedAt, this.random);
        if (delay === undefined || entry.dropped.signal.aborted) throw err;
        try {
          await this.sleep(delay, entry.dropped.signal);
        } catch {
          throw err; // dropped while waiting: the last answer is the one to report
        }
      }
    }
  }

  /** Waits for the attempt's turn in the identity's budget; refreshes (something servable) queue apart from first tokens. */
  private async turn(entry: Entry, attempt: number): Promise<Release> {
    const budget = this.budgetFor?.(entry.identity);
    if (!budget) return () => {};
    const refresh = this.servable(entry);
    const ticket = budget.request({
      kind: refresh ? 'refresh' : 'first',
      pods: entry.waitingPods,
      urgentAtMs: entry.urgentAtMs,
      signal: entry.dropped.signal,
      retry: attempt > 1,
    });
    entry.ticket = ticket;
    try {
      return await ticket.granted;
    } finally {
      if (entry.ticket === ticket) entry.ticket = undefined;
    }
  }
}

function entryKey(identity: AzureIdentity, resource: string): string {
  // NUL cannot occur in Kubernetes names, versions or URLs, so keys cannot collide.
  return `${identityKey(identity)}\0${identity.version}\0${resource}`;
}

function newEntry(identity: AzureIdentity, resource: string): Entry {
  return {
    key: entryKey(identity, resource),
    identityKey: identityKey(identity),
    identity,
    resource,
    credential: undefined,
    token: undefined,
    refreshAtMs: 0,
    staleAtMs: 0,
    urgentAtMs: 0,
    inflight: undefined,
    waitingPods: new Set(),
    ticket: undefined,
    remembered: undefined,
    dropped: new AbortController(),
  };
}

function describe(err: unknown): Record<string, unknown> {
  if (err instanceof UpstreamError) return { code: err.code, kind: err.kind, status: err.status, message: err.message };
  return { message: messageOf(err) };
}
