// A Debian 12 node with real systemd as PID 1: the cached debootstrap root
// (runtime.ts) under a throwaway overlay, the package installed into it with
// dpkg, booted by systemd-nspawn inside a network namespace the test made.
// What this machine needs, each said where it is used: --register=no and
// --keep-unit (no systemd or machined on the host to register with),
// --capability=CAP_NET_ADMIN (nspawn grants it only with --private-network,
// which cannot be combined with --network-namespace-path), and nsenter instead
// of machinectl to reach the container.
import { execFile, execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { cgroup2Mount, removeTree } from './cgroups.js';
import { waitFor } from './wait-for.js';
import { debianRoot } from './runtime.js';

export interface Bind {
  host: string;
  /** Where the container sees it. */
  at: string;
}

export interface BootedNode {
  /** The container's root as the host sees it (the overlay), for writing its files. */
  root: string;
  /** The container's PID 1, as the host numbers it. */
  leader: number;
  /**
   * Runs a command in all the container's namespaces; rejects on a non-zero exit, with its stderr.
   * Never synchronous: `systemctl start` waits for nmi, and nmi for the stand-ins this process serves.
   */
  exec(cmd: string, args: string[]): Promise<string>;
  systemctl(...args: string[]): Promise<string>;
  /** `systemctl show -p NAME --value` for nmi.service. */
  show(property: string): Promise<string>;
  journal(unit?: string): Promise<string>;
  /** `systemctl status nmi` and the unit's last journal lines, for failure messages (never rejects). */
  describe(): Promise<string>;
  /** Shuts the container down (as `poweroff` would), then removes the overlay. */
  close(): Promise<void>;
}

const run = promisify(execFile);
const children = new Set<ChildProcess>();
process.on('exit', () => children.forEach((c) => c.kill('SIGKILL')));

/** Runs a command in an unbooted container of `root` (no network), as a node's image build would. */
export function inContainer(root: string, args: string[], binds: Bind[] = []): string {
  return execFileSync('systemd-nspawn', ['--quiet', '--register=no', '--keep-unit', '--private-network', ...bindArgs(binds), '-D', root, ...args], {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'pipe'],
    timeout: 120_000,
  });
}

function bindArgs(binds: Bind[]): string[] {
  return binds.map((b) => `--bind-ro=${b.host}:${b.at}`);
}

/** A fresh overlay of the cached root (of `arch`, the host's by default); `prepare` writes into it (install the package, configure) before the boot. */
export function overlayRoot(arch?: string): { root: string; remove(): void } {
  const dir = mkdtempSync('/var/tmp/nmi-nspawn-');
  for (const sub of ['upper', 'work', 'root']) mkdirSync(path.join(dir, sub));
  const root = path.join(dir, 'root');
  execFileSync('mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=${debianRoot(arch)},upperdir=${dir}/upper,workdir=${dir}/work`, root]);
  return {
    root,
    remove() {
      execFileSync('umount', ['-l', root]);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Boots `root` under systemd-nspawn in network namespace `netns`, and waits for systemd to finish starting up. */
export async function boot(overlay: { root: string; remove(): void }, netns: string, binds: Bind[] = []): Promise<BootedNode> {
  const { root } = overlay;
  const args = ['--boot', '--register=no', '--keep-unit', `--network-namespace-path=/run/netns/${netns}`, '--capability=CAP_NET_ADMIN', ...bindArgs(binds), '-D', root];
  // --keep-unit makes the caller's cgroup the container's root cgroup, and the
  // container's systemd then manages (and kills) whatever is in it: here that
  // would be the host's root cgroup. So nspawn starts in cgroups of its own, in
  // the name=systemd and the unified hierarchy both (this host is hybrid).
  const cgroups = cgroupHierarchies().map((h) => path.join(h, `nmi-nspawn-${process.pid}-${path.basename(path.dirname(root))}`));
  cgroups.forEach((dir) => mkdirSync(dir));
  const join = 'for g in "$@"; do [ "$g" = -- ] && break; echo $$ >"$g/cgroup.procs"; shift; done; shift; exec systemd-nspawn "$@"';
  const nspawn = spawn('sh', ['-c', join, 'sh', ...cgroups, '--', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(nspawn);
  nspawn.on('exit', () => children.delete(nspawn));
  let console = '';
  const keep = (d: Buffer) => (console = (console + d.toString()).slice(-20_000));
  nspawn.stdout!.on('data', keep);
  nspawn.stderr!.on('data', keep);
  const exited = once(nspawn, 'exit');
  const shutdown = async () => {
    if (nspawn.exitCode === null && nspawn.signalCode === null) {
      nspawn.kill('SIGTERM'); // nspawn asks the container's systemd to power off
      const stopped = await Promise.race([exited.then(() => true), sleep(60_000).then(() => false)]);
      if (!stopped) {
        nspawn.kill('SIGKILL');
        await exited;
      }
    }
    overlay.remove();
    cgroups.forEach(removeTree);
  };
  let leader: number;
  try {
    leader = await untilBooted(nspawn, () => console);
  } catch (err) {
    await shutdown();
    throw err;
  }
  const exec = async (cmd: string, cmdArgs: string[]) => (await run('nsenter', ['-t', String(leader), '-a', cmd, ...cmdArgs], { encoding: 'utf8', timeout: 120_000 })).stdout;
  return {
    root,
    leader,
    exec,
    systemctl: (...a) => exec('systemctl', ['--no-pager', ...a]),
    show: async (property) => (await exec('systemctl', ['show', '-p', property, '--value', 'nmi.service'])).trim(),
    journal: (unit = 'nmi.service') => exec('journalctl', ['--no-pager', '-o', 'cat', '-u', unit]),
    describe: () => exec('sh', ['-c', 'systemctl --no-pager status nmi; journalctl --no-pager -o cat -n 30 -u nmi; true']).catch((err: Error) => err.message),
    close: shutdown,
  };
}

/** The cgroup v2 mount and, on a hybrid host, systemd's own v1 hierarchy. */
function cgroupHierarchies(): string[] {
  const named = readFileSync('/proc/self/mounts', 'utf8')
    .split('\n')
    .map((line) => line.split(' '))
    .filter((f) => f[2] === 'cgroup' && (f[3] ?? '').split(',').includes('name=systemd'))
    .map((f) => f[1]!);
  return [cgroup2Mount(), ...named];
}

/** The container's PID 1 once its systemd has finished starting up. */
async function untilBooted(nspawn: ChildProcess, console: () => string): Promise<number> {
  const leader = await waitFor(`the container's init\n${console()}`, () => {
    if (nspawn.exitCode !== null) throw new Error(`systemd-nspawn exited ${nspawn.exitCode}:\n${console()}`);
    // nspawn's first child is its own, until it execs the container's systemd.
    const kid = Number(readFileSync(`/proc/${nspawn.pid}/task/${nspawn.pid}/children`, 'utf8').trim().split(' ')[0]);
    return kid && readFileSync(`/proc/${kid}/comm`, 'utf8').trim() === 'systemd' ? kid : undefined;
  });
  let state = '';
  // "degraded" too: a unit of the minimal root may fail in a container (not nmi's: the tests check it).
  await waitFor(
    'systemd to start up',
    async () => {
      // It exits non-zero until it is "running"; its answer is on stdout either way.
      const r = await run('nsenter', ['-t', String(leader), '-a', 'systemctl', 'is-system-running'], { encoding: 'utf8' }).catch((err: { stdout?: string }) => err);
      state = String(r.stdout ?? '').trim();
      return ['running', 'degraded'].includes(state) || undefined;
    },
    120_000,
  ).catch((err: Error) => {
    throw new Error(`${err.message} (is-system-running: ${state})\n${console()}`);
  });
  return leader;
}

/** Replaces the shipped /etc/default/nmi's settings by `settings` (others stay as shipped; an undefined value drops the line). */
export function configure(root: string, settings: Record<string, string | undefined>): void {
  const file = path.join(root, 'etc', 'default', 'nmi');
  const lines = readFileSync(file, 'utf8').split('\n').filter((line) => !Object.keys(settings).some((k) => line.startsWith(`${k}=`)));
  for (const [k, v] of Object.entries(settings)) if (v !== undefined) lines.push(`${k}=${v}`);
  writeFileSync(file, `${lines.join('\n')}\n`);
}
