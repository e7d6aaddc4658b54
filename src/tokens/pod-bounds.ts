// --max-tokens-per-pod: which cache entries each pod asked for. A pod holding its
// maximum gets no entry for a new (identity, resource) until one of its own has
// nothing left to serve, so one pod cannot push the node's tokens out of memory.
import { BudgetError, type ThrottleReason } from '../budget/budget.js';
import type { Logger } from '../log/logger.js';
import { LogLimiter } from '../util/log-limiter.js';

/** The pod a request is for: its key (uid) keeps its bounds and queue, its name is for the log. */
export interface PodRef {
  key: string;
  name: string;
}

export class PodBounds<E extends object> {
  /** Entries by the pod key holding them. */
  readonly #held = new Map<string, Set<E>>();
  /** Pod keys by the entry they hold. */
  readonly #holders = new WeakMap<E, Set<string>>();
  /** A pod throttled in a loop: said once a minute per pod, not per request. */
  readonly #said = new LogLimiter(60_000);

  constructor(
    private readonly maxPerPod: number,
    private readonly onThrottled?: (reason: ThrottleReason) => void,
    private readonly logger?: Logger,
  ) {}

  holds(podKey: string, entry: E): boolean {
    return this.#holders.get(entry)?.has(podKey) ?? false;
  }

  hold(podKey: string, entry: E): void {
    let held = this.#held.get(podKey);
    if (!held) this.#held.set(podKey, (held = new Set()));
    held.add(entry);
    let holders = this.#holders.get(entry);
    if (!holders) this.#holders.set(entry, (holders = new Set()));
    holders.add(podKey);
  }

  /** The entry left the cache: it counts for no pod. */
  release(entry: E): void {
    for (const podKey of this.#holders.get(entry) ?? []) this.#held.get(podKey)?.delete(entry);
    this.#holders.delete(entry);
  }

  /**
   * Throws BudgetError (pod-tokens) when the pod holds its maximum. Its entries that are `idle` (nothing to
   * serve, fetch or answer again) no longer count: `drop` takes them out of the cache first.
   */
  admitNewKey(pod: PodRef, idle: (entry: E) => boolean, drop: (entry: E) => void): void {
    const held = this.#held.get(pod.key);
    if (!held || held.size < this.maxPerPod) return;
    for (const entry of held) if (idle(entry)) drop(entry);
    if (held.size < this.maxPerPod) return;
    this.onThrottled?.('pod-tokens');
    throw new BudgetError('pod-tokens', `the pod holds ${held.size} tokens, its maximum`, 60);
  }

  /** Forgets the pods not in podKeys (gone from the node). */
  retain(podKeys: Iterable<string>): void {
    const keep = new Set(podKeys);
    for (const [podKey, entries] of this.#held) {
      if (keep.has(podKey)) continue;
      for (const entry of entries) this.#holders.get(entry)?.delete(podKey);
      this.#held.delete(podKey);
    }
  }

  /** Says that the pod was throttled, once a minute per pod. */
  throttled(pod: PodRef, err: BudgetError, now: number): void {
    if (!this.#said.due(pod.key, now)) return;
    this.logger?.warn({ pod: pod.name, reason: err.reason, err: err.message }, 'pod over its upstream bounds: answering 429 (said once a minute per pod)');
  }
}
