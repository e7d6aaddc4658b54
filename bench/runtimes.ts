// --runtimes mode: nmi's native server on several node binaries in one run, each
// against the first (the baseline): start-up, memory with a full cache (rss.ts),
// and cache-hit throughput beside the C constant server (servers.ts). Runtimes
// take turns within each trial, so drift on the shared machine hits each alike.
import { execFileSync } from 'node:child_process';
import { accessSync, constants, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import path from 'node:path';
import { startImds, startKubelet } from '../src/demo/standins.js';
import { bindingsYaml, freePort, memory, mib, middle, row, say, startNmi, stopChildren, type Memory, type Runtime } from './common.js';
import { runRss, SETTLE_S, type RssParams, type RssResult } from './rss.js';
import { median, medianOf, runThroughput, type Measured, type ThroughputParams } from './servers.js';

export interface RuntimesParams {
  /** The first is the baseline. */
  runtimes: Runtime[];
  /** Measured starts per runtime (after one unmeasured). */
  starts: number;
  /** RSS runs per runtime (each about a minute). */
  rssRuns: number;
  /** Throughput trials per runtime. */
  trials: number;
  rss: RssParams;
  /** One trial of native and c on loopback: the runtimes take turns between trials. */
  throughput: ThroughputParams;
}

/** `--runtimes a,b`: each an executable that runs as node. */
export function parseRuntimes(text: string): Runtime[] {
  const given = text.split(',').filter(Boolean);
  if (given.length === 0) throw new Error('--runtimes: a comma-separated list of node binaries, the baseline first');
  return given.map((p) => {
    const bad = (why: string) => new Error(`--runtimes: ${p}: ${why}`);
    const file = path.resolve(p);
    const stat = statSync(file, { throwIfNoEntry: false });
    if (!stat?.isFile()) throw bad(stat ? 'not a file' : 'no such file');
    try {
      accessSync(file, constants.X_OK);
    } catch {
      throw bad('not executable');
    }
    const run = (args: string[]) => {
      try {
        return execFileSync(file, args, { encoding: 'utf8', timeout: 10_000, stdio: ['ignore', 'pipe', 'pipe'] }).trim();
      } catch (err) {
        throw bad(`${args.join(' ')} failed: ${(err as Error).message.split('\n')[0]}`);
      }
    };
    const version = run(['--version']);
    if (!/^v\d+\.\d+\.\d+$/.test(version)) throw bad(`--version printed ${JSON.stringify(version.split('\n')[0])}, not a node version`);
    // What /proc/<pid>/exe will show (node resolves it from there): node's binary, also when `p` is a script that execs it.
    const exe = run(['-p', 'process.execPath']);
    if (!path.isAbsolute(exe)) throw bad(`-p process.execPath printed ${JSON.stringify(exe.split('\n')[0])}, not a path`);
    return { path: file, exe, version };
  });
}

/** `node vX.Y.Z`, with the path when two runtimes share a version. */
function labels(runtimes: Runtime[]): string[] {
  return runtimes.map((r) => (runtimes.filter((o) => o.version === r.version).length > 1 ? `node ${r.version} (${r.path})` : `node ${r.version}`));
}

interface Start {
  readyMs: number;
  ready: Memory;
}

/** Fresh native daemons (one pod, one identity, file bindings), runtimes taking turns: time to ready and RSS then. */
async function startups(runtimes: Runtime[], starts: number): Promise<Start[][]> {
  const tmp = mkdtempSync(path.join(tmpdir(), 'nmi-bench-'));
  const kubelet = await startKubelet([{ name: 'bench-pod', namespace: 'default', ip: '127.0.0.1', labels: { aadpodidbinding: 'bench' } }]);
  const imds = await startImds();
  try {
    writeFileSync(path.join(tmp, 'bindings.yaml'), bindingsYaml([{ name: 'bench-identity', clientId: '00000000-0000-0000-0000-0000000be4c0' }], 'bench'));
    const out = runtimes.map((): Start[] => []);
    // Round 0 is not kept: it reads each binary into the page cache.
    for (let n = 0; n <= starts; n++) {
      for (const [i, runtime] of runtimes.entries()) {
        const daemon = await startNmi({ runtime, server: 'native', nodeIp: '127.0.0.1', port: await freePort(), rules: 'none', bindings: tmp, kubelet, imds, pin: false });
        const ready = memory(daemon.pid);
        await daemon.stop();
        if (n > 0) out[i]!.push({ readyMs: daemon.readyMs, ready });
      }
    }
    return out;
  } finally {
    await stopChildren();
    kubelet.close();
    imds.close();
    rmSync(tmp, { recursive: true, force: true });
  }
}

/** A table whose columns fit their widest cell. */
function table(header: string[], rows: string[][]): void {
  const widths = header.map((h, c) => Math.max(h.length, ...rows.map((r) => r[c]!.length)));
  say(row(header, widths));
  rows.forEach((r) => say(row(r, widths)));
}

const times = (a: number | undefined, b: number | undefined) => (a === undefined || b === undefined ? '-' : `${(a / b).toFixed(2)}x`);
const ms = (v: number | undefined) => (v === undefined ? '-' : `${v.toFixed(2)}ms`);
const fileAnon = (m: Memory) => `${mib(m.fileKiB)}/${mib(m.anonKiB)}`;
/** The run whose figure is the median, so its columns belong together. */
const medianRun = <T>(runs: T[], figure: (t: T) => number): T | undefined => [...runs].sort((a, b) => figure(a) - figure(b))[Math.floor(runs.length / 2)];

function startupTable(names: string[], starts: Start[][]): void {
  const ready = starts.map((s) => middle(s.map((x) => x.readyMs)));
  const rss = starts.map((s) => medianRun(s, (x) => x.ready.rssKiB)?.ready);
  say('');
  say(`startup: spawn to /readyz 200 and RSS then, median of ${starts[0]!.length} starts (one pod, one identity, --bindings <folder>)`);
  table(['runtime', 'ready', 'min-max', 'x baseline', 'RSS at ready', 'file/anon', 'x baseline'], names.map((name, i) => {
    const t = starts[i]!.map((x) => x.readyMs);
    return [name, `${ready[i]!.toFixed(0)}ms`, `${Math.min(...t).toFixed(0)}-${Math.max(...t).toFixed(0)}ms`, times(ready[i], ready[0]),
      mib(rss[i]!.rssKiB), fileAnon(rss[i]!), times(rss[i]!.rssKiB, rss[0]!.rssKiB)];
  }));
}

function rssTable(names: string[], p: RuntimesParams, runs: RssResult[][]): void {
  // Judged as rss.ts judges the goal: the larger of filled and settled.
  const judged = (r: RssResult) => Math.max(r.filled.rssKiB, r.settled.rssKiB);
  const mid = runs.map((r) => medianRun(r, judged)!);
  say('');
  say(`RSS: native server, ${p.rss.pods} pods x ${p.rss.identities} identities x ${p.rss.resources} resources cached (--bindings ${p.rss.bindings}); the run with the median RSS of ${p.rssRuns}`);
  table(['runtime', 'RSS ready', 'RSS filled', `RSS +${SETTLE_S}s`, `file/anon +${SETTLE_S}s`, 'peak (HWM)', '2nd pass in C++', 'cpu/miss', 'x baseline', 'max(filled, settled)', 'min-max', 'x baseline'], names.map((name, i) => {
    const m = mid[i]!;
    const all = runs[i]!.map(judged);
    return [name, mib(m.ready.rssKiB), mib(m.filled.rssKiB), mib(m.settled.rssKiB), fileAnon(m.settled), mib(m.settled.hwmKiB), `${m.secondPassNative}/${m.tokens}`,
      `${Math.round(m.missCpuUs)}us`, times(m.missCpuUs, mid[0]!.missCpuUs), mib(judged(m)), `${mib(Math.min(...all))}-${mib(Math.max(...all))}`, times(judged(m), judged(mid[0]!))];
  }));
  const missed = runs.flat().filter((r) => r.imdsCalls !== r.tokens || r.secondPassImdsCalls !== 0).length;
  if (missed > 0) say(`  ${missed} run(s) did not hold every token in the cache: their RSS is not comparable`);
}

function throughputTable(names: string[], trials: Measured[][]): void {
  const fig = trials.map((all) => ({
    native: median(all.filter((m) => m.server === 'native'))?.rps,
    c: median(all.filter((m) => m.server === 'c'))?.rps,
    p99: medianOf(all, 'loopback', 'native', 'p99Ms'),
    cP99: medianOf(all, 'loopback', 'c', 'p99Ms'),
    cpu: medianOf(all, 'loopback', 'native', 'cpuUsPerRequest'),
    cCpu: medianOf(all, 'loopback', 'c', 'cpuUsPerRequest'),
    inC: Math.min(...all.flatMap((m) => (m.nativeShare === undefined ? [] : [m.nativeShare]))),
  }));
  const base = fig[0]!;
  say('');
  say(`fast path: cache hits on loopback, native and the C constant ${trials[0]!.length / 2} trial(s) each per runtime (a C run beside each native run); req/s of the median trials, p99 and cpu/req medians of all`);
  table(['runtime', 'native req/s', 'x baseline', 'C req/s', 'native/C', 'native p99', 'x baseline', 'C p99', 'native cpu/req', 'x baseline', 'cpu C/native', 'in C++'], names.map((name, i) => {
    const f = fig[i]!;
    return [name, f.native?.toFixed(0) ?? '-', times(f.native, base.native), f.c?.toFixed(0) ?? '-', times(f.native, f.c), ms(f.p99), times(f.p99, base.p99), ms(f.cP99),
      f.cpu === undefined ? '-' : `${f.cpu.toFixed(1)}us`, times(f.cpu, base.cpu), times(f.cCpu, f.cpu), `${(f.inC * 100).toFixed(1)}%`];
  }));
  say('  x baseline: this runtime\'s figure / the baseline\'s (req/s: higher is faster; p99 and cpu/req: higher is slower). cpu C/native: the C server\'s cpu/req / native\'s, the rate ratio a quiet machine would show');
}

export async function runRuntimes(p: RuntimesParams): Promise<void> {
  const names = labels(p.runtimes);
  say('nmi bench --runtimes: nmi run --server native on each runtime; ratios against the first');
  p.runtimes.forEach((r, i) => say(`  ${names[i]}: ${r.path}${r.exe === r.path ? '' : ` (runs ${r.exe})`}${i === 0 ? ', the baseline' : ''}`));
  say(`  per runtime: ${p.starts} starts, ${p.rssRuns} RSS run(s), ${p.trials} throughput trials (native, then C); runtimes taking turns; load average ${loadavg().map((l) => l.toFixed(2)).join(' ')}`);
  const starts = await startups(p.runtimes, p.starts);
  const rss = p.runtimes.map((): RssResult[] => []);
  const fast = p.runtimes.map((): Measured[] => []);
  for (let n = 0; n < p.rssRuns; n++) {
    for (const [i, runtime] of p.runtimes.entries()) {
      const [r] = await runRss(p.rss, runtime);
      rss[i]!.push(r!);
      say(`  ${names[i]}: RSS ready ${mib(r!.ready.rssKiB)}, filled ${mib(r!.filled.rssKiB)}, +${SETTLE_S}s ${mib(r!.settled.rssKiB)} (file/anon ${fileAnon(r!.settled)})`);
    }
  }
  // Throughput last: it pins this process to wrk's cpu for the rest of the run.
  let misses = 0;
  for (let n = 0; n < p.trials; n++) {
    for (const [i, runtime] of p.runtimes.entries()) {
      const result = await runThroughput(p.throughput, runtime);
      fast[i]!.push(...result.all);
      misses += result.imdsCalls - result.daemonStarts;
    }
  }
  say('');
  say(`nmi bench --runtimes, results (load average at end ${loadavg().map((l) => l.toFixed(2)).join(' ')})`);
  startupTable(names, starts);
  rssTable(names, p, rss);
  throughputTable(names, fast);
  if (misses !== 0) say(`  IMDS calls: ${misses} more than one per daemon start: some benchmarked requests missed the cache`);
}
