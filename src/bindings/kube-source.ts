// --bindings kubernetes: list + watch aad-pod-identity's three custom resources, each with a
// reflector (kube/reflector.ts), cluster-wide (a binding's selector can name any pod); read the
// Secrets and ServiceAccounts this node's pods need, one GET each (kube/named-objects.ts), never the
// cluster's. The kubeconfig (or in-cluster service account) is read by kube/kubeconfig.ts; requests
// go through kube/client.ts.
import type { Logger } from '../log/logger.js';
import { KubeClient } from '../kube/client.js';
import { loadKubeConfig, type KubeConfigOptions } from '../kube/kubeconfig.js';
import { NamedObjects } from '../kube/named-objects.js';
import { Reflector, type ReflectorOptions } from '../kube/reflector.js';
import type { AzureIdentity, AzureIdentityBinding, AzurePodIdentityException, Secret, WorkloadServiceAccount } from './model.js';
import { parseBinding, parseException, parseIdentity, parseSecret, parseServiceAccount, type BindingSet } from './parse.js';
import { objectKey } from '../kube/object-key.js';
import type { BindingSource, NodeNeeds } from './source.js';

export const CRD_PATH = '/apis/aadpodidentity.k8s.io/v1';

export interface KubeSourceOptions extends KubeConfigOptions, Partial<ReflectorOptions> {
  nodeName?: string;
  /** How often each Secret and ServiceAccount the node's pods need is read again, to follow rotations and annotations. */
  refreshMs?: number;
  /** --cross-namespace-secrets: fetch a Secret an identity names in another namespace (otherwise never read). */
  crossNamespaceSecrets?: boolean;
}

/** The built-in bounds; tests shorten some. */
export const kubeSourceDefaults = {
  backoff: { initialMs: 500, maxMs: 30_000 }, // 0.5 to 30 seconds, full jitter (util/backoff.ts)
  refreshMs: 5 * 60_000, // 5 minutes, ±25 % per round
  pageSize: 100,
  maxPageBytes: 4 * 1024 * 1024, // one list page or one watch event
  maxObjectBytes: 64 * 1024, // one custom resource: aad-pod-identity's are a few hundred bytes
  maxObjectsPerNamespace: 1_000, // of each custom resource: a tenant's own namespace, not the nodes' memory
  stallMs: 150_000, // 2.5 minutes: two bookmarks missed
  maxSecretBytes: 2 * 1024 * 1024, // Kubernetes' own limit is 1 MiB of data, base64 in JSON
  maxServiceAccountBytes: 512 * 1024, // 256 KiB of annotations at most, and the rest
};

/** Where one named object of a core v1 kind is read. */
const objectPath = (plural: string) => (namespace: string, name: string) => `/api/v1/namespaces/${encodeURIComponent(namespace)}/${plural}/${encodeURIComponent(name)}`;

export class KubeBindingSource implements BindingSource {
  readonly #client: KubeClient;
  readonly #log: Logger;
  readonly #options: KubeSourceOptions & typeof kubeSourceDefaults;
  readonly #abort = new AbortController();
  readonly #identities: Reflector<AzureIdentity>;
  readonly #bindings: Reflector<AzureIdentityBinding>;
  readonly #exceptions: Reflector<AzurePodIdentityException>;
  readonly #reflectors: Reflector<unknown>[];
  readonly #secrets: NamedObjects<Secret>;
  readonly #serviceAccounts: NamedObjects<WorkloadServiceAccount>;
  #onSet: ((set: BindingSet) => void) | undefined;
  /** What this node's pods need; nothing until told. */
  #needs: NodeNeeds = { secrets: new Set(), serviceAccounts: new Map() };
  /** Waiting for what is needed to be tried and delivered in a set. */
  #settledWaiters: (() => void)[] = [];
  #scheduled = false;
  #emitted = false;

  /** Reads the config now: throws UsageError when there is none. */
  constructor(log: Logger, options: KubeSourceOptions = {}) {
    const o = { ...kubeSourceDefaults, ...options };
    this.#options = o;
    this.#log = log.child({ bindings: 'kubernetes' });
    const userAgent = `nmi${options.nodeName ? ` (node ${options.nodeName})` : ''}`;
    this.#client = new KubeClient(loadKubeConfig(options), userAgent);
    const changed = (): void => this.#schedule();
    const reflector = <T>(plural: string, parse: (raw: unknown) => T): Reflector<T> =>
      new Reflector(this.#client, { plural, path: `${CRD_PATH}/${plural}`, parse }, this.#log, o, changed);
    this.#identities = reflector('azureidentities', parseIdentity);
    this.#bindings = reflector('azureidentitybindings', parseBinding);
    this.#exceptions = reflector('azurepodidentityexceptions', parseException);
    this.#reflectors = [this.#identities, this.#bindings, this.#exceptions];
    const named = { backoff: o.backoff, refreshMs: o.refreshMs };
    const signal = this.#abort.signal;
    this.#secrets = new NamedObjects(
      this.#client,
      { kind: 'secret', path: objectPath('secrets'), parse: (raw) => parseSecret(raw), maxBytes: o.maxSecretBytes, forbiddenHint: 'nmi needs get on secrets (deploy/grants/service-principals)' },
      this.#log, named, signal, changed,
    );
    this.#serviceAccounts = new NamedObjects(
      this.#client,
      { kind: 'serviceaccount', path: objectPath('serviceaccounts'), parse: (raw) => parseServiceAccount(raw), maxBytes: o.maxServiceAccountBytes, forbiddenHint: 'nmi needs get on serviceaccounts (deploy/grants/federation)' },
      this.#log, named, signal, changed,
    );
  }

  get server(): string {
    return this.#client.server;
  }

  async start(onSet: (set: BindingSet) => void): Promise<void> {
    await this.#client.check();
    this.#onSet = onSet;
    // Each loop retries on its own: an API server down at start is waited for.
    for (const r of this.#reflectors) void r.run(this.#abort.signal);
  }

  stop(): void {
    this.#abort.abort();
    this.#secrets.stop();
    this.#serviceAccounts.stop();
    // Whoever waits for a Secret is answered with what there is: nothing more comes.
    for (const resolve of this.#settledWaiters.splice(0)) resolve();
    void this.#client.close();
  }

  need(needs: NodeNeeds): void {
    // Told after every pod change: the same needs again change nothing.
    const digest = (n: NodeNeeds): string => JSON.stringify([[...n.secrets].sort(), [...n.serviceAccounts].sort()]);
    if (digest(needs) === digest(this.#needs)) return;
    this.#needs = needs;
    this.#serviceAccounts.want(needs.serviceAccounts);
    this.#schedule();
  }

  settled(): Promise<void> {
    if (this.#emitted && !this.#scheduled && this.#fetched) return Promise.resolve();
    return new Promise((resolve) => this.#settledWaiters.push(resolve));
  }

  get #fetched(): boolean {
    return this.#secrets.settled && this.#serviceAccounts.settled;
  }

  /** The Secrets the needed identities name, each stamped with their versions: an identity changed reads it again. */
  #wantedSecrets(identities: readonly AzureIdentity[]): Map<string, string> {
    const wanted = new Map<string, string[]>();
    for (const id of identities) {
      if (!this.#needs.secrets.has(objectKey(id.namespace, id.name)) || !id.clientPassword) continue;
      // Another namespace's Secret is never read unless allowed: secretFor then says why the identity is unusable.
      if (id.clientPassword.namespace !== id.namespace && !this.#options.crossNamespaceSecrets) continue;
      const key = objectKey(id.clientPassword.namespace, id.clientPassword.name);
      wanted.set(key, [...(wanted.get(key) ?? []), `${id.namespace}/${id.name}@${id.version}`]);
    }
    return new Map([...wanted].map(([k, v]) => [k, v.sort().join(',')]));
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
    if (this.#identities.synced) this.#secrets.want(this.#wantedSecrets(identities));
    if (!this.#reflectors.every((r) => r.synced)) return;
    // The first set waits for what is needed; later ones do not hold a deletion back for a fetch.
    if (!this.#emitted && !this.#fetched) return;
    this.#emitted = true;
    this.#onSet?.({
      identities,
      bindings: [...this.#bindings.items.values()],
      exceptions: [...this.#exceptions.items.values()],
      secrets: [...this.#secrets.values.values()],
      serviceAccounts: [...this.#serviceAccounts.values.values()].filter((a) => a.clientID !== ''),
      invalid: this.#invalid(),
    });
    if (this.#fetched) for (const resolve of this.#settledWaiters.splice(0)) resolve();
  }
}
