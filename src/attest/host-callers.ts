// Who may ask /host/token/ on TCP (--host-token-address, --host-token-allow).
// aad-pod-identity's NMI let any process of the node name any pod and take its
// token; here the connecting socket is attested from the kernel before a byte
// of the request counts:
//   the peer's socket, by its 4-tuple (sock_diag, native/sockdiag.cc)
//   → the cgroup v2 id of the process that created it
//   → the cgroup's folder, found by walking the cgroup v2 hierarchy
//   → a pod UID, only from the pod folder the kubelet makes at its place
//     under --cgroup-root (cgroup-pods.ts, the eBPF backend's mapping)
//   → the pod, through the kubelet → allowed when a selector matches.
// A socket made outside every pod's cgroup is a host process's, wherever it is
// and whatever its folders are named (a user's delegated `.../pod<uid>` is no
// pod): allowed only with `host-root` and when its owner is uid 0. A socket this network namespace
// does not hold (another host, a pod's own namespace), a cgroup no walk finds
// or a pod the kubelet does not list: refused.
//
// The issue asked for /proc/net/tcp → the process holding the inode → its
// cgroup. The socket's own cgroup id is the same fact without scanning every
// process's descriptors, which would need CAP_SYS_PTRACE and the host's PID
// namespace in the DaemonSet; sock_diag needs neither.
import { once } from 'node:events';
import net from 'node:net';
import type { PodIndex } from '../kubelet/pod-index.js';
import type { Pod } from '../kubelet/pod.js';
import type { Logger } from '../log/logger.js';
import { addon, type SocketOwner } from '../native/addon.js';
import { LogLimiter } from '../util/log-limiter.js';
import type { CgroupPods } from './cgroup-pods.js';
import { peerEnds, type ConnectionEnds, type PeerEnds } from './peers.js';
import { HOST_ROOT, type HostCallerRule } from '../config/values.js';
import { messageOf } from '../errors/errors.js';

export const hostRefusals = ['unattested', 'unknown-pod', 'not-allowed'] as const;
/**
 * unattested: the kernel could not name the socket's cgroup (not a socket of this network namespace,
 * or a cgroup found nowhere); unknown-pod: a pod's cgroup, but the kubelet lists no such pod;
 * not-allowed: attested, and no --host-token-allow entry matches.
 */
export type HostRefusal = (typeof hostRefusals)[number];

export type HostVerdict = { allowed: true; caller: string } | { allowed: false; reason: HostRefusal; caller: string };

export function describeRule(rule: HostCallerRule): string {
  return rule.kind === 'host-root' ? HOST_ROOT : `${rule.namespace}/${rule.label}=${rule.value}`;
}

export class HostCallers {
  readonly refused: Record<HostRefusal, number> = { unattested: 0, 'unknown-pod': 0, 'not-allowed': 0 };
  /** Per (reason, caller): a client retrying in a loop must not flood the log. */
  private readonly said = new LogLimiter(60_000);

  constructor(
    /** Rooted at the cgroup v2 mount (a host process's cgroup must be found too, to be known as no pod's), pods known under --cgroup-root. */
    private readonly cgroups: Pick<CgroupPods, 'uidOf'>,
    private readonly pods: Pick<PodIndex, 'lookupUid'>,
    private readonly rules: readonly HostCallerRule[],
    private readonly log: Logger,
    private readonly owner: (ends: PeerEnds) => SocketOwner | null = peerSocketOwner,
  ) {}

  /** The verdict on an accepted connection; never rejects (a failed lookup refuses). */
  async admit(ends: ConnectionEnds): Promise<HostVerdict> {
    const verdict = await this.judge(ends).catch((err: unknown): HostVerdict => {
      this.log.warn({ err: messageOf(err) }, 'host token caller lookup failed; refused');
      return { allowed: false, reason: 'unattested', caller: 'unknown' };
    });
    if (!verdict.allowed) this.refuse(verdict);
    return verdict;
  }

  private async judge(ends: ConnectionEnds): Promise<HostVerdict> {
    const connection = peerEnds(ends);
    if (!connection) return { allowed: false, reason: 'unattested', caller: 'unknown' };
    const peer = `${connection.src}:${connection.srcPort}`;
    const socket = this.owner(connection);
    if (!socket?.cgroupId) return { allowed: false, reason: 'unattested', caller: peer };
    const uid = await this.cgroups.uidOf(socket.cgroupId);
    if (uid === undefined) return { allowed: false, reason: 'unattested', caller: `${peer} cgroup ${socket.cgroupId}` };
    if (uid === null) {
      const caller = `host uid ${socket.uid}`;
      return socket.uid === 0 && this.rules.some((r) => r.kind === 'host-root') ? { allowed: true, caller } : { allowed: false, reason: 'not-allowed', caller };
    }
    const pod = await this.pods.lookupUid(uid);
    if (!pod) return { allowed: false, reason: 'unknown-pod', caller: `pod uid ${uid}` };
    const caller = `pod ${pod.namespace}/${pod.name}`;
    return this.rules.some((r) => matches(r, pod)) ? { allowed: true, caller } : { allowed: false, reason: 'not-allowed', caller };
  }

  private refuse(verdict: Extract<HostVerdict, { allowed: false }>): void {
    this.refused[verdict.reason] += 1;
    if (!this.said.due(`${verdict.reason} ${verdict.caller}`)) return;
    this.log.warn({ reason: verdict.reason, caller: verdict.caller, allowed: this.rules.map(describeRule) }, 'host token caller refused');
  }
}

function matches(rule: HostCallerRule, pod: Pod): boolean {
  return rule.kind === 'pods' && rule.namespace === pod.namespace && pod.labels[rule.label] === rule.value;
}

/** The connecting process's socket: its own end is our peer, its peer is our end. */
export function peerSocketOwner({ src, srcPort, dst, dstPort }: PeerEnds): SocketOwner | null {
  return addon().socketOwner(src, srcPort, dst, dstPort);
}

/** Why this kernel cannot name a socket's cgroup (asked of a loopback connection of our own), or undefined when it can. */
export async function socketCgroupsUnsupported(): Promise<string | undefined> {
  const server = net.createServer((socket) => socket.destroy());
  try {
    await once(server.listen(0, '127.0.0.1'), 'listening');
    const { port } = server.address() as net.AddressInfo;
    const client = net.connect(port, '127.0.0.1');
    try {
      await once(client, 'connect');
      const owner = addon().socketOwner('127.0.0.1', client.localPort ?? 0, '127.0.0.1', port);
      if (!owner) return 'sock_diag did not find a connection of our own';
      if (!owner.cgroupId) return "the kernel does not report sockets' cgroups (INET_DIAG_CGROUP_ID, Linux 5.7 and later)";
      return undefined;
    } finally {
      client.destroy();
    }
  } catch (err) {
    return messageOf(err);
  } finally {
    server.close();
  }
}
