// Callers attested by cgroup (--rules ebpf). The eBPF sockops program records,
// for every connection a pod's socket makes to nmi, the cgroup that made it;
// the kubelet names each pod's cgroup after its UID. A caller is the pod of
// that cgroup, and it must also be the pod the kubelet says owns the source
// address: a pod that took another pod's address (ARP spoofing on kubenet,
// CVE-2021-1677) or a connection nothing recorded is refused.
import type { Pod } from '../kubelet/pod.js';
import type { PodIndex } from '../kubelet/pod-index.js';
import type { Logger } from '../log/logger.js';
import { LogLimiter } from '../util/log-limiter.js';
import type { CgroupPods } from './cgroup-pods.js';

export const refusals = ['unattested', 'spoof'] as const;
/** unattested: no pod's cgroup made the connection; spoof: one did, but the source address is another's. */
export type Refusal = (typeof refusals)[number];


export class CgroupAttestation {
  readonly refused: Record<Refusal, number> = { unattested: 0, spoof: 0 };
  /** Per (reason, address): a spoofing loop must not flood the log. */
  private readonly said = new LogLimiter(10_000);

  constructor(
    private readonly cgroups: CgroupPods,
    private readonly pods: Pick<PodIndex, 'known' | 'lookup' | 'knownUid' | 'lookupUid'>,
    private readonly log: Logger,
    /** Told the pod whose socket wore another's address (the pod's Events and `nmi explain` say it). */
    private readonly onSpoof?: (socketPod: Pod, address: string, addressOwner: Pod | undefined) => void,
  ) {}

  /** The hit path: the caller when everything is already known and agrees, else undefined (then resolve() decides). */
  resolveNow(address: string, cgroup: bigint | null): Pod | undefined {
    const uid = cgroup === null ? undefined : this.cgroups.known(cgroup);
    const pod = uid ? this.pods.knownUid(uid) : undefined;
    return pod && this.check(pod, this.pods.known(address)) === pod ? pod : undefined;
  }

  /** The attested caller; a refusal; or undefined when no live pod of this node has that cgroup's UID. */
  async resolve(address: string, cgroup: bigint | null): Promise<Pod | Refusal | undefined> {
    const uid = cgroup === null ? null : await this.cgroups.uidOf(cgroup);
    if (!uid) return this.refuse('unattested', address, { cgroup: cgroup?.toString() ?? null });
    const pod = await this.pods.lookupUid(uid);
    if (!pod) return undefined;
    // A hostNetwork pod has no address of its own to compare; it may only not wear another pod's.
    const owner = pod.hostNetwork ? this.pods.known(address) : await this.pods.lookup(address);
    const verdict = this.check(pod, owner);
    if (verdict === 'spoof') {
      this.onSpoof?.(pod, address, owner);
      return this.refuse('spoof', address, { socketPod: `${pod.namespace}/${pod.name}`, addressPod: owner ? `${owner.namespace}/${owner.name}` : null });
    }
    return verdict;
  }

  private check(pod: Pod, owner: Pod | undefined): Pod | 'spoof' {
    if (pod.hostNetwork) return owner ? 'spoof' : pod;
    return owner?.uid === pod.uid ? pod : 'spoof';
  }

  private refuse(reason: Refusal, address: string, detail: Record<string, unknown>): Refusal {
    this.refused[reason] += 1;
    if (this.said.due(`${reason} ${address}`)) {
      const message = reason === 'spoof' ? 'spoof attempt: the calling socket belongs to another pod than the source address; refused' : 'caller not attested: no pod cgroup made this connection; refused';
      this.log.warn({ reason, address, ...detail }, message);
    }
    return reason;
  }
}
