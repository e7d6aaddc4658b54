// Tokens in memory, per (identity, resource). A hit is answered from memory; a
// token past ~80% of its life is refreshed in the background while it is still
// served; concurrent misses share one upstream call; issuer trouble is retried
// with backoff within a time limit, every attempt inside the upstream's budget.
// A refusal that will not change soon (an issuer's 4xx, an identity its Secret
// or certificate makes unusable) is remembered for a short time.
// Each calling pod may hold only so many entries. Identity changes drop entries
// and orphan any in-flight fetch, whose result is then handed to its waiters
// but never stored.
import { setTimeout as sleepFor } from 'node:timers/promises';
import { LRUCache } from 'lru-cache';
import { identityKey, identityNameOf, IdentityType, type AzureIdentity } from '../bindings/model.js';
import { BudgetError, type RefusalReason, type Release, type Ticket, type UpstreamBudget } from '../budget/budget.js';
import { codes, isNmiError } from '../errors/errors.js';
import type { Logger } from '../log/logger.js';
import type { Credential, TokenProvider } from './msal-provider.js';
import type { Token } from './token.js';
import { UpstreamError, upstreamKinds, type UpstreamKind } from './upstream-error.js';

export interface RetryOptions {
  /** Upstream calls per fetch, the first included. */
  attempts?: number;
  baseDelayMs?: number;
  maxDelayMs?: number;
  /** No retry starts once this much time has gone since the first attempt. */
  budgetMs?: number;
  /** The same for IMDS being updated (its 404 and 410), retried without a count: IMDS documents 70 s. */
  updatingBudgetMs?: number;
}

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
  /** Entries one calling pod may hold; past it, its misses for new keys are refused (pod-tokens). */
  maxTokensPerCaller?: number;
  /** How long a lasting refusal for a key (see `lasting`) is answered again without asking. */
  refusalTtlMs?: number;
  /** Counts refusals the cache makes (pod-tokens); the budgets count their own. */
  onRefused?: (reason: RefusalReason) => void;
  /** Milliseconds since the epoch. */
  now?: () => number;
  /** Waits ms; rejects when signal aborts. */
  sleep?: (ms: number, signal: AbortSignal) => Promise<void>;
  /** In [0, 1). */
  random?: () => number;
  logger?: Logger;
}

export type UpstreamTarget = 'imds' | 'entra';

/** A credential, or how to build it when a call is made: then a remembered refusal costs no Secret read. */
export type CredentialSource = Credential | (() => Credential | undefined);

/** The pod a request is for: its uid keys its bounds and queue, its name is for the log. */
export interface Caller {
  key: string;
  name: string;
}

export interface TokenCacheStats {
  hits: number;
  misses: number;
  /** Answered with a remembered refusal. */
  refusalHits: number;
  /** Background refreshes started. */
  refreshes: number;
  upstreamRequests: Record<UpstreamTarget, number>;
  upstreamErrors: Record<UpstreamKind, number>;
}

/** One cache entry as `nmi explain` shows it. */
export interface CachedTokenInfo {
  identity: string;
  resource: string;
  /** fresh: served from memory; fetching: a call is under way; refused: a lasting refusal is answered again; stale: kept, served no more. */
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
  maxTokensPerCaller: Infinity,
  refusalTtlMs: 30_000,
  retry: { attempts: 4, baseDelayMs: 250, maxDelayMs: 4_000, budgetMs: 10_000, updatingBudgetMs: 70_000 },
};

interface Entry {
  /** Its key in the LRU map. */
  readonly key: string;
  readonly identityKey: string;
  readonly identity: AzureIdentity;
  readonly resource: string;
  /** The latest one a caller gave; background refreshes sign in with it. */
  credential: CredentialSource | undefined;
  token: Token | undefined;
  refreshAtMs: number;
  /** Served while now is before this. */
  staleAtMs: number;
  /** From then on a refresh goes before first tokens in the budget. */
  urgentAtMs: number;
  inflight: Promise<Token> | undefined;
  /** The pods waiting on the fetch in flight; its next attempt queues for them. */
  readonly waiters: Set<string>;
  /** The attempt waiting for its turn in the budget, which late waiters join. */
  ticket: Ticket | undefined;
  /** A lasting refusal, answered again until untilMs. */
  refusal: { err: unknown; untilMs: number } | undefined;
  /** Pods that asked for it, each holding it against its maxTokensPerCaller. */
  readonly holders: Set<string>;
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
  private readonly maxTokensPerCaller: number;
  private readonly refusalTtlMs: number;
  private readonly onRefused: TokenCacheOptions['onRefused'];
  /** Entries by the pod holding them. */
  private readonly held = new Map<string, Set<Entry>>();
  /** When each pod's last refusal was logged: once a minute per pod, not per request. */
  private readonly refusalLogged = new Map<string, number>();
  private readonly now: () => number;
  private readonly sleep: (ms: number, signal: AbortSignal) => Promise<void>;
  private readonly random: () => number;
  private readonly logger: Logger | undefined;
  private readonly counters: TokenCacheStats = {
    hits: 0,
    misses: 0,
    refusalHits: 0,
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
      maxTokensPerCaller = defaults.maxTokensPerCaller,
      refusalTtlMs = defaults.refusalTtlMs,
      onRefused,
      now = Date.now,
      sleep = (ms, signal) => sleepFor(ms, undefined, { signal }),
      random = Math.random,
      logger,
    } = options;
    if (!(refreshFraction > 0 && refreshFraction <= 1)) throw new RangeError(`refreshFraction must be in (0, 1], got ${refreshFraction}`);
    if (!(refreshJitter >= 0 && refreshJitter < refreshFraction)) throw new RangeError(`refreshJitter must be in [0, refreshFraction), got ${refreshJitter}`);
    this.provider = provider;
    this.entries = new LRUCache<string, Entry>({ max, dispose: (entry) => this.disposed(entry) });
    this.refreshFraction = refreshFraction;
    this.refreshJitter = refreshJitter;
    this.expiryMarginMs = expiryMarginMs;
    this.refreshRetryMs = refreshRetryMs;
    this.retry = { ...defaults.retry, ...retry };
    this.budgetFor = budgetFor;
    this.maxTokensPerCaller = maxTokensPerCaller;
    this.refusalTtlMs = refusalTtlMs;
    this.onRefused = onRefused;
    this.now = now;
    this.sleep = sleep;
    this.random = random;
    this.logger = logger;
  }

  /**
   * A token for identity and resource: from memory when fresh, else from the issuer (one call for all
   * concurrent askers). With a caller, rejects with BudgetError when that pod is over its bounds.
   */
  get(identity: AzureIdentity, resource: string, credential?: CredentialSource, caller?: Caller): Promise<Token> {
    let entry = this.find(identity, resource);
    const now = this.now();
    if (entry && this.servable(entry, now)) {
      if (credential) entry.credential = credential;
      return Promise.resolve(this.hit(entry, now));
    }
    if (entry?.refusal) {
      if (now < entry.refusal.untilMs) {
        this.counters.refusalHits++;
        return Promise.reject(entry.refusal.err);
      }
      entry.refusal = undefined;
    }
    this.counters.misses++;
    try {
      if (caller) this.admit(caller, entry, identity);
    } catch (err) {
      return Promise.reject(err);
    }
    if (!entry) {
      entry = newEntry(identity, resource);
      this.entries.set(entry.key, entry);
      this.remember(identity, entry);
    }
    entry.credential = credential;
    if (caller) {
      entry.holders.add(caller.key);
      let held = this.held.get(caller.key);
      if (!held) this.held.set(caller.key, (held = new Set()));
      held.add(entry);
      entry.waiters.add(caller.key);
      entry.ticket?.join(caller.key);
    }
    return entry.inflight ?? this.startFetch(entry);
  }

  /** Forgets the bounds of pods not in keys (gone from the node). */
  retainCallers(callerKeys: Iterable<string>): void {
    const keep = new Set(callerKeys);
    for (const [key, entries] of this.held) {
      if (keep.has(key)) continue;
      for (const entry of entries) entry.holders.delete(key);
      this.held.delete(key);
      this.refusalLogged.delete(key);
    }
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
  describe(identityKeys: ReadonlySet<string>, callerKey?: string): CachedTokenInfo[] {
    const now = this.now();
    const out: CachedTokenInfo[] = [];
    for (const entry of this.entries.values()) {
      if (!identityKeys.has(entry.identityKey)) continue;
      const refused = entry.refusal !== undefined && now < entry.refusal.untilMs;
      out.push({
        identity: entry.identityKey,
        resource: entry.resource,
        state: this.servable(entry, now) ? 'fresh' : entry.inflight ? 'fetching' : refused ? 'refused' : 'stale',
        expiresOn: entry.token?.expiresOn,
        refreshAtMs: entry.token ? entry.refreshAtMs : undefined,
        heldByCaller: callerKey !== undefined && entry.holders.has(callerKey),
      });
    }
    return out.sort((a, b) => compare(a.identity, b.identity) || compare(a.resource, b.resource));
  }

  /** Entries holding a token or fetching one; remembered refusals are not counted. */
  get size(): number {
    let refused = 0;
    for (const entry of this.entries.values()) if (entry.refusal) refused++;
    return this.entries.size - refused;
  }

  stats(): TokenCacheStats {
    const { upstreamRequests, upstreamErrors } = this.counters;
    return { ...this.counters, upstreamRequests: { ...upstreamRequests }, upstreamErrors: { ...upstreamErrors } };
  }

  /**
   * Throws BudgetError when the caller may not wait for another fetch: it holds its maximum of other
   * entries (pod-tokens), or has its maximum of calls queued (pod-pending).
   */
  private admit(caller: Caller, entry: Entry | undefined, identity: AzureIdentity): void {
    try {
      if (!entry?.holders.has(caller.key)) this.admitNewKey(caller);
      // A call is queued for it: a new fetch, or one waiting for its turn that it joins. A fetch already under way costs nothing.
      const queues = !entry?.inflight || (entry.ticket !== undefined && !entry.waiters.has(caller.key));
      if (queues) this.budgetFor?.(identity).admit(caller.key);
    } catch (err) {
      if (err instanceof BudgetError) this.logRefusal(caller, err);
      throw err;
    }
  }

  private admitNewKey(caller: Caller): void {
    const held = this.held.get(caller.key);
    if (!held || held.size < this.maxTokensPerCaller) return;
    // Entries with nothing to serve, fetch or answer again no longer count: make room from them first.
    const now = this.now();
    for (const entry of held) {
      if (!this.servable(entry, now) && !entry.inflight && !(entry.refusal && now < entry.refusal.untilMs)) this.entries.delete(entry.key);
    }
    if (held.size < this.maxTokensPerCaller) return;
    this.onRefused?.('pod-tokens');
    throw new BudgetError('pod-tokens', `the pod holds ${held.size} tokens, its maximum`, 60);
  }

  private logRefusal(caller: Caller, err: BudgetError): void {
    const now = this.now();
    if (now - (this.refusalLogged.get(caller.key) ?? -Infinity) < 60_000) return;
    this.refusalLogged.set(caller.key, now);
    this.logger?.warn({ pod: caller.name, reason: err.reason, err: err.message }, 'pod over its upstream bounds: answering 429 (said once a minute per pod)');
  }

  private disposed(entry: Entry): void {
    entry.dropped.abort();
    for (const key of entry.holders) this.held.get(key)?.delete(entry);
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
        // A failed refresh keeps the token it meant to replace. With nothing servable, a lasting refusal is
        // remembered for a while (a pod retrying a bad resource or a broken identity costs one call); otherwise the entry goes.
        if (!this.servable(entry) && this.entries.peek(entry.key) === entry) {
          if (lasting(err)) entry.refusal = { err, untilMs: this.now() + this.refusalTtlMs };
          else this.entries.delete(entry.key);
        }
        throw err;
      },
    );
    entry.inflight = fetched;
    const clear = (): void => {
      if (entry.inflight !== fetched) return;
      entry.inflight = undefined;
      entry.waiters.clear();
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
      const credential = typeof entry.credential === 'function' ? entry.credential() : entry.credential;
      const release = await this.turn(entry, attempt);
      this.counters.upstreamRequests[target]++;
      try {
        const token = await this.provider.fetch(entry.identity, entry.resource, credential);
        release();
        return token;
      } catch (err) {
        release(err instanceof UpstreamError && err.kind === 'throttled' ? { throttledMs: err.retryAfterMs ?? 0 } : undefined);
        if (err instanceof UpstreamError) this.counters.upstreamErrors[err.kind]++;
        const delay = this.retryDelay(err, attempt, this.now() - startedAt);
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
      owners: entry.waiters,
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

  /** How long to wait before the next attempt, or undefined for none: past the count, or when it would end past the budget. */
  private retryDelay(err: unknown, attempt: number, elapsedMs: number): number | undefined {
    if (!(err instanceof UpstreamError) || !err.retryable) return undefined;
    const updating = err.kind === 'updating';
    if (!updating && attempt >= this.retry.attempts) return undefined;
    const ceiling = Math.min(this.retry.maxDelayMs, this.retry.baseDelayMs * 2 ** (attempt - 1));
    const delay = err.retryAfterMs ?? Math.round(ceiling * (0.5 + this.random() / 2));
    return elapsedMs + delay > (updating ? this.retry.updatingBudgetMs : this.retry.budgetMs) ? undefined : delay;
  }
}

/**
 * A refusal that asking again soon would not change: the issuer's 4xx, or an identity its Secret or
 * certificate makes unusable (NmiError BINDINGS or TOKEN) until the bindings change, which drops the entry.
 */
function lasting(err: unknown): boolean {
  return (err instanceof UpstreamError && err.kind === 'client') || isNmiError(err, codes.BINDINGS) || isNmiError(err, codes.TOKEN);
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
    waiters: new Set(),
    ticket: undefined,
    refusal: undefined,
    holders: new Set(),
    dropped: new AbortController(),
  };
}

function describe(err: unknown): Record<string, unknown> {
  if (err instanceof UpstreamError) return { code: err.code, kind: err.kind, status: err.status, message: err.message };
  return { message: err instanceof Error ? err.message : String(err) };
}
