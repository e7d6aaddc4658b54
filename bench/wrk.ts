// wrk, pinned to the load cpu, optionally from inside a pod.
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { interrupt, LOAD_CPU } from './common.js';

const run = promisify(execFile);

export interface WrkResult {
  rps: number;
  requests: number;
  p50Ms: number;
  p99Ms: number;
  socketErrors?: string;
}

function toMs(value: string, unit: string): number {
  const n = Number(value);
  return unit === 'us' ? n / 1000 : unit === 's' ? n * 1000 : n;
}

export function parseWrk(text: string): WrkResult {
  const rps = /^Requests\/sec:\s+([\d.]+)/m.exec(text);
  const requests = /^\s*(\d+) requests in /m.exec(text);
  const p50 = /^\s+50%\s+([\d.]+)(us|ms|s)\b/m.exec(text);
  const p99 = /^\s+99%\s+([\d.]+)(us|ms|s)\b/m.exec(text);
  if (!rps || !requests || !p50 || !p99) throw new Error(`unexpected wrk output:\n${text}`);
  // A fast 404 is not a cache hit.
  const non2xx = /Non-2xx or 3xx responses: (\d+)/.exec(text);
  if (non2xx) throw new Error(`wrk saw ${non2xx[1]} answers other than 2xx/3xx: not a cache-hit benchmark\n${text}`);
  const errors = /Socket errors: (.*)/.exec(text)?.[1];
  return { rps: Number(rps[1]), requests: Number(requests[1]), p50Ms: toMs(p50[1]!, p50[2]!), p99Ms: toMs(p99[1]!, p99[2]!), socketErrors: errors };
}

export interface WrkRun {
  url: string;
  connections: number;
  seconds: number;
  /** Runs the command somewhere else (a pod's namespace and cgroup). */
  wrap?: (command: string[]) => string[];
  /** Every request with Connection: close: a new connection each. */
  churn?: boolean;
}

export async function wrk({ url, connections, seconds, wrap, churn = false }: WrkRun): Promise<WrkResult> {
  const close = churn ? ['-H', 'Connection: close'] : [];
  const load = ['taskset', '-c', String(LOAD_CPU), 'wrk', '-t1', `-c${connections}`, `-d${seconds}s`, '--latency', '-H', 'Metadata: true', ...close, url];
  const argv = wrap ? wrap(load) : load;
  const { stdout } = await run(argv[0]!, argv.slice(1), { signal: interrupt.signal });
  return parseWrk(stdout);
}
