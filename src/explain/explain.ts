// `nmi explain`: why a pod gets a token or does not, from what the daemon holds
// at this moment: the kubelet's pod, each binding in reach and why it matches or
// not, the exceptions, the identities it would be served, the tokens cached for
// them (when they end, never the token) and what the pod was refused lately.
// The same steps as the token core's 6 and 7 (server/core.ts), each one said:
// bindings/match.ts says why each binding, exception and Workload ID's convention
// applies or not, and this file puts that in words.
import {
  BINDING_LABEL,
  bindingsInReach,
  bindingVerdict,
  exceptionsInReach,
  exceptionVerdict,
  identitiesFor,
  secretFor,
  SERVED_ORDER,
  serviceAccountOf,
  WORKLOAD_USE_LABEL,
  workloadVerdict,
  type BindingVerdict,
  type MatchOptions,
  type WorkloadVerdict,
} from '../bindings/match.js';
import { IdentityType, identityKey, type AzureIdentity, type AzureIdentityBinding } from '../bindings/model.js';
import { WORKLOAD_CLIENT_ID } from '../bindings/parse.js';
import { messageOf } from '../errors/errors.js';
import { objectKey } from '../kube/object-key.js';
import type { BindingSnapshot } from '../bindings/store.js';
import { isCaller, plainAddress } from '../kubelet/pod-index.js';
import type { Pod } from '../kubelet/pod.js';
import type { MultipleIdentities } from '../config/commands.js';
import type { CachedTokenInfo } from '../tokens/token-cache.js';
import type { Refusal, RecentRefusals } from './refusals.js';
import type { ServedToken } from '../audit/audit.js';

export type ExplainQuery = { namespace: string; name: string } | { address: string };

export interface ExplainDeps {
  /** Every pod of the kubelet's last listing, and when it was made (wall-clock ms). */
  pods(): readonly Pod[];
  syncedAt(): number | undefined;
  /** Asks the kubelet again (coalesced) when the pod is not in the last listing. */
  refreshPods(): Promise<void>;
  snapshot(): BindingSnapshot;
  bindingsFrom: string;
  match: MatchOptions;
  multipleIdentities: MultipleIdentities;
  retryAfter: boolean;
  tokens(identityKeys: ReadonlySet<string>, podUid: string): CachedTokenInfo[];
  refusals: Pick<RecentRefusals, 'forPod' | 'forAddress'>;
  /** --audit-log: the pod's last served token per identity and resource. */
  served?(podUid: string): ServedToken[];
  now?: () => number;
}

export interface PodFacts {
  namespace: string;
  name: string;
  uid: string;
  phase: string;
  addresses: string[];
  hostNetwork: boolean;
  createdAt?: string;
  ageSeconds?: number;
  labels: Record<string, string>;
  /** namespace/name: a federated identity is exchanged for its tokens. */
  serviceAccount: string;
  /** Whether a request from its address is attributed to it (server/core.ts step 6), and if not why. */
  caller: boolean;
  notCaller?: string;
}

export interface BindingFacts {
  binding: string;
  selector: string;
  identity: string;
  matches: boolean;
  reason: string;
}

export interface IdentityFacts {
  identity: string;
  type: string;
  clientID: string;
  resourceID?: string;
  tenantID?: string;
  /** Type 3: the service account whose tokens are exchanged. */
  serviceAccount?: string;
  usable: boolean;
  problem?: string;
}

export interface Explanation {
  query: string;
  kubelet: { listed: boolean; pods: number; syncedAt?: string };
  bindingsFrom: string;
  pod?: PodFacts;
  bindings: BindingFacts[];
  exceptions: Array<{ exception: string; matches: boolean; reason: string }>;
  /** Workload ID's convention (its label, the service account's annotations): used, or why not. */
  workloadIdentity: { used: boolean; reason: string };
  identities: IdentityFacts[];
  /** What a request naming no identity gets. */
  withoutId: { identity?: string; answer: string };
  tokens: Array<Omit<CachedTokenInfo, 'expiresOn' | 'refreshAtMs'> & { expiresOn?: string; refreshAt?: string }>;
  refusals: Array<Omit<Refusal, 'firstAt' | 'lastAt'> & { firstAt: string; lastAt: string }>;
  /** --audit-log only: the last token served per identity and resource, by its uti claim (tokenId), newest first. */
  served?: ServedToken[];
  /** One sentence: what a token request from this pod gets now. */
  verdict: string;
}

const typeNames: Record<IdentityType, string> = {
  [IdentityType.UserAssignedMSI]: 'user-assigned managed identity (0)',
  [IdentityType.ServicePrincipal]: 'service principal with secret (1)',
  [IdentityType.ServicePrincipalCertificate]: 'service principal with certificate (2)',
  [IdentityType.Federated]: 'federated through Workload ID (3)',
};

const iso = (ms: number): string => new Date(ms).toISOString();

/** The pod the query names, from the last listing; asked again once when it is not there. */
async function findPod(query: ExplainQuery, deps: ExplainDeps): Promise<Pod | undefined> {
  const find = (): Pod | undefined => {
    const pods = deps.pods();
    if ('address' in query) {
      const owners = pods.filter((p) => p.ips.includes(query.address));
      // A live caller owns an address; a finished pod may have held it before.
      return owners.find(isCaller) ?? owners[0];
    }
    const named = pods.filter((p) => p.namespace === query.namespace && p.name === query.name);
    return named.find(isCaller) ?? named[0];
  };
  const found = find();
  if (found) return found;
  await deps.refreshPods().catch(() => {});
  return find();
}

export async function explain(query: ExplainQuery, deps: ExplainDeps): Promise<Explanation> {
  if ('address' in query) query = { address: plainAddress(query.address) };
  const pod = await findPod(query, deps);
  // After the lookup, which may have synced the pods just now.
  const now = (deps.now ?? Date.now)();
  const syncedAt = deps.syncedAt();
  const listedPods = deps.pods();
  const base: Explanation = {
    query: 'address' in query ? query.address : `${query.namespace}/${query.name}`,
    kubelet: { listed: pod !== undefined, pods: listedPods.length, syncedAt: syncedAt === undefined ? undefined : iso(syncedAt) },
    bindingsFrom: deps.bindingsFrom,
    bindings: [],
    exceptions: [],
    workloadIdentity: { used: false, reason: 'no pod' },
    identities: [],
    withoutId: { answer: 'no pod' },
    tokens: [],
    refusals: [],
    verdict: '',
  };
  if (!pod) {
    const unknown = 'address' in query ? deps.refusals.forAddress(query.address) : undefined;
    base.refusals = unknown ? [isoRefusal(unknown)] : [];
    base.withoutId = { answer: '404 not_found: no pod of this node owns the address' };
    base.verdict = `the kubelet of this node does not list ${'address' in query ? 'a pod with this address' : 'this pod'} (${listedPods.length} pods listed${syncedAt === undefined ? ', never synced' : `, synced ${Math.round((now - syncedAt) / 1000)} s ago`}): it runs on another node, has not started, or is gone`;
    return base;
  }

  const snapshot = deps.snapshot();
  const facts = podFacts(pod, listedPods, now);
  const bound = identitiesFor(pod, snapshot, deps.match);
  const identities = bound.identities.map((identity) => identityFacts(identity, snapshot, deps.match));
  const tokens = deps.tokens(new Set(bound.identities.map(identityKey)), pod.uid);
  const withoutId = servedWithoutId(bound.exception, identities, deps);
  const result: Explanation = {
    ...base,
    pod: facts,
    bindings: bindingsInReach(pod, snapshot).map((b) => bindingFacts(pod, b, snapshot, deps.match)),
    exceptions: exceptionFacts(pod, snapshot),
    workloadIdentity: workloadFacts(workloadVerdict(pod, snapshot, deps.match, bound)),
    identities,
    withoutId,
    tokens: tokens.map(({ expiresOn, refreshAtMs, ...rest }) => ({
      ...rest,
      expiresOn: expiresOn === undefined ? undefined : iso(expiresOn * 1000),
      refreshAt: refreshAtMs === undefined ? undefined : iso(refreshAtMs),
    })),
    refusals: deps.refusals.forPod(pod.uid).map(isoRefusal),
    ...(deps.served && { served: deps.served(pod.uid) }),
  };
  result.verdict = facts.caller ? withoutId.answer : `not a caller: ${facts.notCaller}`;
  return result;
}

function isoRefusal({ firstAt, lastAt, ...rest }: Refusal): Explanation['refusals'][number] {
  return { ...rest, firstAt: iso(firstAt), lastAt: iso(lastAt) };
}

function podFacts(pod: Pod, listed: readonly Pod[], now: number): PodFacts {
  const created = pod.createdAt ? Date.parse(pod.createdAt) : NaN;
  const facts: PodFacts = {
    namespace: pod.namespace,
    name: pod.name,
    uid: pod.uid,
    phase: pod.phase,
    addresses: pod.ips,
    hostNetwork: pod.hostNetwork,
    createdAt: pod.createdAt,
    ageSeconds: Number.isNaN(created) ? undefined : Math.max(0, Math.round((now - created) / 1000)),
    labels: pod.labels,
    serviceAccount: serviceAccountOf(pod),
    caller: false,
  };
  // The pod index's rules (kubelet/pod-index.ts): a caller is live, not hostNetwork, and alone on its address.
  if (pod.hostNetwork) facts.notCaller = "hostNetwork: its requests come from the node's address, which is no pod's";
  else if (!isCaller(pod)) facts.notCaller = `phase ${pod.phase || 'unknown'}: only Pending and Running pods are callers`;
  else if (pod.ips.length === 0) facts.notCaller = 'the kubelet lists no address for it yet';
  else {
    const shared = pod.ips.filter((ip) => listed.some((other) => other !== pod && isCaller(other) && other.ips.includes(ip)));
    if (shared.length === pod.ips.length) facts.notCaller = `another live pod claims its address ${shared.join(', ')}: the address answers nobody until that is resolved`;
    else facts.caller = true;
  }
  return facts;
}

function bindingFacts(pod: Pod, binding: AzureIdentityBinding, snapshot: BindingSnapshot, match: MatchOptions): BindingFacts {
  const verdict = bindingVerdict(pod, binding, snapshot, match);
  return {
    binding: objectKey(binding.namespace, binding.name),
    selector: binding.selector,
    identity: objectKey(binding.namespace, binding.azureIdentity),
    matches: verdict.applies,
    reason: bindingReason(pod, binding, verdict),
  };
}

function bindingReason(pod: Pod, binding: AzureIdentityBinding, verdict: BindingVerdict): string {
  if (verdict.applies) return `selector "${binding.selector}" matches`;
  switch (verdict.why) {
    case 'no-label':
      return `the pod has no ${BINDING_LABEL} label`;
    case 'other-selector':
      return `selector "${binding.selector}" is not the pod's ${BINDING_LABEL} "${verdict.podSelector}"`;
    case 'no-identity':
      return verdict.invalid
        ? `names AzureIdentity ${verdict.identity}, which is invalid: ${verdict.invalid}`
        : `names AzureIdentity ${verdict.identity}, which does not exist (an identity is looked up in its binding's namespace)`;
    case 'namespaced': {
      const why = verdict.by === 'force-namespaced' ? '--force-namespaced is set' : `the identity is annotated aadpodidentity.k8s.io/Behavior: namespaced`;
      return `${why}, and binding and identity are in namespace ${binding.namespace}, not the pod's ${pod.namespace}`;
    }
    case 'not-shared':
      return `binding and identity are in namespace ${verdict.namespace}, not the pod's ${pod.namespace}, and --shared-identity-namespaces does not name it: a binding serves only its own namespace's pods`;
  }
}

function exceptionFacts(pod: Pod, snapshot: BindingSnapshot): Explanation['exceptions'] {
  return exceptionsInReach(pod, snapshot).map((e) => {
    const exception = objectKey(e.namespace, e.name);
    const verdict = exceptionVerdict(pod, e);
    if (verdict.applies) return { exception, matches: true, reason: 'the pod has all its podLabels: its requests pass through to the real IMDS' };
    if (verdict.why === 'no-pod-labels') return { exception, matches: false, reason: 'it lists no podLabels, so it matches no pod' };
    return { exception, matches: false, reason: `the pod lacks ${verdict.missing.map(([k, v]) => `${k}=${v}`).join(', ')}` };
  });
}

function identityFacts(identity: AzureIdentity, snapshot: BindingSnapshot, match: MatchOptions): IdentityFacts {
  const facts: IdentityFacts = { identity: identityKey(identity), type: typeNames[identity.type], clientID: identity.clientID, usable: true };
  if (identity.type === IdentityType.UserAssignedMSI) {
    if (identity.resourceID) facts.resourceID = identity.resourceID;
    return facts;
  }
  facts.tenantID = identity.tenantID;
  if (identity.type === IdentityType.Federated) {
    facts.serviceAccount = identity.serviceAccount;
    return facts;
  }
  try {
    secretFor(identity, snapshot, match);
  } catch (err) {
    facts.usable = false;
    facts.problem = messageOf(err);
  }
  return facts;
}

/** Whether Workload ID's convention serves the pod, and why (not). */
function workloadFacts(verdict: WorkloadVerdict): Explanation['workloadIdentity'] {
  if (verdict.used) return { used: true, reason: `service account ${verdict.identity.serviceAccount} names app ${verdict.identity.clientID} in tenant ${verdict.identity.tenantID}` };
  switch (verdict.why) {
    case 'not-labelled':
      return { used: false, reason: `the pod is not labelled ${WORKLOAD_USE_LABEL}: "true"` };
    case 'not-annotated':
      return { used: false, reason: `service account ${verdict.serviceAccount} is not annotated ${WORKLOAD_CLIENT_ID} (or nmi cannot read it)` };
    case 'no-tenant':
      return { used: false, reason: `service account ${verdict.serviceAccount} names no tenant (azure.workload.identity/tenant-id) and --workload-identity-tenant is not set` };
    // An exception pod gets the bound pod's sentence, as it always has (the output is unchanged); its exception is said under exceptions.
    case 'exception':
    case 'bound':
      return { used: false, reason: `a binding selects the pod: bindings win over the ${WORKLOAD_USE_LABEL} label` };
  }
}

/** Step 7 for a request naming no id, as server/select-identity.ts decides it. */
function servedWithoutId(exception: boolean, identities: IdentityFacts[], deps: ExplainDeps): Explanation['withoutId'] {
  if (exception) return { answer: 'passed through to the real IMDS unchanged (an AzurePodIdentityException matches)' };
  const [first] = identities;
  if (!first) return { answer: deps.retryAfter ? '503 Identity not found, Retry-After 20 (--retry-after): no binding selects this pod' : '400 Identity not found: no binding selects this pod' };
  if (identities.length > 1 && deps.multipleIdentities === 'refuse') {
    return { answer: `400 Multiple user assigned identities exist (--multiple-identities refuse): ${identities.length} are bound; a request must name client_id or msi_res_id` };
  }
  const firstOf = identities.length > 1 ? ` (the first of ${identities.length}: ${SERVED_ORDER}; --multiple-identities first)` : '';
  const unusable = first.usable ? '' : `, which cannot be used: ${first.problem}`;
  return { identity: first.identity, answer: `a token for ${first.identity}${firstOf}${unusable}` };
}
