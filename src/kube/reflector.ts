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
   * Objects held per namespace, valid or not: past it a namespace's others are left out (counted, logged once),
   * so a tenant that may write in one namespace cannot make every node hold without bound.
   */
  maxObjectsPerNamespace: number;
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

/** What a reflector holds, by key: valid objects, invalid ones with why, and per namespace how many of both and how many more were left out. */
class Held<T> {
  readonly items = new Map<string, T>();
  /** Invalid objects (logged once per version), with the resourceVersion logged and why. */
  readonly invalid = new Map<string, { rv: string; reason: string }>();
  readonly perNamespace = new Map<string, number>();
  readonly leftOut = new Map<string, number>();

  /** Makes room for key (true), unless it is new and its namespace is full: then it is counted as left out. */
  admit(namespace: string, key: string, max: number): boolean {
    if (this.items.has(key) || this.invalid.has(key)) return true;
    const held = this.perNamespace.get(namespace) ?? 0;
    if (held >= max) {
      this.#count(this.leftOut, namespace, 1);
      return false;
    }
    this.#count(this.perNamespace, namespace, 1);
    return true;
  }

  /** Counts per namespace keep no zeros: a namespace gone leaves nothing behind. */
  #count(counts: Map<string, number>, namespace: string, by: 1 | -1): void {
    const n = (counts.get(namespace) ?? 0) + by;
    if (n > 0) counts.set(namespace, n);
    else counts.delete(namespace);
  }

  /** True when a valid object went. */
  delete(namespace: string, key: string): boolean {
    const valid = this.items.delete(key);
    if (valid || this.invalid.delete(key)) this.#count(this.perNamespace, namespace, -1);
    // Probably one of those left out: its room comes back at the next list.
    else this.#count(this.leftOut, namespace, -1);
    return valid;
  }
}

/** List + watch of one resource, kept as a map by namespace/name. */
export class Reflector<T> {
  #held = new Held<T>();
  #rv = '';
  #synced = false;

  constructor(
    private readonly client: KubeClient,
    private readonly resource: Resource<T>,
    private readonly log: Logger,
    private readonly options: ReflectorOptions,
    private readonly onChange: () => void,
  ) {}

  get items(): ReadonlyMap<string, T> {
    return this.#held.items;
  }

  /** Why each invalid object was left out, by key; `<namespace>/*` for a namespace over its limit. */
  get invalid(): Iterable<[string, string]> {
    const limit = this.options.maxObjectsPerNamespace;
    const full = [...this.#held.leftOut];
    return [
      ...[...this.#held.invalid].map(([key, { reason }]): [string, string] => [key, reason]),
      ...full.map(([namespace, n]): [string, string] => [objectKey(namespace, '*'), `${n} more left out: over the limit of ${limit} per namespace`]),
    ];
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
    const held = new Held<T>();
    let next = '';
    let rv = '';
    let limit = this.options.pageSize;
    let fromCache = true;
    for (;;) {
      // resourceVersion=0: from the API server's watch cache, not a read through to etcd (client-go's first list);
      // the watch that follows brings anything the cache had not seen yet. A continued page names its own version.
      const query = new URLSearchParams({ limit: String(limit) });
      if (next) query.set('continue', next);
      else if (fromCache) query.set('resourceVersion', '0');
      let page: unknown;
      try {
        page = await this.client.getJson(`${this.path}?${query}`, signal, this.options.maxPageBytes);
      } catch (err) {
        // Fewer per page, so one page never holds more than maxPageBytes. A watch cache before Kubernetes 1.33
        // answers resourceVersion=0 whole, whatever the limit: past the bound, the pages come from etcd.
        if (!(err instanceof TooLargeError) || limit === 1) throw err;
        limit = Math.ceil(limit / 2);
        fromCache = false;
        continue;
      }
      if (!isObject(page) || !Array.isArray(page.items) || !isObject(page.metadata)) {
        throw new NmiError(codes.API_SERVER, `GET ${this.path}: not a list`);
      }
      for (const raw of page.items) this.#parseInto(held, raw, Buffer.byteLength(JSON.stringify(raw)));
      rv = String(page.metadata.resourceVersion ?? '');
      next = typeof page.metadata.continue === 'string' ? page.metadata.continue : '';
      if (!next) break;
    }
    for (const [namespace, n] of held.leftOut) if (this.#held.leftOut.get(namespace) !== n) this.#sayFull(namespace, n);
    this.#held = held;
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
      case 'MODIFIED': {
        const namespace = String(object?.metadata?.namespace ?? '');
        const full = this.#held.leftOut.get(namespace) ?? 0;
        this.#parseInto(this.#held, object, bytes);
        if (full === 0 && this.#held.leftOut.get(namespace)) this.#sayFull(namespace, 1);
        this.onChange();
        break;
      }
      case 'DELETED': {
        const namespace = object?.metadata?.namespace ?? '';
        if (this.#held.delete(namespace, objectKey(namespace, object?.metadata?.name ?? ''))) this.onChange();
        break;
      }
      case 'BOOKMARK':
        break;
      default:
        throw new NmiError(codes.API_SERVER, `watch ${this.path}: unknown event type ${String(event.type)}`);
    }
  }

  #sayFull(namespace: string, leftOut: number): void {
    const limit = this.options.maxObjectsPerNamespace;
    this.log.warn({ resource: this.resource.plural, namespace, leftOut, limit }, `namespace over the limit of ${limit} ${this.resource.plural}: the others are left out until the next list`);
  }

  /**
   * Valid objects go in; an invalid one, or one over maxObjectBytes, is logged once per version and left out
   * (removing an older valid version); one past its namespace's limit is only counted.
   */
  #parseInto(held: Held<T>, raw: unknown, bytes: number): void {
    const m = isObject(raw) && isObject(raw.metadata) ? raw.metadata : {};
    const namespace = String(m.namespace ?? '');
    const key = objectKey(namespace, String(m.name ?? ''));
    if (!held.admit(namespace, key, this.options.maxObjectsPerNamespace)) return;
    try {
      const max = this.options.maxObjectBytes;
      if (bytes > max) throw new NmiError(codes.API_SERVER, `${bytes} bytes, over the limit of ${max} for one object`);
      held.items.set(key, this.resource.parse(raw));
      held.invalid.delete(key);
    } catch (err) {
      held.items.delete(key);
      const rv = String(m.resourceVersion ?? '');
      // Said once per version, across lists too.
      if (this.#held.invalid.get(key)?.rv !== rv) this.log.warn({ resource: this.resource.plural, object: key, err: messageOf(err) }, 'ignoring invalid object');
      held.invalid.set(key, { rv, reason: messageOf(err) });
    }
  }
}
