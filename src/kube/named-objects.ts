// Named objects of one kind read with a GET each, only those wanted (never listed or watched: a node
// reads the few its own pods need, whatever the cluster holds): fetched when first wanted or wanted
// anew, read again every refresh interval while wanted, forgotten when no longer wanted.
import { messageOf, NmiError } from '../errors/errors.js';
import type { Logger } from '../log/logger.js';
import { Backoff } from '../util/backoff.js';
import { ApiError, type KubeClient } from './client.js';

/** GETs in flight at once: a node that needs many objects opens a few connections, not one per object. */
const MAX_CONCURRENT_FETCHES = 4;

export interface NamedResource<T> {
  /** For logs: `secret`, `serviceaccount`. */
  kind: string;
  /** The object's path under the API server. */
  path(namespace: string, name: string): string;
  /** Throws for an object that cannot be used, which is then left out as missing. */
  parse(raw: unknown): T;
  /** The most one answer may hold; a longer one is left out as unusable. */
  maxBytes: number;
  /** What a 403 asks of the operator, appended to its one log line. */
  forbiddenHint: string;
}

export interface NamedObjectsOptions {
  backoff: { initialMs: number; maxMs: number };
  /** How often each wanted object is read again, drawn anew each round within ±25 % so nodes do not read in step. */
  refreshMs: number;
}

/** The wanted objects of one kind, by `namespace/name`. */
export class NamedObjects<T> {
  readonly values = new Map<string, T>();
  /** Wanted key → what wants it; a new stamp means fetch again. */
  #wanted = new Map<string, string>();
  readonly #fetched = new Map<string, string>();
  readonly #attempted = new Map<string, string>();
  readonly #backoff: Backoff;
  #running = false;
  #again = false;
  #retry: NodeJS.Timeout | undefined;
  #refresh: NodeJS.Timeout | undefined;

  constructor(
    private readonly client: KubeClient,
    private readonly resource: NamedResource<T>,
    private readonly log: Logger,
    private readonly options: NamedObjectsOptions,
    private readonly signal: AbortSignal,
    private readonly onChange: () => void,
  ) {
    this.#backoff = new Backoff(options.backoff);
  }

  /** Every wanted object was tried at least once since it was last wanted anew. */
  get settled(): boolean {
    for (const [key, stamp] of this.#wanted) if (this.#attempted.get(key) !== stamp) return false;
    return true;
  }

  /** Reads from now on only these (`namespace/name` → a stamp: a changed one reads the object again). */
  want(next: ReadonlyMap<string, string>): void {
    let dropped = false;
    for (const key of new Set([...this.values.keys(), ...this.#attempted.keys()])) {
      if (next.has(key)) continue;
      dropped = this.values.delete(key) || dropped;
      this.#fetched.delete(key);
      this.#attempted.delete(key);
    }
    // Only a new need starts a fetch here; failed fetches wait for their backoff.
    const renewed = [...next].some(([key, stamp]) => this.#wanted.get(key) !== stamp);
    this.#wanted = new Map(next);
    if (dropped) this.onChange();
    if (renewed) this.#kick();
    if (this.#wanted.size > 0) this.#scheduleRefresh();
    else this.#stopRefresh();
  }

  stop(): void {
    clearTimeout(this.#retry);
    this.#stopRefresh();
  }

  #scheduleRefresh(): void {
    if (this.#refresh || this.signal.aborted) return;
    this.#refresh = setTimeout(() => {
      this.#refresh = undefined;
      this.#fetched.clear();
      this.#kick();
      if (this.#wanted.size > 0) this.#scheduleRefresh();
    }, this.options.refreshMs * (0.75 + Math.random() * 0.5)).unref();
  }

  #stopRefresh(): void {
    clearTimeout(this.#refresh);
    this.#refresh = undefined;
  }

  #kick(): void {
    if (this.#running) {
      this.#again = true;
      return;
    }
    this.#running = true;
    void this.#drain().finally(() => {
      this.#running = false;
    });
  }

  async #drain(): Promise<void> {
    let failed = false;
    let attempted = 0;
    do {
      this.#again = false;
      const due = [...this.#wanted].filter(([key, stamp]) => this.#fetched.get(key) !== stamp);
      const results: boolean[] = [];
      const next = due[Symbol.iterator]();
      const worker = async (): Promise<void> => {
        for (let item = next.next(); !item.done; item = next.next()) results.push(await this.#fetch(item.value[0], item.value[1]));
      };
      await Promise.all(Array.from({ length: Math.min(MAX_CONCURRENT_FETCHES, due.length) }, worker));
      failed = results.includes(false);
      attempted += due.length;
    } while (this.#again && !this.signal.aborted);
    if (this.signal.aborted) return;
    if (attempted > 0) this.onChange();
    clearTimeout(this.#retry);
    if (failed) this.#retry = setTimeout(() => this.#kick(), this.#backoff.next()).unref();
    else this.#backoff.reset();
  }

  /** False when the API server could not answer (retried later); a missing or unusable object is an answer. */
  async #fetch(key: string, stamp: string): Promise<boolean> {
    const [namespace = '', name = ''] = key.split('/');
    const { kind, maxBytes } = this.resource;
    // resourceVersion=0: from the API server's watch cache, as the lists are.
    const path = `${this.resource.path(namespace, name)}?resourceVersion=0`;
    try {
      let value: T | undefined;
      try {
        value = this.resource.parse(await this.client.getJson(path, this.signal, maxBytes));
      } catch (err) {
        // Not found, unusable (invalid, too large), or not ours to read (403): an answer, so the object is
        // left out and asked again only at the next refresh, not in a retry loop.
        const status = err instanceof ApiError ? err.status : undefined;
        const answered = status === undefined ? err instanceof NmiError : status === 404 || status === 403;
        if (!answered) throw err;
        const hint = status === 403 ? `: ${this.resource.forbiddenHint}` : '';
        if (this.#fetched.get(key) !== stamp) this.log.warn({ [kind]: key, err: messageOf(err) }, `${kind} unusable${hint}`);
      }
      if (value === undefined) this.values.delete(key);
      else this.values.set(key, value);
      this.#fetched.set(key, stamp);
      return true;
    } catch (err) {
      if (!this.signal.aborted) this.log.warn({ [kind]: key, err: messageOf(err) }, `${kind} fetch failed, keeping the last value`);
      return false;
    } finally {
      this.#attempted.set(key, stamp);
    }
  }
}
