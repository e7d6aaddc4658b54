// V8's flags for `nmi run`, by server. They must be set before V8 starts, so
// the daemon re-executes itself with them (same pid: systemd's notify socket
// and the container runtime see one process) when node was started otherwise.
//
// native: cache hits never enter JavaScript, so V8 is tuned for a small, steady
// daemon. Each flag measured with `bench --rss` (250 pods, 1000 cached tokens):
//   --max-semi-space-size=1  the young generation stays at 2 MiB instead of growing
//                            to 32 MiB: ~20 MiB less RSS;
//   --optimize-for-size      V8 favours memory over speed (heap growth, code flushing): ~7 MiB;
//   --v8-pool-size=2         two GC/compiler threads, not four, each with its own malloc
//                            arena: ~3.5 MiB;
//   --no-memory-reducer      no full GC when the heap goes quiet after start: that ~20 ms
//                            pause (with its helper threads) stalled the native server
//                            thread on a shared core (p99 1.1-2.0 ms -> 0.5-0.95 ms in `bench`).
//   --no-maglev --no-opt     only the interpreter and Sparkplug: on Node.js 26 the daemon
//                            with a full cache was 85-90 MiB against Node.js 20's 69 MiB, the
//                            most of it optimized code and the binary's pages that compile it;
//                            without Maglev 80-83 MiB, without TurboFan too 76-78 MiB, and a
//                            miss (all JavaScript) costs no more CPU (`bench --runtimes`).
// Measured again on 26: taken out one at a time, none of the first four moves the RSS
// past its run-to-run spread, but the first two stand in for each other (either shrinks
// the young generation, 16 MiB by default on 26, to 1-2 MiB): without both the daemon was
// 109 against 87 MiB. The memory reducer's full GC comes ~30 s after start on 26 (~9 s on
// 20), and a run spanning it doubled the fast path's p99 in the two rounds on a quiet machine.
// js: every request runs in JavaScript (hits in its worker thread), where the
// first two cost 10-15% of the rate (`bench --servers js,node`, before the worker:
// 0.75 -> 0.79-0.82 × node:http), so it keeps V8's speed defaults and only the two
// that cost it nothing.
import { messageOf } from '../errors/errors.js';
import { addon } from '../native/addon.js';
import { listenFds } from '../systemd/listen-fds.js';

export const NODE_FLAGS = {
  native: ['--max-semi-space-size=1', '--optimize-for-size', '--v8-pool-size=2', '--no-memory-reducer', '--no-maglev', '--no-opt'],
  js: ['--v8-pool-size=2', '--no-memory-reducer'],
} as const satisfies Record<string, readonly string[]>;

/** Set in the re-executed process's environment (and removed at once): one re-exec, never a loop. */
const REEXECUTED = 'NMI_NODE_FLAGS_SET';

/** `--no-memory-reducer`, `--memory_reducer` and `--memory-reducer=…` are one flag to node. */
function flagName(arg: string): string {
  return arg.split('=')[0]!.replaceAll('_', '-').replace(/^--no-/, '--');
}

const managed = new Set(Object.values(NODE_FLAGS).flat().map(flagName));

/**
 * node's arguments (after its own path) that give `wanted`, keeping every other
 * node option (--cpu-prof, --inspect...) and the script with its arguments; undefined
 * when execArgv already holds exactly `wanted` of the flags nmi manages.
 */
export function nodeArgs(wanted: readonly string[], execArgv: readonly string[], argv: readonly string[]): string[] | undefined {
  const current = execArgv.filter((arg) => managed.has(flagName(arg)));
  if (current.length === wanted.length && current.every((arg, i) => arg === wanted[i])) return undefined;
  return [...execArgv.filter((arg) => !managed.has(flagName(arg))), ...wanted, ...argv.slice(1)];
}

/** Re-executes this process with `wanted` unless it runs with them already; on failure it goes on as it is, with a warning. */
export function useNodeFlags(wanted: readonly string[]): void {
  const again = process.env[REEXECUTED] !== undefined;
  delete process.env[REEXECUTED];
  const args = nodeArgs(wanted, process.execArgv, process.argv);
  if (!args) return;
  const running = `running with ${process.execArgv.join(' ') || "node's defaults"}`;
  if (again) {
    process.stderr.write(`nmi: node did not keep the flags ${wanted.join(' ')}; ${running}\n`);
    return;
  }
  const env = Object.entries({ ...process.env, [REEXECUTED]: '1' }).map(([name, value]) => `${name}=${value ?? ''}`);
  let error: string;
  try {
    error = addon().exec(process.execPath, [process.execPath, ...args], env, [...listenFds(process.env).values()].flat());
  } catch (err) {
    error = messageOf(err);
  }
  process.stderr.write(`nmi: could not restart node with ${wanted.join(' ')} (${error}); ${running}\n`);
}
