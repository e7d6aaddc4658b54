// A list + watch of one kind of Kubernetes object, kept as a map by namespace/name, as
// client-go's reflector does: list (from the watch cache) → watch from the list's resourceVersion → on a
// dropped connection watch again from the last resourceVersion seen → on 410 Gone (HTTP
// status or ERROR event) list again.
import { setTimeout as sleep } from 'node:timers/promises';
import { codes, messageOf, NmiError } from '../errors/errors.js';
import type { Logger } from '../log/logger.js';
import { Backoff } from '../util/backoff.js';
import { ApiError, TooLargeError, type KubeClient } from './client.js';
import { objectKey } from './object-key.js';

/** The resourceVersion a list or watch must start over from. */
class GoneError extends Error {}

/**
 * The backoff of a resource nmi may not read (403): RBAC changes are rare, and every node asking every
 * 30 s is 170 refused lists a second at 5,000 nodes. It doubles from 30 s to 10 minutes.
 */
const FORBIDDEN_BACKOFF = { initialMs: 30_000, maxMs: 10 * 60_000 };

export interface Resource<T> {
  plural: string;
  /** Where it is listed and watched. */
  path: string;
  /** Throws for an invalid object, which is then left out. */
  parse(raw: unknown): T;
}

export interface ReflectorOptions {
  backoff: { initialMs: number; maxMs: number };
  /** The watch's server-side timeout; by default random in 5–10 minutes, as client-go does. */
  watchTimeoutSeconds?: number;
  /** Items asked for per list page. */
  pageSize: number;
  /** The most one list page's answer (or one watch event) may hold; a page over it is asked again with half the items. */
  maxPageBytes: number;
  /** An object whose JSON is longer is left out, with one log line naming it. */
  maxObjectBytes: number;
  /**
   * A watch that brings nothing for this long is stalled (a dead connection, a stuck server) and replaced: the
   * API server's watch cache sends a bookmark every minute to a watch that allows them.
   */
  stallMs: number;
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
    private readonly options: ReflectorOptions,
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
    const forbidden = new Backoff(FORBIDDEN_BACKOFF);
    let relist = true;
    while (!signal.aborted) {
      try {
        if (relist) {
          await this.#list(signal);
          relist = false;
        }
        await this.#watch(signal);
        backoff.reset();
        forbidden.reset();
      } catch (err) {
        if (signal.aborted) return;
        // The API server's Retry-After (its flow control's 429, a 5xx) when longer than ours.
        let delay = Math.max(backoff.next(), err instanceof ApiError ? (err.retryAfterMs ?? 0) : 0);
        if (err instanceof GoneError || (err instanceof ApiError && err.status === 410)) {
          // Backed off too, so a server that keeps answering 410 is not hammered.
          this.log.info({ resource: this.resource.plural }, 'resourceVersion expired, listing again');
          relist = true;
        } else if (err instanceof ApiError && err.status === 403) {
          delay = Math.max(delay, forbidden.next());
          this.log.warn({ resource: this.resource.plural, err: messageOf(err), retryInMs: Math.round(delay) }, `nmi may not list and watch ${this.resource.plural}: check its RBAC`);
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
    let limit = this.options.pageSize;
    for (;;) {
      // resourceVersion=0: from the API server's watch cache, not a read through to etcd (client-go's first list);
      // the watch that follows brings anything the cache had not seen yet. A continued page names its own version.
      const query = new URLSearchParams({ limit: String(limit) });
      if (next) query.set('continue', next);
      else query.set('resourceVersion', '0');
      let page: unknown;
      try {
        page = await this.client.getJson(`${this.path}?${query}`, signal, this.options.maxPageBytes);
      } catch (err) {
        // Big objects: fewer per page, so one page never holds more than maxPageBytes.
        if (!(err instanceof TooLargeError) || limit === 1) throw err;
        limit = Math.ceil(limit / 2);
        continue;
      }
      if (!isObject(page) || !Array.isArray(page.items) || !isObject(page.metadata)) {
        throw new NmiError(codes.API_SERVER, `GET ${this.path}: not a list`);
      }
      for (const raw of page.items) listed.add(this.#parseInto(items, raw, Buffer.byteLength(JSON.stringify(raw))));
      rv = String(page.metadata.resourceVersion ?? '');
      next = typeof page.metadata.continue === 'string' ? page.metadata.continue : '';
      if (!next) break;
    }
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
    // undici's body timeout counts from the last data received.
    const res = await this.client.open(`${this.path}?${query}`, signal, Math.min(this.options.stallMs, (timeout + 30) * 1000));
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
        this.#event(JSON.parse(line) as WatchEvent, Buffer.byteLength(line));
      }
      // One event is one object: a line longer than a page is not a Kubernetes object.
      if (buffer.length > this.options.maxPageBytes) throw new NmiError(codes.API_SERVER, `watch ${this.path}: an event over ${this.options.maxPageBytes} bytes`);
    }
    // As client-go: a watch closed at once without events is an error (backoff), not a loop.
    if (events === 0 && Date.now() - started < 1000) throw new NmiError(codes.API_SERVER, `watch ${this.path} closed at once`);
  }

  #event(event: WatchEvent, bytes: number): void {
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
        this.#parseInto(this.#items, object, bytes);
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

  /**
   * Valid objects go in; an invalid one, or one over maxObjectBytes, is logged once per version and left out
   * (removing an older valid version). Returns its key.
   */
  #parseInto(items: Map<string, T>, raw: unknown, bytes: number): string {
    const m = isObject(raw) && isObject(raw.metadata) ? raw.metadata : {};
    const key = objectKey(String(m.namespace ?? ''), String(m.name ?? ''));
    try {
      const max = this.options.maxObjectBytes;
      if (bytes > max) throw new NmiError(codes.API_SERVER, `${bytes} bytes, over the limit of ${max} for one object`);
      items.set(key, this.resource.parse(raw));
      this.#invalid.delete(key);
    } catch (err) {
      items.delete(key);
      const rv = String(m.resourceVersion ?? '');
      if (this.#invalid.get(key)?.rv !== rv) {
        this.#invalid.set(key, { rv, reason: messageOf(err) });
        this.log.warn({ resource: this.resource.plural, object: key, err: messageOf(err) }, 'ignoring invalid object');
      }
    }
    return key;
  }
}
