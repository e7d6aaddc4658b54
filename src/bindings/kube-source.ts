// --bindings kubernetes: list + watch aad-pod-identity's three custom resources and
// the service accounts (Workload ID's annotations), and get the Secrets their
// identities name. The kubeconfig (or in-cluster service
// account) is read by kube/kubeconfig.ts; requests go through kube/client.ts.
//
// Per resource, a small reflector: list (paged) → watch from the list's
// resourceVersion → on a dropped connection watch again from the last
// resourceVersion seen → on 410 Gone (HTTP status or ERROR event) list again.
import { setTimeout as sleep } from 'node:timers/promises';
import { codes, NmiError } from '../errors/errors.js';
import type { Logger } from '../log/logger.js';
import type { AzureIdentity, AzureIdentityBinding, AzurePodIdentityException, Secret, WorkloadServiceAccount } from './model.js';
import { objectKey, parseBinding, parseException, parseIdentity, parseSecret, parseServiceAccount, type BindingSet } from './parse.js';
import type { BindingSource } from './source.js';
import { ApiError, KubeClient } from '../kube/client.js';
import { loadKubeConfig, type KubeConfigOptions } from '../kube/kubeconfig.js';
import { Backoff } from '../util/backoff.js';

export const CRD_PATH = '/apis/aadpodidentity.k8s.io/v1';

export interface KubeSourceOptions extends KubeConfigOptions {
  nodeName?: string;
  backoff?: { initialMs: number; maxMs: number };
  /** How often every named Secret is fetched again, to follow rotations. */
  secretRefreshMs?: number;
  /** The watch's server-side timeout; by default random in 5–10 minutes, as client-go does. */
  watchTimeoutSeconds?: number;
  /** Items per list page. */
  pageSize?: number;
}

const defaults = {
  backoff: { initialMs: 500, maxMs: 30_000 }, // 0.5 to 30 seconds
  secretRefreshMs: 60_000, // 1 minute
  pageSize: 500,
};

function message(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** The resourceVersion a list or watch must start over from. */
class GoneError extends Error {}

interface Resource<T> {
  plural: string;
  /**
   * Forbidden to nmi (RBAC from before it was read) counts as synced and empty, so the rest still
   * syncs; it is listed again with backoff. Service accounts only serve Workload ID's convention.
   */
  optional?: boolean;
  /** Where it is listed and watched. */
  path: string;
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
class Reflector<T> {
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
        const delay = backoff.next();
        if (err instanceof GoneError || (err instanceof ApiError && err.status === 410)) {
          // Backed off too, so a server that keeps answering 410 is not hammered.
          this.log.info({ resource: this.resource.plural }, 'resourceVersion expired, listing again');
          relist = true;
        } else if (this.resource.optional && err instanceof ApiError && err.status === 403) {
          if (!this.#synced) this.log.warn({ resource: this.resource.plural, err: message(err) }, `nmi may not list and watch ${this.resource.plural}: going on without them`);
          this.#synced = true;
          this.onChange();
        } else {
          this.log.warn({ resource: this.resource.plural, err: message(err), retryInMs: Math.round(delay) }, 'API server request failed');
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
      const query = new URLSearchParams({ limit: String(this.options.pageSize) });
      if (next) query.set('continue', next);
      const page = await this.client.getJson(`${this.path}?${query}`, signal);
      if (!isObject(page) || !Array.isArray(page.items) || !isObject(page.metadata)) {
        throw new NmiError(codes.BINDINGS, `GET ${this.path}: not a list`);
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
    if (events === 0 && Date.now() - started < 1000) throw new NmiError(codes.BINDINGS, `watch ${this.path} closed at once`);
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
        throw new NmiError(codes.BINDINGS, `watch ${this.path}: unknown event type ${String(event.type)}`);
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
        this.#invalid.set(key, { rv, reason: message(err) });
        this.log.warn({ err: message(err) }, 'ignoring invalid object');
      }
    }
    return key;
  }
}

/** The Secrets identities name, fetched when an identity changes and every refresh interval. */
class SecretFetcher {
  readonly values = new Map<string, Secret>();
  /** Wanted secret key → the identity versions wanting it; a new stamp means fetch again. */
  #wanted = new Map<string, string>();
  readonly #fetched = new Map<string, string>();
  readonly #attempted = new Map<string, string>();
  readonly #backoff: Backoff;
  #running = false;
  #again = false;
  #retry: NodeJS.Timeout | undefined;

  constructor(
    private readonly client: KubeClient,
    private readonly log: Logger,
    backoff: { initialMs: number; maxMs: number },
    private readonly signal: AbortSignal,
    private readonly onChange: () => void,
  ) {
    this.#backoff = new Backoff(backoff);
  }

  /** Every wanted secret was tried at least once since it was last wanted anew. */
  get settled(): boolean {
    for (const [key, stamp] of this.#wanted) if (this.#attempted.get(key) !== stamp) return false;
    return true;
  }

  want(identities: Iterable<AzureIdentity>): void {
    const wanted = new Map<string, string[]>();
    for (const id of identities) {
      if (!id.clientPassword) continue;
      const key = objectKey(id.clientPassword.namespace, id.clientPassword.name);
      wanted.set(key, [...(wanted.get(key) ?? []), `${id.namespace}/${id.name}@${id.version}`]);
    }
    const next = new Map([...wanted].map(([k, v]) => [k, v.sort().join(',')]));
    let dropped = false;
    for (const key of new Set([...this.values.keys(), ...this.#attempted.keys()])) {
      if (next.has(key)) continue;
      dropped = this.values.delete(key) || dropped;
      this.#fetched.delete(key);
      this.#attempted.delete(key);
    }
    // Only a new need starts a fetch here; failed fetches wait for their backoff.
    const renewed = [...next].some(([key, stamp]) => this.#wanted.get(key) !== stamp);
    this.#wanted = next;
    if (dropped) this.onChange();
    if (renewed) this.#kick();
  }

  refreshAll(): void {
    this.#fetched.clear();
    this.#kick();
  }

  stop(): void {
    clearTimeout(this.#retry);
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
      const results = await Promise.all(due.map(([key, stamp]) => this.#fetch(key, stamp)));
      failed = results.includes(false);
      attempted += due.length;
    } while (this.#again && !this.signal.aborted);
    if (this.signal.aborted) return;
    if (attempted > 0) this.onChange();
    clearTimeout(this.#retry);
    if (failed) this.#retry = setTimeout(() => this.#kick(), this.#backoff.next()).unref();
    else this.#backoff.reset();
  }

  /** False when the API server could not answer (retried later); a missing secret is an answer. */
  async #fetch(key: string, stamp: string): Promise<boolean> {
    const [namespace = '', name = ''] = key.split('/');
    const path = `/api/v1/namespaces/${encodeURIComponent(namespace)}/secrets/${encodeURIComponent(name)}`;
    try {
      let secret: Secret | undefined;
      try {
        secret = parseSecret(await this.client.getJson(path, this.signal));
      } catch (err) {
        // Not found, or not a valid Secret: an answer, so the secret is left out.
        const missing = err instanceof ApiError ? err.status === 404 : err instanceof NmiError;
        if (!missing) throw err;
        if (this.#fetched.get(key) !== stamp) this.log.warn({ secret: key, err: message(err) }, 'secret unusable');
      }
      if (secret) this.values.set(key, secret);
      else this.values.delete(key);
      this.#fetched.set(key, stamp);
      return true;
    } catch (err) {
      if (!this.signal.aborted) this.log.warn({ secret: key, err: message(err) }, 'secret fetch failed, keeping the last value');
      return false;
    } finally {
      this.#attempted.set(key, stamp);
    }
  }
}

export class KubeBindingSource implements BindingSource {
  readonly #client: KubeClient;
  readonly #log: Logger;
  readonly #options: KubeSourceOptions & typeof defaults;
  readonly #abort = new AbortController();
  readonly #identities: Reflector<AzureIdentity>;
  readonly #bindings: Reflector<AzureIdentityBinding>;
  readonly #exceptions: Reflector<AzurePodIdentityException>;
  readonly #serviceAccounts: Reflector<WorkloadServiceAccount>;
  readonly #reflectors: Reflector<unknown>[];
  readonly #secrets: SecretFetcher;
  #onSet: ((set: BindingSet) => void) | undefined;
  #scheduled = false;
  #emitted = false;
  #refresh: NodeJS.Timeout | undefined;

  /** Reads the config now: throws UsageError when there is none. */
  constructor(log: Logger, options: KubeSourceOptions = {}) {
    this.#options = { ...defaults, ...options };
    this.#log = log.child({ bindings: 'kubernetes' });
    const userAgent = `nmi${options.nodeName ? ` (node ${options.nodeName})` : ''}`;
    this.#client = new KubeClient(loadKubeConfig(options), userAgent);
    const changed = (): void => this.#schedule();
    const reflector = <T>(plural: string, parse: (raw: unknown) => T, more: Partial<Resource<T>> = {}): Reflector<T> =>
      new Reflector(this.#client, { plural, path: `${CRD_PATH}/${plural}`, parse, ...more }, this.#log, this.#options, changed);
    this.#identities = reflector('azureidentities', parseIdentity);
    this.#bindings = reflector('azureidentitybindings', parseBinding);
    this.#exceptions = reflector('azurepodidentityexceptions', parseException);
    this.#serviceAccounts = reflector('serviceaccounts', parseServiceAccount, { path: '/api/v1/serviceaccounts', optional: true });
    this.#reflectors = [this.#identities, this.#bindings, this.#exceptions, this.#serviceAccounts];
    this.#secrets = new SecretFetcher(this.#client, this.#log, this.#options.backoff, this.#abort.signal, changed);
  }

  get server(): string {
    return this.#client.server;
  }

  async start(onSet: (set: BindingSet) => void): Promise<void> {
    await this.#client.check();
    this.#onSet = onSet;
    // Each loop retries on its own: an API server down at start is waited for.
    for (const r of this.#reflectors) void r.run(this.#abort.signal);
    this.#refresh = setInterval(() => this.#secrets.refreshAll(), this.#options.secretRefreshMs).unref();
  }

  stop(): void {
    this.#abort.abort();
    clearInterval(this.#refresh);
    this.#secrets.stop();
    void this.#client.close();
  }

  // Coalesces a burst of events (a relist, a busy watch) into one set.
  #schedule(): void {
    if (this.#scheduled || this.#abort.signal.aborted) return;
    this.#scheduled = true;
    setImmediate(() => {
      this.#scheduled = false;
      this.#emit();
    });
  }

  #rejected(): Map<string, string> {
    const rejected = new Map<string, string>();
    const kinds = [['AzureIdentity', this.#identities], ['AzureIdentityBinding', this.#bindings], ['AzurePodIdentityException', this.#exceptions]] as const;
    for (const [kind, reflector] of kinds) for (const [key, why] of reflector.invalid) rejected.set(`${kind} ${key}`, why);
    return rejected;
  }

  #emit(): void {
    if (this.#abort.signal.aborted) return;
    const identities = [...this.#identities.items.values()];
    if (this.#identities.synced) this.#secrets.want(identities);
    if (!this.#reflectors.every((r) => r.synced)) return;
    // The first set waits for the secrets; later ones do not hold a deletion back for a fetch.
    if (!this.#emitted && !this.#secrets.settled) return;
    this.#emitted = true;
    this.#onSet?.({
      identities,
      bindings: [...this.#bindings.items.values()],
      exceptions: [...this.#exceptions.items.values()],
      secrets: [...this.#secrets.values.values()],
      serviceAccounts: [...this.#serviceAccounts.items.values()].filter((a) => a.clientID !== ''),
      rejected: this.#rejected(),
    });
  }
}
