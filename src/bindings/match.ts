// Which identities a pod may use, why each binding, exception and Workload ID's
// convention applies to it or not (as data: `nmi explain` says it in words), and
// the credential behind a service principal.
// Pure functions over a snapshot, as aad-pod-identity's MIC matches them: the pod's
// `aadpodidbinding` label selects bindings, and each binding names an identity in the
// binding's own namespace. Namespaces are walls: a binding serves only pods of its own
// namespace unless the operator shares its namespace (--shared-identity-namespaces), so
// a tenant cannot give its identity to another namespace's pods (their writes would go
// to its resources; a federated identity would have nmi send their service-account
// tokens where its adEndpoint says). Under NMI every binding reached every namespace. A federated
// identity (type 3) is served per service account: the pod's own. A pod no binding
// selects may instead follow Workload ID's convention (its label, its service
// account's annotations); a binding wins, because it is what the operator wrote for
// nmi about this pod, and moving a binding to Workload ID is done by changing its
// identity's type, which keeps the binding in charge.
import { serviceAccountName, type Pod } from '../kubelet/pod.js';
import { codes, NmiError } from '../errors/errors.js';
import { IdentityType, type AzureIdentity, type AzureIdentityBinding, type AzurePodIdentityException, type PodIdentities } from './model.js';
import { objectKey } from '../kube/object-key.js';
import { workloadIdentityName } from './parse.js';
import type { BindingSnapshot } from './store.js';

export const BINDING_LABEL = 'aadpodidbinding';
/** Workload ID's pod label: the pod uses its service account's identity. */
export const WORKLOAD_USE_LABEL = 'azure.workload.identity/use';

export interface MatchOptions {
  /** --force-namespaced: every identity behaves as if annotated namespaced, shared namespaces' too. */
  forceNamespaced: boolean;
  /** --shared-identity-namespaces: whose bindings may serve pods of other namespaces; none when unset. */
  sharedNamespaces?: '*' | ReadonlySet<string>;
  /** --cross-namespace-secrets: a clientPassword may name another namespace's Secret. */
  crossNamespaceSecrets?: boolean;
  /** --workload-identity-tenant: the tenant of a Workload ID service account not annotated with one. */
  workloadTenant?: string;
}

/** The service account a pod runs as, `namespace/name`; Kubernetes' default when the kubelet names none. */
export function serviceAccountOf(pod: Pod): string {
  return objectKey(pod.namespace, serviceAccountName(pod));
}

const noIdentities: PodIdentities = Object.freeze({ exception: false, identities: [] as AzureIdentity[] });

/** Whether an exception (of the pod's namespace) applies to the pod, and if not why. */
export type ExceptionVerdict = { applies: true } | { applies: false; why: 'no-pod-labels' } | { applies: false; why: 'labels-missing'; missing: Array<[string, string]> };

/** An exception applies to a pod of its namespace that has every one of its podLabels; one listing none applies to no pod. */
export function exceptionVerdict(pod: Pod, exception: AzurePodIdentityException): ExceptionVerdict {
  const labels = Object.entries(exception.podLabels);
  if (labels.length === 0) return { applies: false, why: 'no-pod-labels' };
  const missing = labels.filter(([k, v]) => pod.labels[k] !== v);
  return missing.length === 0 ? { applies: true } : { applies: false, why: 'labels-missing', missing };
}

/** The exceptions of the pod's namespace, in the snapshot's order: the only ones that can apply to it. */
export function exceptionsInReach(pod: Pod, snapshot: BindingSnapshot): readonly AzurePodIdentityException[] {
  return snapshot.exceptionsByNamespace.get(pod.namespace) ?? [];
}

export function isException(pod: Pod, snapshot: BindingSnapshot): boolean {
  return exceptionsInReach(pod, snapshot).some((e) => exceptionVerdict(pod, e).applies);
}

interface Memo {
  byPod: WeakMap<Pod, PodIdentities>;
  /** By namespace and selector, all a non-exception pod's identities depend on: pods bound alike share one answer. */
  bySelector: Map<string, PodIdentities>;
}

/**
 * Memoised per (snapshot, options object, pod object): a new bindings snapshot or a kubelet
 * refresh (which makes new Pod objects) starts afresh, so an answer can never
 * outlive the bindings or the pod it was computed from. `nmi run` passes one options object.
 */
const memo = new WeakMap<BindingSnapshot, WeakMap<MatchOptions, Memo>>();

export function identitiesFor(pod: Pod, snapshot: BindingSnapshot, options: MatchOptions): PodIdentities {
  let perSnapshot = memo.get(snapshot);
  if (!perSnapshot) memo.set(snapshot, (perSnapshot = new WeakMap()));
  let forOptions = perSnapshot.get(options);
  if (!forOptions) perSnapshot.set(options, (forOptions = { byPod: new WeakMap(), bySelector: new Map() }));
  let result = forOptions.byPod.get(pod);
  if (!result) forOptions.byPod.set(pod, (result = computeIdentities(pod, snapshot, options, forOptions.bySelector)));
  return result;
}

function computeIdentities(pod: Pod, snapshot: BindingSnapshot, options: MatchOptions, bySelector: Map<string, PodIdentities>): PodIdentities {
  if (isException(pod, snapshot)) return { exception: true, identities: [] };
  const selector = pod.labels[BINDING_LABEL];
  const account = serviceAccountOf(pod);
  const memo = (key: string, compute: () => PodIdentities): PodIdentities => {
    let result = bySelector.get(key);
    if (!result) bySelector.set(key, (result = compute()));
    return result;
  };
  // The service account is in the key: a federated identity is served per service account.
  const bound = selector ? memo(`${pod.namespace}/${selector}\0${account}`, () => servedAs(selectorIdentities(pod, selector, snapshot, options), account)) : noIdentities;
  // A binding wins over Workload ID's convention.
  if (bound.identities.length > 0 || pod.labels[WORKLOAD_USE_LABEL] !== 'true') return bound;
  return memo(`\0workload\0${account}\0${options.workloadTenant ?? ''}`, () => {
    const found = workloadIdentity(pod, snapshot, options);
    return 'identity' in found ? { exception: false, identities: [found.identity] } : noIdentities;
  });
}

/** Federated identities as served to pods of one service account (memoised with it by computeIdentities). */
function servedAs(bound: PodIdentities, account: string): PodIdentities {
  if (!bound.identities.some((i) => i.type === IdentityType.Federated)) return bound;
  return { exception: false, identities: bound.identities.map((i) => (i.type === IdentityType.Federated ? { ...i, serviceAccount: account } : i)) };
}

/** A pod that asks for Workload ID's convention (its label), whatever its service account says. */
export function usesWorkloadIdentity(pod: Pod): boolean {
  return pod.labels[WORKLOAD_USE_LABEL] === 'true';
}

/** Why Workload ID's convention gives a pod no identity, its service account (namespace/name) named. */
export type WorkloadMiss = { why: 'not-labelled' } | { why: 'not-annotated'; serviceAccount: string } | { why: 'no-tenant'; serviceAccount: string };

/**
 * Workload ID's convention: a pod labelled azure.workload.identity/use: "true" whose service account is
 * annotated with a client id (and a tenant id, else --workload-identity-tenant) is served that app, federated.
 * Otherwise why not.
 */
export function workloadIdentity(pod: Pod, snapshot: BindingSnapshot, options: MatchOptions): { identity: AzureIdentity } | WorkloadMiss {
  const account = serviceAccountOf(pod);
  if (!usesWorkloadIdentity(pod)) return { why: 'not-labelled' };
  // Only service accounts annotated with a client id are in the snapshot.
  const annotated = snapshot.serviceAccounts.get(account);
  if (!annotated) return { why: 'not-annotated', serviceAccount: account };
  const tenantID = annotated.tenantID || options.workloadTenant || '';
  if (!tenantID) return { why: 'no-tenant', serviceAccount: account };
  return {
    identity: {
      name: workloadIdentityName(annotated.name),
      namespace: annotated.namespace,
      type: IdentityType.Federated,
      clientID: annotated.clientID,
      resourceID: '',
      tenantID,
      namespaced: true,
      serviceAccount: account,
      version: `${annotated.version}/${tenantID}`,
    },
  };
}

/** Whether Workload ID's convention serves a pod, and if not why. */
export type WorkloadVerdict = { used: true; identity: AzureIdentity } | { used: false; why: 'exception' | 'bound' } | ({ used: false } & WorkloadMiss);

/**
 * Read from what identitiesFor answered for the pod (`served`), so the rule that a binding wins stays
 * computeIdentities' alone: the convention's own reasons first, then that the pod is an exception or bound.
 */
export function workloadVerdict(pod: Pod, snapshot: BindingSnapshot, options: MatchOptions, served: PodIdentities): WorkloadVerdict {
  const found = workloadIdentity(pod, snapshot, options);
  if (!('identity' in found)) return { used: false, ...found };
  if (!served.identities.some((i) => i.name === found.identity.name && i.namespace === found.identity.namespace)) return { used: false, why: served.exception ? 'exception' : 'bound' };
  return { used: true, identity: found.identity };
}

/** Whether a binding gives its identity to the pod, and if not why; the identity named `namespace/name`. */
export type BindingVerdict =
  | { applies: true; identity: AzureIdentity }
  | { applies: false; why: 'no-label' }
  | { applies: false; why: 'other-selector'; podSelector: string }
  /** `invalid`: the source left an identity of that name out, and why. */
  | { applies: false; why: 'no-identity'; identity: string; invalid?: string }
  /** Namespaced, by --force-namespaced or by the identity's annotation, and the binding in another namespace than the pod. */
  | { applies: false; why: 'namespaced'; by: 'force-namespaced' | 'annotation' }
  /** The binding in another namespace than the pod, and that namespace not shared (--shared-identity-namespaces). */
  | { applies: false; why: 'not-shared'; namespace: string };

/**
 * A binding selects a pod whose aadpodidbinding label equals its selector; it names an identity in the
 * binding's own namespace; it serves pods of another namespace only from a shared namespace, and a
 * namespaced identity serves only pods of its own namespace.
 */
export function bindingVerdict(pod: Pod, binding: AzureIdentityBinding, snapshot: BindingSnapshot, { forceNamespaced, sharedNamespaces }: MatchOptions): BindingVerdict {
  const selector = pod.labels[BINDING_LABEL];
  if (selector === undefined) return { applies: false, why: 'no-label' };
  if (binding.selector !== selector) return { applies: false, why: 'other-selector', podSelector: selector };
  const key = objectKey(binding.namespace, binding.azureIdentity);
  const identity = snapshot.identities.get(key);
  if (!identity) {
    const invalid = snapshot.invalid.get(`AzureIdentity ${key}`);
    return invalid === undefined ? { applies: false, why: 'no-identity', identity: key } : { applies: false, why: 'no-identity', identity: key, invalid };
  }
  // Namespaced: identity, binding and pod all in one namespace (the identity's
  // and the binding's already match by construction of the key).
  if ((forceNamespaced || identity.namespaced) && binding.namespace !== pod.namespace) {
    return { applies: false, why: 'namespaced', by: forceNamespaced ? 'force-namespaced' : 'annotation' };
  }
  if (binding.namespace !== pod.namespace && !isShared(binding.namespace, sharedNamespaces)) return { applies: false, why: 'not-shared', namespace: binding.namespace };
  return { applies: true, identity };
}

function isShared(namespace: string, shared: MatchOptions['sharedNamespaces']): boolean {
  return shared === '*' || (shared?.has(namespace) ?? false);
}

/** The bindings that could apply to the pod, by namespace/name: those of its namespace, and those anywhere with its selector. */
export function bindingsInReach(pod: Pod, snapshot: BindingSnapshot): AzureIdentityBinding[] {
  const selector = pod.labels[BINDING_LABEL];
  return [...snapshot.bindings.values()]
    .filter((b) => b.namespace === pod.namespace || (selector !== undefined && b.selector === selector))
    .sort((a, b) => (objectKey(a.namespace, a.name) < objectKey(b.namespace, b.name) ? -1 : 1));
}

function selectorIdentities(pod: Pod, selector: string, snapshot: BindingSnapshot, options: MatchOptions): PodIdentities {
  const bindings = snapshot.bindingsBySelector.get(selector);
  if (!bindings) return noIdentities;
  const found = new Map<string, AzureIdentity>();
  for (const binding of bindings) {
    const verdict = bindingVerdict(pod, binding, snapshot, options);
    if (verdict.applies) found.set(objectKey(verdict.identity.namespace, verdict.identity.name), verdict.identity);
  }
  if (found.size === 0) return noIdentities;
  return { exception: false, identities: [...found.values()].sort((a, b) => servedFirst(pod.namespace, a, b)) };
}

/**
 * The documented order of a pod's identities, which --multiple-identities first serves from: the pod's own
 * namespace first (as NMI looked there first), then by identity name, then by namespace; the same for every
 * pod bound alike and on every node, whatever order the API server listed them in. SERVED_ORDER says it.
 */
function servedFirst(namespace: string, a: AzureIdentity, b: AzureIdentity): number {
  const own = Number(b.namespace === namespace) - Number(a.namespace === namespace);
  return own || compare(a.name, b.name) || compare(a.namespace, b.namespace);
}

const compare = (a: string, b: string): number => (a < b ? -1 : a > b ? 1 : 0);

/** servedFirst's order as `nmi explain` states it, kept beside it so the two change together. */
export const SERVED_ORDER = 'own namespace first, then by name';

/** What a service principal signs in with. */
export type ServicePrincipalCredential =
  | { type: IdentityType.ServicePrincipal; clientSecret: string }
  | { type: IdentityType.ServicePrincipalCertificate; certificate: string; password: string };

/**
 * The credential for a type 1 or 2 identity, from the Secret its clientPassword names: one of the identity's
 * own namespace (a tenant must not sign in with another namespace's service principal), unless
 * --cross-namespace-secrets. Throws NmiError(BINDINGS) naming what is missing (never a value).
 */
export function secretFor(identity: AzureIdentity, snapshot: BindingSnapshot, options: Pick<MatchOptions, 'crossNamespaceSecrets'>): ServicePrincipalCredential {
  const label = `AzureIdentity ${objectKey(identity.namespace, identity.name)}`;
  const ref = identity.clientPassword;
  if (identity.type === IdentityType.UserAssignedMSI || !ref) {
    throw new NmiError(codes.BINDINGS, `${label}: a user-assigned identity has no secret`);
  }
  const secretKey = objectKey(ref.namespace, ref.name);
  if (ref.namespace !== identity.namespace && !options.crossNamespaceSecrets) {
    throw new NmiError(codes.BINDINGS, `${label}: secret ${secretKey} is not in the identity's namespace; nmi reads only the identity's own namespace's Secrets (--cross-namespace-secrets allows others, as NMI did)`);
  }
  const secret = snapshot.secrets.get(secretKey);
  if (!secret) throw new NmiError(codes.BINDINGS, `${label}: secret ${secretKey} not found`);
  const value = (key: string): string => {
    const v = secret.data[key];
    if (v === undefined) throw new NmiError(codes.BINDINGS, `${label}: secret ${secretKey} has no key ${key}`);
    if (v === '') throw new NmiError(codes.BINDINGS, `${label}: secret ${secretKey} has an empty ${key}`);
    return v;
  };
  if (identity.type === IdentityType.ServicePrincipal) {
    // NMI took the Secret's only value whatever its key; with several, only clientSecret says which.
    const keys = Object.keys(secret.data);
    if (keys.length > 1 && !('clientSecret' in secret.data)) {
      throw new NmiError(codes.BINDINGS, `${label}: secret ${secretKey} has ${keys.length} keys and none is clientSecret: keep one key, or name the client secret's key clientSecret`);
    }
    return { type: IdentityType.ServicePrincipal, clientSecret: value(keys.length === 1 ? keys[0]! : 'clientSecret') };
  }
  // The certificate's private key may be unencrypted: no password then.
  return { type: IdentityType.ServicePrincipalCertificate, certificate: value('certificate'), password: secret.data.password ?? '' };
}
