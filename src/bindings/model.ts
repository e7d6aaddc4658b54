// aad-pod-identity's custom resources (aadpodidentity.k8s.io/v1), as nmi uses them.
export const enum IdentityType {
  UserAssignedMSI = 0,
  ServicePrincipal = 1,
  ServicePrincipalCertificate = 2,
  /** nmi's own: Microsoft Entra Workload ID, the calling pod's service-account token exchanged at Entra ID. */
  Federated = 3,
}

export interface SecretRef {
  name: string;
  namespace: string;
}

export interface AzureIdentity {
  name: string;
  namespace: string;
  type: IdentityType;
  /** Client (application) id; for type 0 the MSI's client id. */
  clientID: string;
  /** Type 0: the MSI's ARM resource id (may be empty when only clientID is given). */
  resourceID: string;
  /** Types 1, 2 and 3. */
  tenantID: string;
  /** Types 1 and 2: the v1 Secret holding clientSecret (type 1) or certificate + password (type 2). */
  clientPassword?: SecretRef;
  /** Types 1, 2 and 3: spec.adEndpoint, the Entra ID authority host (no trailing slash); unset: --aad-authority-host. */
  adEndpoint?: string;
  /**
   * Type 3 as served to a pod: the service account (namespace/name) whose tokens it is exchanged for.
   * Each service account's tokens are its own (identityKey says it), so no pod gets another's.
   */
  serviceAccount?: string;
  /** Set when the identity carries annotation aadpodidentity.k8s.io/Behavior: namespaced. */
  namespaced: boolean;
  /** metadata.resourceVersion or a content hash: changes whenever the identity changes. */
  version: string;
}

/**
 * How the token cache and the servers' tables name an identity: `namespace/name`, and for a federated
 * identity served to a pod `namespace/name@saNamespace/saName` ('@' is in no Kubernetes name).
 */
export function identityKey(identity: Pick<AzureIdentity, 'namespace' | 'name' | 'serviceAccount'>): string {
  const name = `${identity.namespace}/${identity.name}`;
  return identity.serviceAccount ? `${name}@${identity.serviceAccount}` : name;
}

/** The `namespace/name` the bindings know an identityKey by: a changed identity invalidates every service account's tokens. */
export function identityNameOf(key: string): string {
  const at = key.indexOf('@');
  return at < 0 ? key : key.slice(0, at);
}

/** A service account annotated for Microsoft Entra Workload ID (azure.workload.identity/client-id). */
export interface WorkloadServiceAccount {
  name: string;
  namespace: string;
  clientID: string;
  /** azure.workload.identity/tenant-id; '' when unset (then --workload-identity-tenant). */
  tenantID: string;
  version: string;
}

export interface AzureIdentityBinding {
  name: string;
  namespace: string;
  azureIdentity: string;
  selector: string;
  version: string;
}

export interface AzurePodIdentityException {
  name: string;
  namespace: string;
  podLabels: Record<string, string>;
}

export interface Secret {
  name: string;
  namespace: string;
  /** Decoded values of `data` (base64) merged with `stringData`. */
  data: Record<string, string>;
}

/** What the bindings say about one pod. */
export interface PodIdentities {
  /** True when an AzurePodIdentityException in the pod's namespace matches all its labels: pass through to the real IMDS. */
  exception: boolean;
  identities: AzureIdentity[];
}
