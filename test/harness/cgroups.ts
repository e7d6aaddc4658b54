// For the eBPF tests: a cgroup v2 tree of the test's own standing in for
// kubepods (pod cgroups named as the kubelet names them, with either cgroup
// driver), clients started inside a pod cgroup, and a private mount namespace
// with its own bpffs, so the test's pins are invisible to every other test
// (an `nmi cleanup` of a parallel test file must not remove them).
import { execFile, execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { promisify } from 'node:util';
import { mkdirSync, readlinkSync, rmdirSync, readdirSync, statSync } from 'node:fs';
import path from 'node:path';
import { mountsOfType } from '../../src/util/mounts.js';
import { waitFor } from './wait-for.js';

export function cgroup2Mount(): string {
  const [mount] = mountsOfType('cgroup2');
  if (!mount) throw new Error('no cgroup v2 hierarchy is mounted');
  return mount;
}

export interface CgroupTree {
  root: string;
  /** A container cgroup of the pod with this UID: systemd driver names, or cgroupfs ones. */
  podCgroup(uid: string, driver: 'systemd' | 'cgroupfs', container?: string): string;
  /** A cgroup under the root that is no pod's. */
  plainCgroup(name: string): string;
  /** Removes the tree; its processes must be gone. */
  remove(): void;
}

/** A tree named `name` at the top of the cgroup v2 hierarchy. */
export function createCgroupTree(name = `nmi-t${process.pid}`): CgroupTree {
  const root = path.join(cgroup2Mount(), name);
  mkdirSync(root, { recursive: true });
  const make = (relative: string) => {
    const full = path.join(root, relative);
    mkdirSync(full, { recursive: true });
    return full;
  };
  return {
    root,
    podCgroup(uid, driver, container = 'c0ffee') {
      return driver === 'systemd'
        ? make(`kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod${uid.replaceAll('-', '_')}.slice/cri-containerd-${container}.scope`)
        : make(`kubepods/burstable/pod${uid}/${container}`);
    },
    plainCgroup: make,
    remove: () => removeTree(root),
  };
}

/** Removes a cgroup folder and those under it; one a process is still in stays (the next run's tree has another name). */
export function removeTree(dir: string): void {
  for (const entry of readdirSync(dir, { withFileTypes: true })) if (entry.isDirectory()) removeTree(path.join(dir, entry.name));
  try {
    rmdirSync(dir);
  } catch {
    // not empty of processes
  }
}

export interface CallResult {
  status?: number;
  body?: string;
  /** The server's address as the client's socket sees it (getpeername). */
  peer?: string;
  error?: string;
}

const CLIENT = `
const [url, localAddress] = JSON.parse(process.argv[1]);
const req = require('http').get(url, { headers: { Metadata: 'true' }, localAddress: localAddress || undefined, agent: false, timeout: 5000 }, (res) => {
  let body = '';
  res.on('data', (d) => (body += d));
  res.on('end', () => console.log(JSON.stringify({ status: res.statusCode, body, peer: req.socket.remoteAddress + ':' + req.socket.remotePort })));
});
req.on('timeout', () => req.destroy(new Error('timeout')));
req.on('error', (e) => console.log(JSON.stringify({ error: e.code || e.message })));`;

/**
 * One GET from a process placed in `cgroup` before it starts, in network
 * namespace `netns` (undefined: the caller's, i.e. the node's).
 */
export async function callFrom(o: { cgroup: string; netns?: string; localAddress?: string }, url: string): Promise<CallResult> {
  return JSON.parse(await scriptFrom(o, CLIENT, [url, o.localAddress ?? ''])) as CallResult;
}

/**
 * A node script run in `cgroup` (joined before `ip netns exec`, which remounts
 * /sys), optionally in `netns` and as `uid` (its socket's owner); its stdout.
 * Asynchronous: the stand-ins it may reach are served by this very process.
 */
export function scriptFrom(o: ProcessPlace, script: string, args: unknown): Promise<string> {
  return commandFrom(o, [process.execPath, '-e', script, JSON.stringify(args)]);
}

/** Where a command runs: its cgroup, and optionally its network namespace and uid. */
export interface ProcessPlace {
  cgroup: string;
  netns?: string;
  uid?: number;
}

/** A command run as scriptFrom runs a script; its stdout. */
export async function commandFrom(o: ProcessPlace, argv: string[]): Promise<string> {
  const user = o.uid === undefined ? '' : `setpriv --reuid=${o.uid} --regid=${o.uid} --clear-groups `;
  const exec = o.netns ? `exec ip netns exec ${o.netns} ${user}"$@"` : `exec ${user}"$@"`;
  const { stdout } = await promisify(execFile)('sh', ['-c', `echo $$ > ${o.cgroup}/cgroup.procs && ${exec}`, 'sh', ...argv], {
    encoding: 'utf8',
    timeout: 20_000,
  });
  return stdout;
}

export interface MountNamespace {
  /** Prefix a command with this to run it in the namespace. */
  prefix: string[];
  /** Runs a command there; its stdout. */
  exec(cmd: string, args: string[]): string;
  close(): void;
}

/** A private mount namespace holding a fresh bpffs at /sys/fs/bpf, kept alive by a sleeping process. */
export async function createBpfMountNamespace(): Promise<MountNamespace> {
  const holder: ChildProcess = spawn('unshare', ['-m', '--propagation', 'private', 'sleep', 'infinity'], { stdio: 'ignore' });
  holder.unref();
  process.on('exit', () => holder.kill('SIGKILL'));
  const pid = String(holder.pid);
  const own = readlinkSync('/proc/self/ns/mnt');
  await waitFor('the mount namespace', () => {
    try {
      return readlinkSync(`/proc/${pid}/ns/mnt`) !== own && statSync(`/proc/${pid}`).isDirectory();
    } catch {
      return undefined;
    }
  });
  const prefix = ['nsenter', '-t', pid, '-m', '--'];
  const exec = (cmd: string, args: string[]) => execFileSync(prefix[0]!, [...prefix.slice(1), cmd, ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  exec('mount', ['-t', 'bpf', 'bpf', '/sys/fs/bpf']);
  return { prefix, exec, close: () => holder.kill('SIGKILL') };
}
