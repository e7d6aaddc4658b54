// The Secrets --bindings kubernetes' service principals name, fetched with a GET each (not
// watched: nmi reads only the few its identities name).
import { messageOf, NmiError } from '../errors/errors.js';
import type { Logger } from '../log/logger.js';
import { ApiError, type KubeClient } from '../kube/client.js';
import { objectKey } from '../kube/object-key.js';
import { Backoff } from '../util/backoff.js';
import type { AzureIdentity, Secret } from './model.js';
import { parseSecret } from './parse.js';

/** Secret GETs in flight at once. */
const MAX_CONCURRENT_FETCHES = 4;

/** The Secrets identities name, fetched when an identity changes and every refresh interval. */
export class SecretFetcher {
  readonly values = new Map<string, Secret>();
  /** Wanted secret key → the identity versions wanting it; a new stamp means fetch again. */
  #wanted = new Map<string, string>();
  readonly #fetched = new Map<string, string>();
  readonly #attempted = new Map<string, string>();
  readonly #backoff: Backoff;
  #running = false;
  #again = false;
  #retry: NodeJS.Timeout | undefined;
  readonly #crossNamespace: boolean;

  constructor(
    private readonly client: KubeClient,
    private readonly log: Logger,
    options: { initialMs: number; maxMs: number; crossNamespace: boolean },
    private readonly signal: AbortSignal,
    private readonly onChange: () => void,
  ) {
    this.#backoff = new Backoff(options);
    this.#crossNamespace = options.crossNamespace;
  }

  /** Every wanted secret was tried at least once since it was last wanted anew. */
  get settled(): boolean {
    for (const [key, stamp] of this.#wanted) if (this.#attempted.get(key) !== stamp) return false;
    return true;
  }

  want(identities: Iterable<AzureIdentity>): void {
    const wanted = new Map<string, string[]>();
    for (const id of identities) {
      // Another namespace's Secret is never read unless allowed: secretFor then says why the identity is unusable.
      if (!id.clientPassword || (id.clientPassword.namespace !== id.namespace && !this.#crossNamespace)) continue;
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
      // A few at a time: a node bound to many service principals opens a few connections, not one per Secret.
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

  /** False when the API server could not answer (retried later); a missing secret is an answer. */
  async #fetch(key: string, stamp: string): Promise<boolean> {
    const [namespace = '', name = ''] = key.split('/');
    const path = `/api/v1/namespaces/${encodeURIComponent(namespace)}/secrets/${encodeURIComponent(name)}`;
    try {
      let secret: Secret | undefined;
      try {
        secret = parseSecret(await this.client.getJson(path, this.signal));
      } catch (err) {
        // Not found, not a valid Secret, or not ours to read (403: the cluster did not grant
        // deploy/grants/service-principals): an answer, so the secret is left out and asked
        // again only at the next refresh, not in a retry loop.
        const missing = err instanceof ApiError ? err.status === 404 || err.status === 403 : err instanceof NmiError;
        if (!missing) throw err;
        if (this.#fetched.get(key) !== stamp) this.log.warn({ secret: key, err: messageOf(err) }, 'secret unusable');
      }
      if (secret) this.values.set(key, secret);
      else this.values.delete(key);
      this.#fetched.set(key, stamp);
      return true;
    } catch (err) {
      if (!this.signal.aborted) this.log.warn({ secret: key, err: messageOf(err) }, 'secret fetch failed, keeping the last value');
      return false;
    } finally {
      this.#attempted.set(key, stamp);
    }
  }
}
