// A pod as nmi needs it: enough to attest a caller and match its bindings.
export interface Pod {
  uid: string;
  namespace: string;
  name: string;
  labels: Record<string, string>;
  /** Every entry of status.podIPs (falls back to status.podIP). */
  ips: string[];
  hostNetwork: boolean;
  /** status.phase: only Pending and Running pods are callers. */
  phase: string;
  nodeName: string;
  /** spec.serviceAccountName, when the kubelet gave one (Kubernetes' default is `default`): federated identities are served per service account. */
  serviceAccount?: string;
  /** metadata.creationTimestamp, when the kubelet gave one: `nmi explain` shows the pod's age. */
  createdAt?: string;
  /**
   * metadata.deletionTimestamp, once the pod is being deleted: it may still run (its grace period), but its
   * address may be another pod's soon, so it is served only after a fresh kubelet list (kubelet/pod-index.ts).
   */
  deletingSince?: string;
}

/** The service account a pod runs as: Kubernetes' default when the kubelet names none. */
export function serviceAccountName(pod: Pick<Pod, 'serviceAccount'>): string {
  return pod.serviceAccount || 'default';
}

/** The caller lookup the token server asks; the kubelet pod index implements it. */
export interface CallerLookup {
  /** The live pod that owns this address, after at most one coalesced kubelet refresh; undefined when none or ambiguous. */
  lookup(ip: string): Promise<Pod | undefined>;
  /** The pod for an address already indexed, without waiting; undefined otherwise. */
  known?(ip: string): Pod | undefined;
}
