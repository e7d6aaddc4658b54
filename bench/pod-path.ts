// The pod paths: a throwaway node namespace (the bench enters it, so every server
// and stand-in lives there) and one pod namespace joined to it, whose requests
// to 169.254.169.254:80 reach the server under test through nmi's own DNAT rule
// (`pod`) or, with no rule at all, through nmi's eBPF connect redirect, the
// requests then coming from a process in the pod's cgroup (`ebpf`).
import { execFile, spawn } from 'node:child_process';
import { once } from 'node:events';
import { readdirSync } from 'node:fs';
import { constants } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import {
  createNodeNamespace,
  createPodNamespace,
  deleteNamespace,
  enterNamespace,
  listNamespaces,
  NODE_IP,
} from '../src/netns/netns.js';
import { EbpfBackend, ebpfUnsupported } from '../src/rules/ebpf.js';
import { mountsOfType } from '../src/util/mounts.js';
import { chooseTools, IptablesBackend } from '../src/rules/iptables.js';
import type { Redirect, RulesBackend } from '../src/rules/redirect.js';
import { cgroup2Mount, createCgroupTree, removeTree, type CgroupTree } from '../test/harness/cgroups.js';
import { interrupt } from './common.js';

export { NODE_IP };
export const NODE_NS = 'nmi-bench-node';
export const POD_NS = 'nmi-bench-pod';
export const METADATA_IP = '169.254.169.254';
/** nmi's default --port: where the DNAT rule sends pods. */
export const NMI_PORT = 2579;

const rawGetBin = path.join(path.dirname(fileURLToPath(import.meta.url)), 'raw-get.js');
const run = promisify(execFile);

/** Removes namespaces a killed bench left, creates the node and pod namespaces, enters the node; returns the pod's address. */
export function setUpNamespaces(): string {
  removeNamespaces();
  createNodeNamespace(NODE_NS);
  enterNamespace(NODE_NS);
  return createPodNamespace(NODE_NS, POD_NS, 1);
}

export function removeNamespaces(): void {
  for (const ns of listNamespaces()) if (ns.startsWith('nmi-bench-')) deleteNamespace(ns);
}

/**
 * `command` run in the pod's network namespace, and first moved into `cgroup`
 * when given (before `ip netns exec`, which remounts /sys): what a container's
 * process is to the eBPF programs.
 */
export function inPod(command: string[], cgroup?: string): string[] {
  const netns = ['ip', 'netns', 'exec', POD_NS, ...command];
  return cgroup ? ['sh', '-c', 'echo $$ > "$0/cgroup.procs" && exec "$@"', cgroup, ...netns] : netns;
}

export interface RedirectRule {
  install(): Promise<void>;
  remove(): Promise<void>;
}

/**
 * The redirect `nmi run --rules iptables` (flavour chosen the same way) or
 * `--rules ebpf --cgroup-root <root>` installs, installed by the same code, for
 * the trials of servers that install none themselves.
 */
export async function redirectRule(rules: 'iptables' | 'ebpf', cgroupRoot?: string): Promise<RedirectRule> {
  const redirect: Redirect = { metadataIp: METADATA_IP, metadataPort: 80, targetIp: NODE_IP, targetPort: NMI_PORT };
  let backend: () => RulesBackend;
  if (rules === 'ebpf') {
    // A fresh one each time: remove() unloads what it loaded.
    backend = () => new EbpfBackend(cgroupRoot);
  } else {
    const tools = await chooseTools();
    if (!tools) throw new Error('the pod path needs iptables (iptables-save and iptables-restore)');
    const iptables = new IptablesBackend(tools);
    backend = () => iptables;
  }
  let installed: RulesBackend | undefined;
  return {
    install: async () => void (await (installed = backend()).ensure(redirect)),
    remove: async () => void (await installed?.remove()),
  };
}

/** Why the ebpf path cannot run here, or undefined when it can. */
export function ebpfPathUnsupported(): string | undefined {
  if (mountsOfType('cgroup2').length === 0) return 'no cgroup v2 hierarchy is mounted';
  return ebpfUnsupported();
}

/** Set when the bench runs in its own mount namespace (below). */
const PRIVATE_MOUNTS = 'NMI_BENCH_PRIVATE_MOUNTS';

/**
 * The ebpf path pins programs in /sys/fs/bpf/nmi, where a real nmi on this host,
 * or a test's `nmi cleanup`, would meet them: the bench runs it in a mount
 * namespace of its own with a fresh bpffs. Returns the exit code of the bench
 * re-run there, or undefined when this process already is that re-run.
 */
export async function runInPrivateMounts(): Promise<number | undefined> {
  if (process.env[PRIVATE_MOUNTS] === '1') {
    await run('mount', ['-t', 'bpf', 'bpf', '/sys/fs/bpf']);
    return undefined;
  }
  const child = spawn('unshare', ['-m', '--propagation', 'private', process.execPath, ...process.execArgv, ...process.argv.slice(1)], {
    stdio: 'inherit',
    env: { ...process.env, [PRIVATE_MOUNTS]: '1' },
  });
  // Ctrl-C reaches the child through the terminal (this process waits for it to clean up); a SIGTERM is passed on.
  const forward = () => child.kill('SIGTERM');
  const wait = () => undefined;
  process.on('SIGTERM', forward).on('SIGINT', wait);
  const [code, signal] = (await once(child, 'exit')) as [number | null, NodeJS.Signals | null];
  process.off('SIGTERM', forward).off('SIGINT', wait);
  return code ?? 128 + (signal ? constants.signals[signal] : 0);
}

/** The pod's UID (a UUID: the kubelet names the pod's cgroup after it). */
export const POD_UID = '6e6d6900-6265-4e63-8800-0000000be4c0';

export interface PodCgroups {
  tree: CgroupTree;
  /** Where the pod's container processes (wrk) run: a systemd-driver container cgroup. */
  container: string;
}

const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

/**
 * A kubepods-like cgroup tree for the bench, named after its process, with the
 * pod's container cgroup in it; trees a killed bench left (its pid gone) are removed first.
 */
export function createPodCgroups(): PodCgroups {
  const top = cgroup2Mount();
  for (const name of readdirSync(top)) {
    const pid = /^nmi-bench-(\d+)$/.exec(name)?.[1];
    if (pid && !alive(Number(pid))) removeTree(path.join(top, name));
  }
  const tree = createCgroupTree(`nmi-bench-${process.pid}`);
  return { tree, container: tree.podCgroup(POD_UID, 'systemd') };
}

/** One keep-alive token request from inside the pod (and its cgroup, if given), to the metadata address; the answer's bytes. */
export async function podGet(target: string, cgroup?: string, close = false): Promise<Buffer> {
  const argv = inPod([process.execPath, rawGetBin, METADATA_IP, '80', target, ...(close ? ['close'] : [])], cgroup);
  const { stdout } = await run(argv[0]!, argv.slice(1), { signal: interrupt.signal }).catch((err: unknown) => {
    throw new Error(`request from the pod: ${String((err as { stderr?: string }).stderr ?? (err as Error).message).trim()}`);
  });
  return Buffer.from(stdout.trim(), 'base64');
}
