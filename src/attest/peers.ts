// Which cgroup made a connection to nmi: the eBPF sockops program records it in
// the peers map (rules/ebpf.ts loads it; --rules ebpf). Read once per
// connection, when it is accepted, by the js server's worker thread: so this
// loads nothing beyond the addon.
import { plainAddress } from '../kubelet/pod-index.js';
import { addon } from '../native/addon.js';

/** The peers map: connection → cgroup of the socket that made it. */
export interface PeerRecords {
  /** null when no connection with this 4-tuple was recorded. */
  peerCgroup(srcIp: string, srcPort: number, dstIp: string, dstPort: number): bigint | null;
}

/** The ends of an accepted connection, as node:net reports them. */
export interface ConnectionEnds {
  remoteAddress?: string;
  remotePort?: number;
  localAddress?: string;
  localPort?: number;
}

export function ipv4Bytes(ip: string): Buffer {
  return Buffer.from(ip.split('.').map(Number));
}

/** struct peer_key in nmi.bpf.c: the connection as the pod's socket sees it. */
export function peerKey(srcIp: string, srcPort: number, dstIp: string, dstPort: number): Buffer {
  const b = Buffer.alloc(12);
  ipv4Bytes(srcIp).copy(b, 0);
  ipv4Bytes(dstIp).copy(b, 4);
  b.writeUInt16BE(srcPort, 8);
  b.writeUInt16BE(dstPort, 10);
  return b;
}

/** The pinned peers map, by the descriptor the eBPF backend opened (descriptors are the process's: a worker may read it). */
export class PeerMap implements PeerRecords {
  constructor(private readonly fd: number) {}

  peerCgroup(srcIp: string, srcPort: number, dstIp: string, dstPort: number): bigint | null {
    try {
      return addon().bpfMapLookup(this.fd, peerKey(srcIp, srcPort, dstIp, dstPort), 8)?.readBigUInt64LE(0) ?? null;
    } catch {
      return null; // unreadable counts as unrecorded: the caller is refused, never waved through
    }
  }
}

/** A connection as the connecting socket sees it: its own end (src) and ours (dst), addresses unmapped. */
export interface PeerEnds {
  src: string;
  srcPort: number;
  dst: string;
  dstPort: number;
}

/** The ends of an accepted connection, or null once the socket no longer reports them (closed). */
export function peerEnds(ends: ConnectionEnds): PeerEnds | null {
  const { remoteAddress, remotePort, localAddress, localPort } = ends;
  if (!remoteAddress || !localAddress || remotePort === undefined || localPort === undefined) return null;
  return { src: plainAddress(remoteAddress), srcPort: remotePort, dst: plainAddress(localAddress), dstPort: localPort };
}

/** The cgroup that made this connection, or null. */
export function connectionCgroup(peers: PeerRecords, ends: ConnectionEnds): bigint | null {
  const peer = peerEnds(ends);
  if (!peer || peer.src.includes(':') || peer.dst.includes(':')) return null; // the eBPF programs cover IPv4 only
  return peers.peerCgroup(peer.src, peer.srcPort, peer.dst, peer.dstPort);
}

/** How the servers' route tables name an attested caller: its address and the cgroup that connected. */
export function attestedKey(address: string, cgroup: bigint): string {
  return `${address}#${cgroup}`;
}
