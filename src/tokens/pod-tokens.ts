// How a pod of this node gets a token: which identities it is bound to
// (bindings/match.ts), the credential each signs in with, the budget its calls
// wait in, and the cache (token-cache.ts) that answers. The token servers ask
// here; `nmi run` keeps it in step with the pods and the bindings.
import { identitiesFor, secretFor, serviceAccountOf, usesWorkloadIdentity, type MatchOptions } from '../bindings/match.js';
import { identityKey, IdentityType, type AzureIdentity, type PodIdentities } from '../bindings/model.js';
import type { NodeNeeds } from '../bindings/source.js';
import type { BindingStore } from '../bindings/store.js';
import type { Budgets } from '../budget/budgets.js';
import type { UpstreamBudget } from '../budget/budget.js';
import { codes, NmiError } from '../errors/errors.js';
import { objectKey } from '../kube/object-key.js';
import type { ServiceAccountTokens } from '../kube/service-account-token.js';
import { isCaller, type PodIndex } from '../kubelet/pod-index.js';
import type { Pod } from '../kubelet/pod.js';
import type { Logger } from '../log/logger.js';
import type { Credential, MsalTokenProvider } from './msal-provider.js';
import type { PodRef } from './pod-bounds.js';
import { TokenCache } from './token-cache.js';
import type { Token } from './token.js';

export interface PodTokensDeps {
  pods: Pick<PodIndex, 'pods' | 'knownUid' | 'ready'>;
  /** need and settled: with bindings from the API server, whose Secrets and ServiceAccounts are read per node. */
  bindings: Pick<BindingStore, 'snapshot' | 'ready'> & Partial<Pick<BindingStore, 'need' | 'settled'>>;
  match: MatchOptions;
  provider: MsalTokenProvider;
  budgets: Budgets;
  /** --max-tokens-per-pod. */
  maxTokensPerPod: number;
  /** None: federated identities cannot be used (no API server to request service-account tokens from). */
  serviceAccountTokens?: ServiceAccountTokens;
  log: Logger;
}

/** What keys a pod's upstream bounds: its uid (a pod recreated under its name starts afresh). */
export function podRef(pod: Pod): PodRef {
  return { key: pod.uid || `${pod.namespace}/${pod.name}`, name: `${pod.namespace}/${pod.name}` };
}

/** An account's pods on the node as NodeNeeds stamps them: another set of pods reads the account again. */
function podsStamp(uids: string[]): string {
  return uids.sort().join(',');
}

export class PodTokens {
  readonly cache: TokenCache;
  /** What the bindings source reads for this node's pods. */
  #needs: NodeNeeds = { secrets: new Set(), serviceAccounts: new Map() };

  constructor(private readonly deps: PodTokensDeps) {
    const { provider, budgets } = deps;
    this.cache = new TokenCache({
      provider,
      budgetFor: (identity) => this.budgetFor(identity),
      maxTokensPerPod: deps.maxTokensPerPod,
      onThrottled: (reason) => budgets.throttled(reason),
      logger: deps.log,
    });
  }

  /** The identities bound to the pod, in the order they are served, or its exception. */
  identitiesOf(pod: Pod): PodIdentities {
    return identitiesFor(pod, this.deps.bindings.snapshot, this.deps.match);
  }

  /** A token of identity for resource, asked by pod: within its bounds, signed in with the identity's credential. */
  get(identity: AzureIdentity, resource: string, pod: Pod): Promise<Token> {
    return this.cache.get(identity, resource, () => this.credentialFor(identity, pod), podRef(pod));
  }

  /** A fresh cached token without waiting, or undefined (then `get` decides). */
  peek(identity: AzureIdentity, resource: string): Token | undefined {
    return this.cache.peek(identity, resource);
  }

  /**
   * Keeps what the node's pods use, after any pod or bindings change: tokens of identities bound to a pod
   * of this node, the Secrets of those that have one, the ServiceAccounts of pods under Workload ID's
   * convention, the bounds of pods still here. Before both first syncs nothing is dropped.
   */
  retain(): void {
    const { pods, bindings } = this.deps;
    const listed = pods.pods();
    this.cache.retainPods(listed.map((pod) => podRef(pod).key));
    if (!bindings.ready || !pods.ready) return;
    const used = new Set<string>();
    const secrets = new Set<string>();
    const accounts = new Map<string, string[]>();
    for (const pod of listed) {
      if (!isCaller(pod)) continue;
      if (usesWorkloadIdentity(pod)) {
        const account = serviceAccountOf(pod);
        accounts.set(account, [...(accounts.get(account) ?? []), pod.uid]);
      }
      for (const identity of this.identitiesOf(pod).identities) {
        used.add(identityKey(identity));
        if (identity.clientPassword) secrets.add(objectKey(identity.namespace, identity.name));
      }
    }
    this.cache.retainOnly(used);
    this.#need({ secrets, serviceAccounts: new Map([...accounts].map(([key, uids]) => [key, podsStamp(uids)])) });
  }

  #need(needs: NodeNeeds): void {
    this.#needs = needs;
    this.deps.bindings.need?.(needs);
  }

  /**
   * Resolves once what decides the pod's identities was read: the ServiceAccount of a pod under Workload ID's
   * convention that asks before the next retain (just listed) has it read now, and waits for it.
   */
  async settle(pod: Pod): Promise<void> {
    if (!usesWorkloadIdentity(pod)) return;
    const account = serviceAccountOf(pod);
    const uids = this.#needs.serviceAccounts.get(account)?.split(',') ?? [];
    if (!uids.includes(pod.uid)) {
      const serviceAccounts = new Map(this.#needs.serviceAccounts).set(account, podsStamp([...uids, pod.uid]));
      this.#need({ ...this.#needs, serviceAccounts });
    }
    await this.deps.bindings.settled?.();
  }

  /** A changed or deleted identity or binding (by `namespace/name`) never gets another token from the old entry. */
  invalidate(identityNames: Iterable<string>): void {
    for (const name of identityNames) this.cache.invalidate(name);
    this.retain();
  }

  /**
   * A service principal's credential from its Secret, fetched when first needed: a pod that asks before the
   * next retain (a /host/token caller, a pod just listed) has it fetched now, and waits for it.
   */
  private async secretOf(identity: AzureIdentity): Promise<Credential> {
    const name = objectKey(identity.namespace, identity.name);
    if (!this.#needs.secrets.has(name)) this.#need({ ...this.#needs, secrets: new Set([...this.#needs.secrets, name]) });
    await this.deps.bindings.settled?.();
    return secretFor(identity, this.deps.bindings.snapshot, this.deps.match);
  }

  /** The budget an identity's calls wait in: IMDS's for a user-assigned identity, else its Entra ID tenant's. */
  private budgetFor(identity: AzureIdentity): UpstreamBudget {
    const { budgets, provider } = this.deps;
    return identity.type === IdentityType.UserAssignedMSI ? budgets.imds : budgets.entra(provider.authorityOf(identity).authority);
  }

  /**
   * What the identity signs in with, read when a call is made. A federated identity's: a token of the pod's
   * service account, requested then; a refresh asks for it through a pod of that account still on the node.
   */
  private credentialFor(identity: AzureIdentity, pod: Pod): Credential | undefined | Promise<Credential> {
    if (identity.type === IdentityType.UserAssignedMSI) return undefined;
    if (identity.type !== IdentityType.Federated) return this.secretOf(identity);
    const { pods, serviceAccountTokens } = this.deps;
    const account = serviceAccountOf(pod);
    return {
      assertion: async () => {
        if (!serviceAccountTokens) throw new NmiError(codes.TOKEN, 'federated identities need the API server for service-account tokens: --bindings kubernetes, or --kubeconfig');
        const asker = pods.knownUid(pod.uid) ?? pods.pods().find((p) => isCaller(p) && serviceAccountOf(p) === account);
        if (!asker) throw new NmiError(codes.TOKEN, `no pod of service account ${account} runs on this node any more`);
        return serviceAccountTokens.forPod(asker);
      },
    };
  }
}
