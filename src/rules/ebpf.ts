// The eBPF backend (--rules ebpf): native/bpf/nmi.bpf.c attached at
// --cgroup-root through bpf_links pinned in /sys/fs/bpf/nmi, so they outlive
// a crashed daemon (pods then fail closed, as with iptables) and a restarted
// one adopts them. Verify/repair compares the pins with what this process
// loaded and fixes only what differs: a link running another program is
// swapped in place, a missing or detached one is attached anew. The netfilter
// backstop (backstop.ts) goes in after the programs and out before them.
import { mkdirSync, readFileSync, rmdirSync, statSync } from 'node:fs';
import path from 'node:path';
import { codes, NmiError, UsageError, messageOf } from '../errors/errors.js';
import { addon, builtFile, type NativeAddon } from '../native/addon.js';
import { execOk } from './exec.js';
import { mountsOfType, within } from '../util/mounts.js';
import { ipv4Bytes } from '../attest/peers.js';
import { chooseBackstop } from './backstop.js';
import type { BackendStatus, EnsureResult, Redirect, RulesBackend } from './redirect.js';

export const BPF_FS = '/sys/fs/bpf';
export const PIN_DIR = `${BPF_FS}/nmi`;
const OBJECT = 'nmi.bpf.o';

/** Program → the name of its link's pin; order is attach order (the recorder before the redirect). */
const programs = [
  { program: 'nmi_sockops', pin: 'sockops', hook: 'sockops' },
  { program: 'nmi_getpeername4', pin: 'getpeername4', hook: 'cgroup/getpeername4' },
  { program: 'nmi_getpeername6', pin: 'getpeername6', hook: 'cgroup/getpeername6' },
  { program: 'nmi_connect4', pin: 'connect4', hook: 'cgroup/connect4' },
  // A dual-stack IPv6 socket reaches the metadata address as ::ffff:169.254.169.254, past connect4.
  { program: 'nmi_connect6', pin: 'connect6', hook: 'cgroup/connect6' },
] as const;
export const maps = { config: 'nmi_config', peers: 'nmi_peers', socks: 'nmi_socks' } as const;

/** Why this build or host cannot run the eBPF backend, or undefined when it can. */
export function ebpfUnsupported(): string | undefined {
  let native: NativeAddon;
  try {
    native = addon();
  } catch (err) {
    return messageOf(err);
  }
  return native.bpfSupport() ?? undefined;
}

/** struct nmi_config in nmi.bpf.c: addresses and ports in network order, then nmi's own cgroup. */
export function configBytes(redirect: Redirect, selfCgroup: bigint): Buffer {
  const b = Buffer.alloc(24);
  ipv4Bytes(redirect.metadataIp).copy(b, 0);
  ipv4Bytes(redirect.targetIp).copy(b, 4);
  b.writeUInt16BE(redirect.metadataPort, 8);
  b.writeUInt16BE(redirect.targetPort, 10);
  b.writeBigUInt64LE(selfCgroup, 16);
  return b;
}

/** A cgroup v2 folder's id, as bpf_get_current_cgroup_id() reports it: the folder's inode number. */
export function cgroupId(folder: string): bigint {
  return statSync(folder, { bigint: true }).ino;
}

/** This process's own cgroup v2 folder (where its calls to the real IMDS come from). */
export function ownCgroup(): string {
  const line = readFileSync('/proc/self/cgroup', 'utf8').split('\n').find((l) => l.startsWith('0::'));
  const mount = mountsOfType('cgroup2')[0];
  if (!line || !mount) throw new NmiError(codes.RULES_APPLY, 'ebpf: no cgroup v2 hierarchy is mounted');
  return path.join(mount, line.slice(3));
}

function bpffsMounted(): boolean {
  return mountsOfType('bpf').includes(BPF_FS);
}

export class EbpfBackend implements RulesBackend {
  readonly name = 'ebpf' as const;
  private handle: number | undefined;
  /** The loaded object's peers map (connection → cgroup), valid until unload(). */
  private peersFd: number | undefined;

  /** cgroupRoot undefined: only remove() and status() (cleanup needs no config, and removes backstops apart). */
  constructor(
    private readonly cgroupRoot: string | undefined,
    /** Drops pod packets to the metadata address that connect4 did not see (backstop.ts). */
    private readonly backstop?: RulesBackend,
    private readonly pinDir = PIN_DIR,
  ) {}

  /** The backend nmi run uses; a usage error when this build, --cgroup-root or the host's netfilter tools cannot work. */
  static async forRun(cgroupRoot: string): Promise<EbpfBackend> {
    const why = ebpfUnsupported();
    if (why) throw new UsageError(`--rules: ebpf is not available: ${why}`);
    let root;
    try {
      root = statSync(cgroupRoot);
    } catch (err) {
      throw new UsageError(`--cgroup-root: ${cgroupRoot}: ${(err as NodeJS.ErrnoException).code ?? messageOf(err)}`);
    }
    if (!root.isDirectory() || !mountsOfType('cgroup2').some((m) => within(m, cgroupRoot) !== undefined))
      throw new UsageError(`--cgroup-root: ${cgroupRoot} is not a folder of a cgroup v2 hierarchy`);
    const backstop = await chooseBackstop();
    if (!backstop) throw new UsageError('--rules: ebpf needs nftables (libnftables or nft) or iptables for its backstop, which drops pod packets to the metadata address that did not come from connect(); neither is installed');
    return new EbpfBackend(cgroupRoot, backstop);
  }

  /** Present on this host: eBPF built in and something pinned (for cleanup and status). */
  static present(): EbpfBackend | undefined {
    if (ebpfUnsupported() !== undefined || !bpffsMounted()) return undefined;
    try {
      statSync(PIN_DIR);
    } catch {
      return undefined;
    }
    return new EbpfBackend(undefined);
  }

  private pin(name: string): string {
    return path.join(this.pinDir, name);
  }

  /**
   * Loads the programs and maps (maps pinned, or the pinned ones of a previous
   * run reused), attaching nothing yet; the servers need the peers map before
   * the redirect exists. Idempotent.
   */
  async load(): Promise<number> {
    if (this.handle !== undefined) return this.handle;
    if (!bpffsMounted()) await execOk('mount', ['-t', 'bpf', 'bpf', BPF_FS], '', codes.RULES_APPLY);
    mkdirSync(this.pinDir, { recursive: true, mode: 0o700 });
    const handle = this.call(() => addon().bpfLoad(builtFile(OBJECT), this.pinDir));
    this.handle = handle;
    this.peersFd = addon().bpfMapFd(handle, maps.peers);
    return handle;
  }

  /** The loaded peers map (connection → cgroup), for the token servers to read; undefined before load(). */
  get peerMapFd(): number | undefined {
    return this.peersFd;
  }

  async ensure(redirect: Redirect): Promise<EnsureResult> {
    const root = this.cgroupRoot;
    if (root === undefined) throw new NmiError(codes.RULES_APPLY, 'ebpf: no --cgroup-root to attach to');
    const native = addon();
    const handle = await this.load();
    const changes: string[] = [];
    // A removed map pin is put back on the very map the programs use.
    mkdirSync(this.pinDir, { recursive: true, mode: 0o700 });
    if (this.call(() => native.bpfRepinMaps(handle)) > 0) changes.push('maps');

    const wanted = configBytes(redirect, cgroupId(ownCgroup()));
    const config = native.bpfMapFd(handle, maps.config);
    const key = Buffer.alloc(4);
    if (!native.bpfMapLookup(config, key, wanted.length)?.equals(wanted)) {
      native.bpfMapUpdate(config, key, wanted);
      changes.push('config');
    }

    const rootId = cgroupId(root);
    let found = 0;
    for (const { program, pin } of programs) {
      const link = native.bpfLinkInfo(this.pin(pin));
      const programId = native.bpfProgramId(handle, program);
      if (link && link.cgroupId === rootId) {
        found += 1;
        if (link.programId === programId) continue;
        this.call(() => native.bpfReplace(handle, program, this.pin(pin)));
      } else {
        // Missing, detached, or attached elsewhere (another --cgroup-root): a new link replaces the pin.
        if (link) found += 1;
        this.call(() => native.bpfAttach(handle, program, root, this.pin(pin)));
      }
      changes.push(pin);
    }
    const backstop = (await this.backstop?.ensure(redirect)) ?? 'unchanged';
    if (backstop !== 'unchanged') changes.push('backstop');
    if (changes.length === 0) return 'unchanged';
    return found === 0 && backstop !== 'repaired' ? 'installed' : 'repaired';
  }

  async remove(): Promise<string[]> {
    // The backstop first: a pod's connect() is never left dropped between the two.
    const removed = (await this.backstop?.remove()) ?? [];
    const native = addon();
    for (const { pin, hook } of programs) {
      if (native.bpfUnpin(this.pin(pin), true)) removed.push(`ebpf ${hook} link ${this.pin(pin)}`);
    }
    for (const map of Object.values(maps)) {
      if (native.bpfUnpin(this.pin(map), false)) removed.push(`ebpf map ${this.pin(map)}`);
    }
    try {
      rmdirSync(this.pinDir);
    } catch {
      // not there, or holding something not ours: left as it is
    }
    this.unload();
    return removed;
  }

  private unload(): void {
    if (this.handle !== undefined) addon().bpfUnload(this.handle);
    this.handle = undefined;
    this.peersFd = undefined;
  }

  async status(): Promise<BackendStatus> {
    const native = addon();
    const rules = [];
    let attached = 0;
    for (const { pin, hook } of programs) {
      const link = native.bpfLinkInfo(this.pin(pin));
      if (!link) continue;
      if (link.cgroupId !== 0n) attached += 1;
      const where = link.cgroupId === 0n ? 'detached' : `cgroup id ${link.cgroupId}${this.cgroupRoot ? ` (${this.cgroupRoot})` : ''}`;
      rules.push({ text: `${hook} link ${link.id} program ${link.programId} on ${where}`, packets: 0, bytes: 0 });
    }
    return { backend: this.name, installed: attached === programs.length, rules };
  }

  private call<T>(fn: () => T): T {
    try {
      return fn();
    } catch (err) {
      throw new NmiError(codes.RULES_APPLY, `ebpf: ${messageOf(err)}`, { cause: err });
    }
  }
}
