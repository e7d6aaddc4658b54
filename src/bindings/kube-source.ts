// --bindings kubernetes: list + watch aad-pod-identity's three custom resources and
// the service accounts (Workload ID's annotations), each with a reflector
// (kube/reflector.ts), and get the Secrets their identities name (secret-fetcher.ts).
// The kubeconfig (or in-cluster service account) is read by kube/kubeconfig.ts;
// requests go through kube/client.ts.
import type { Logger } from '../log/logger.js';
import { KubeClient } from '../kube/client.js';
import { loadKubeConfig, type KubeConfigOptions } from '../kube/kubeconfig.js';
import { Reflector, type Resource } from '../kube/reflector.js';
import type { AzureIdentity, AzureIdentityBinding, AzurePodIdentityException, WorkloadServiceAccount } from './model.js';
import { parseBinding, parseException, parseIdentity, parseServiceAccount, type BindingSet } from './parse.js';
import { SecretFetcher } from './secret-fetcher.js';
import { objectKey } from '../kube/object-key.js';
import type { BindingSource } from './source.js';

export const CRD_PATH = '/apis/aadpodidentity.k8s.io/v1';

export interface KubeSourceOptions extends KubeConfigOptions {
  nodeName?: string;
  backoff?: { initialMs: number; maxMs: number };
  /** How often every named Secret is fetched again, to follow rotations. */
  secretRefreshMs?: number;
  /** --cross-namespace-secrets: fetch a Secret an identity names in another namespace (otherwise never read). */
  crossNamespaceSecrets?: boolean;
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
  /** Identities (namespace/name) whose Secrets this node needs; none until told. */
  #needed: ReadonlySet<string> = new Set();
  /** Waiting for the wanted Secrets to be tried and delivered in a set. */
  #settledWaiters: (() => void)[] = [];
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
    // Optional: service accounts only serve Workload ID's convention, so RBAC from before it leaves them out.
    this.#serviceAccounts = reflector('serviceaccounts', parseServiceAccount, { path: '/api/v1/serviceaccounts', optional: true });
    this.#reflectors = [this.#identities, this.#bindings, this.#exceptions, this.#serviceAccounts];
    this.#secrets = new SecretFetcher(this.#client, this.#log, { ...this.#options.backoff, crossNamespace: this.#options.crossNamespaceSecrets ?? false }, this.#abort.signal, changed);
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
    // Whoever waits for a Secret is answered with what there is: nothing more comes.
    for (const resolve of this.#settledWaiters.splice(0)) resolve();
    void this.#client.close();
  }

  needSecrets(identityNames: ReadonlySet<string>): void {
    if (identityNames.size === this.#needed.size && [...identityNames].every((n) => this.#needed.has(n))) return;
    this.#needed = new Set(identityNames);
    this.#schedule();
  }

  secretsSettled(): Promise<void> {
    if (this.#emitted && !this.#scheduled && this.#secrets.settled) return Promise.resolve();
    return new Promise((resolve) => this.#settledWaiters.push(resolve));
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

  #invalid(): Map<string, string> {
    const invalid = new Map<string, string>();
    const kinds = [['AzureIdentity', this.#identities], ['AzureIdentityBinding', this.#bindings], ['AzurePodIdentityException', this.#exceptions]] as const;
    for (const [kind, reflector] of kinds) for (const [key, why] of reflector.invalid) invalid.set(`${kind} ${key}`, why);
    return invalid;
  }

  #emit(): void {
    if (this.#abort.signal.aborted) return;
    const identities = [...this.#identities.items.values()];
    // Only the Secrets of identities bound to this node's pods: a node never holds the cluster's.
    if (this.#identities.synced) this.#secrets.want(identities.filter((i) => this.#needed.has(objectKey(i.namespace, i.name))));
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
      invalid: this.#invalid(),
    });
    if (this.#secrets.settled) for (const resolve of this.#settledWaiters.splice(0)) resolve();
  }
}
