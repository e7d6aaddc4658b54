// aad-pod-identity's custom resources (aadpodidentity.k8s.io/v1), as nmi uses them.
export const enum IdentityType {
  UserAssignedMSI = 0,
  ServicePrincipal = 1,
  ServicePrincipalCertificate = 2,
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
  /** Types 1 and 2. */
  tenantID: string;
  /** Types 1 and 2: the v1 Secret holding clientSecret (type 1) or certificate + password (type 2). */
  clientPassword?: SecretRef;
  /** Types 1 and 2: spec.adEndpoint, the Entra ID authority host (no trailing slash); unset: --aad-authority-host. */
  adEndpoint?: string;
  /** Set when the identity carries annotation aadpodidentity.k8s.io/Behavior: namespaced. */
  namespaced: boolean;
  /** metadata.resourceVersion or a content hash: changes whenever the identity changes. */
  version: string;
}

/** `namespace/name`: how the token cache, its invalidations and the servers' tables name an identity. */
export function identityKey(identity: Pick<AzureIdentity, 'namespace' | 'name'>): string {
  return `${identity.namespace}/${identity.name}`;
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
