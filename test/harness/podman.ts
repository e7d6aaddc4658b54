// podman as the tests under a real container runtime use it, with what this
// machine needs: runc (crun refuses this hybrid cgroup v1/v2 host) and explicit
// ulimits (see ulimits()). Only `--network none` and `--network ns:<a namespace
// the test made>` are used, so podman's CNI networks and their rules are never
// involved; --log-level error hides podman's warning that their plugins are
// missing.
//
// podman runs in an empty network namespace of its own (unshare --net), not in
// the test's node namespace where the test process is: runc takes its own
// namespace for the host's and refuses any net.* sysctl there, and podman sets
// net.ipv4.ping_group_range in every container not on `--network host`. Nor is
// it ever in the host's namespace, so a mistaken flag cannot touch the host.
import { execFileSync, spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';

/** Runs `podman <args>` (in a namespace of its own); returns its stdout, or throws with its stderr. */
export function podman(args: string[], timeoutMs = 120_000): string {
  try {
    return execFileSync('unshare', ['--net', 'podman', '--log-level', 'error', '--runtime', 'runc', ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: timeoutMs });
  } catch (err) {
    const stderr = String((err as { stderr?: string }).stderr ?? '').trim();
    throw new Error(`podman ${args.join(' ')}:\n${stderr || (err as Error).message}`);
  }
}

/** A container's output as `podman logs` keeps it, stdout and stderr (where nmi logs) together. */
export function containerLogs(name: string): string {
  const r = spawnSync('unshare', ['--net', 'podman', '--log-level', 'error', '--runtime', 'runc', 'logs', name], { encoding: 'utf8', timeout: 60_000 });
  return `${r.stdout ?? ''}${r.stderr ?? ''}`;
}

/** Like podman(), for clean-up: whatever is already gone is fine. */
export function podmanQuiet(args: string[]): void {
  try {
    podman(args, 60_000);
  } catch {
    // already gone
  }
}

/**
 * `--ulimit` flags for `podman run`. podman asks runc for its own defaults (a
 * million open files), above this machine's hard limits, and root here lacks
 * CAP_SYS_RESOURCE to raise them: runc then fails with "error setting rlimit
 * type 7: operation not permitted". Open files: our own hard limit; processes:
 * 4096, below the 32768 podman leaves conmon (more than nmi's dozen threads).
 */
export function ulimits(): string[] {
  const nofile = /^Max open files\s+\d+\s+(\d+)/m.exec(readFileSync('/proc/self/limits', 'utf8'))?.[1];
  if (!nofile) throw new Error('no "Max open files" line in /proc/self/limits');
  return ['--ulimit', `nofile=${nofile}:${nofile}`, '--ulimit', 'nproc=4096:4096'];
}
