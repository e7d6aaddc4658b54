// A list + watch of one kind of Kubernetes object, kept as a map by namespace/name, as
// client-go's reflector does: list (from the watch cache) → watch from the list's resourceVersion → on a
// dropped connection watch again from the last resourceVersion seen → on 410 Gone (HTTP
// status or ERROR event) list again.
import { setTimeout as sleep } from 'node:timers/promises';
import { codes, messageOf, NmiError } from '../errors/errors.js';
import type { Logger } from '../log/logger.js';
import { Backoff } from '../util/backoff.js';
import { ApiError, type KubeClient } from './client.js';
import { objectKey } from './object-key.js';

/** The resourceVersion a list or watch must start over from. */
class GoneError extends Error {}

/**
 * How long an optional resource nmi may not read (403) waits to be asked again: RBAC changes are rare, and
 * every node asking every 30 s is 170 refused lists a second at 5,000 nodes.
 */
const FORBIDDEN_RETRY_MS = 10 * 60_000;

export interface Resource<T> {
  plural: string;
  /**
   * Forbidden to nmi (RBAC from before it was read) counts as synced and empty, so whatever waits
   * for every reflector still starts; it is listed again with backoff.
   */
  optional?: boolean;
  /** Where it is listed and watched. */
  path: string;
  /** Throws for an invalid object, which is then left out. */
  parse(raw: unknown): T;
}

interface WatchEvent {
  type?: string;
  object?: { metadata?: { resourceVersion?: string; name?: string; namespace?: string }; code?: number; reason?: string; message?: string };
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null;
}

/** List + watch of one resource, kept as a map by namespace/name. */
export class Reflector<T> {
  #items = new Map<string, T>();
  #rv = '';
  #synced = false;
  /** Invalid objects (logged once per version), by key, with the resourceVersion logged and why. */
  readonly #invalid = new Map<string, { rv: string; reason: string }>();

  constructor(
    private readonly client: KubeClient,
    private readonly resource: Resource<T>,
    private readonly log: Logger,
    private readonly options: { backoff: { initialMs: number; maxMs: number }; watchTimeoutSeconds?: number; pageSize: number },
    private readonly onChange: () => void,
  ) {}

  get items(): ReadonlyMap<string, T> {
    return this.#items;
  }

  /** Why each invalid object was left out, by key. */
  get invalid(): Iterable<[string, string]> {
    return [...this.#invalid].map(([key, { reason }]) => [key, reason]);
  }

  get synced(): boolean {
    return this.#synced;
  }

  get path(): string {
    return this.resource.path;
  }

  async run(signal: AbortSignal): Promise<void> {
    const backoff = new Backoff(this.options.backoff);
    let relist = true;
    while (!signal.aborted) {
      try {
        if (relist) {
          await this.#list(signal);
          relist = false;
        }
        await this.#watch(signal);
        backoff.reset();
      } catch (err) {
        if (signal.aborted) return;
        // The API server's Retry-After (its flow control's 429, a 5xx) when longer than ours.
        let delay = Math.max(backoff.next(), err instanceof ApiError ? (err.retryAfterMs ?? 0) : 0);
        if (err instanceof GoneError || (err instanceof ApiError && err.status === 410)) {
          // Backed off too, so a server that keeps answering 410 is not hammered.
          this.log.info({ resource: this.resource.plural }, 'resourceVersion expired, listing again');
          relist = true;
        } else if (this.resource.optional && err instanceof ApiError && err.status === 403) {
          if (!this.#synced) this.log.warn({ resource: this.resource.plural, err: messageOf(err) }, `nmi may not list and watch ${this.resource.plural}: going on without them`);
          this.#synced = true;
          this.onChange();
          delay = FORBIDDEN_RETRY_MS * (0.8 + Math.random() * 0.4);
        } else {
          this.log.warn({ resource: this.resource.plural, err: messageOf(err), retryInMs: Math.round(delay) }, 'API server request failed');
        }
        await sleep(delay, undefined, { signal }).catch(() => undefined);
      }
    }
  }

  async #list(signal: AbortSignal): Promise<void> {
    const items = new Map<string, T>();
    const listed = new Set<string>();
    let next = '';
    let rv = '';
    do {
      // resourceVersion=0: from the API server's watch cache, not a read through to etcd (client-go's first list);
      // the watch that follows brings anything the cache had not seen yet. A continued page names its own version.
      const query = new URLSearchParams({ limit: String(this.options.pageSize) });
      if (next) query.set('continue', next);
      else query.set('resourceVersion', '0');
      const page = await this.client.getJson(`${this.path}?${query}`, signal);
      if (!isObject(page) || !Array.isArray(page.items) || !isObject(page.metadata)) {
        throw new NmiError(codes.API_SERVER, `GET ${this.path}: not a list`);
      }
      for (const raw of page.items) listed.add(this.#parseInto(items, raw));
      rv = String(page.metadata.resourceVersion ?? '');
      next = typeof page.metadata.continue === 'string' ? page.metadata.continue : '';
    } while (next);
    this.#items = items;
    // Invalid objects deleted while no watch ran are gone too.
    for (const key of this.#invalid.keys()) if (!listed.has(key)) this.#invalid.delete(key);
    this.#rv = rv;
    this.#synced = true;
    this.onChange();
  }

  /** Returns when the server ends the watch; throws on errors, GoneError on 410. */
  async #watch(signal: AbortSignal): Promise<void> {
    const timeout = this.options.watchTimeoutSeconds ?? 300 + Math.floor(Math.random() * 300);
    const query = new URLSearchParams({ watch: '1', resourceVersion: this.#rv, allowWatchBookmarks: 'true', timeoutSeconds: String(timeout) });
    const started = Date.now();
    // No data for longer than the server-side timeout means a dead connection.
    const res = await this.client.open(`${this.path}?${query}`, signal, (timeout + 30) * 1000);
    res.body.setEncoding('utf8');
    let buffer = '';
    let events = 0;
    for await (const chunk of res.body as AsyncIterable<string>) {
      buffer += chunk;
      for (let nl = buffer.indexOf('\n'); nl >= 0; nl = buffer.indexOf('\n')) {
        const line = buffer.slice(0, nl).trim();
        buffer = buffer.slice(nl + 1);
        if (line === '') continue;
        events++;
        this.#event(JSON.parse(line) as WatchEvent);
      }
    }
    // As client-go: a watch closed at once without events is an error (backoff), not a loop.
    if (events === 0 && Date.now() - started < 1000) throw new NmiError(codes.API_SERVER, `watch ${this.path} closed at once`);
  }

  #event(event: WatchEvent): void {
    const object = event.object;
    if (event.type === 'ERROR') {
      if (object?.code === 410) throw new GoneError();
      throw new ApiError(object?.code ?? 500, `watch ${this.path}: ERROR ${object?.reason ?? ''} ${object?.message ?? ''}`.trim());
    }
    const rv = object?.metadata?.resourceVersion;
    if (rv) this.#rv = rv;
    switch (event.type) {
      case 'ADDED':
      case 'MODIFIED':
        this.#parseInto(this.#items, object);
        this.onChange();
        break;
      case 'DELETED': {
        const key = objectKey(object?.metadata?.namespace ?? '', object?.metadata?.name ?? '');
        this.#invalid.delete(key);
        if (this.#items.delete(key)) this.onChange();
        break;
      }
      case 'BOOKMARK':
        break;
      default:
        throw new NmiError(codes.API_SERVER, `watch ${this.path}: unknown event type ${String(event.type)}`);
    }
  }

  /** Valid objects go in; an invalid one is logged once per version and left out (removing an older valid version). Returns its key. */
  #parseInto(items: Map<string, T>, raw: unknown): string {
    const m = isObject(raw) && isObject(raw.metadata) ? raw.metadata : {};
    const key = objectKey(String(m.namespace ?? ''), String(m.name ?? ''));
    try {
      items.set(key, this.resource.parse(raw));
      this.#invalid.delete(key);
    } catch (err) {
      items.delete(key);
      const rv = String(m.resourceVersion ?? '');
      if (this.#invalid.get(key)?.rv !== rv) {
        this.#invalid.set(key, { rv, reason: messageOf(err) });
        this.log.warn({ err: messageOf(err) }, 'ignoring invalid object');
      }
    }
    return key;
  }
}
