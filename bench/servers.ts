// Throughput mode: nmi's native fast path and js server on cache hits, beside a
// node:http constant server and a C constant server answering the same bytes,
// on loopback and from a pod namespace through the DNAT rule or the eBPF
// connect redirect (pod-path.ts). Every trial is a
// fresh server process pinned to one core, loaded by wrk pinned to the other,
// warmed by a short wrk run first; trials interleave (native, js, node, c,
// native, ...) so drift hits every server alike; the median trial is reported.
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { startImds, startKubelet, type DemoPod, type Standin } from '../src/demo/standins.js';
import { waitFor } from '../test/harness/wait-for.js';
import {
  bindingsYaml,
  freePort,
  interrupt,
  LOAD_CPU,
  cpuUs,
  memory,
  middle,
  mib,
  nativeCounts,
  row,
  say,
  SERVER_CPU,
  spawnChild,
  startNmi,
  stopChildren,
  type NmiServer,
  type Runtime,
} from './common.js';
import type { FixedAnswer } from './constant-server.js';
import {
  createPodCgroups,
  inPod,
  METADATA_IP,
  NMI_PORT,
  NODE_IP,
  NODE_NS,
  podGet,
  POD_NS,
  POD_UID,
  redirectRule,
  removeNamespaces,
  setUpNamespaces,
  type PodCgroups,
  type RedirectRule,
} from './pod-path.js';
import { parseAnswer, rawGet, timeless } from './raw.js';
import { wrk, type WrkResult } from './wrk.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const constantServerJs = path.join(here, 'constant-server.js');
const constantC = path.resolve(here, '../../bench/constant.c');

export const SERVERS = ['native', 'native-audit', 'js', 'node', 'c'] as const;
export const PATHS = ['loopback', 'pod', 'ebpf'] as const;
export type ServerName = (typeof SERVERS)[number];
export type PathName = (typeof PATHS)[number];
type PodPath = Exclude<PathName, 'loopback'>;

function fromPod(p: PathName): p is PodPath {
  return p !== 'loopback';
}

const CLIENT_ID = '00000000-0000-0000-0000-0000000be4c0';
const RESOURCE = 'https://management.azure.com/';
const TARGET = `/metadata/identity/oauth2/token?api-version=2018-02-01&resource=${encodeURIComponent(RESOURCE)}`;
/** Headers node:http writes itself, for nmi's js server and the node:http baseline alike. */
const NODE_HEADERS = new Set(['date', 'connection', 'keep-alive']);

export interface ThroughputParams {
  connections: number;
  /** Connection: close on every request (a connection each) instead of keep-alive. */
  churn: boolean;
  durationS: number;
  warmupS: number;
  trials: number;
  servers: ServerName[];
  paths: PathName[];
  cpuProfDir?: string;
}

export interface Measured extends WrkResult {
  path: PathName;
  server: ServerName;
  trial: number;
  rssKiB: number;
  /** The server process's CPU time (all threads, kernel included) over the measured run, per request: what a request costs it, however busy the machine. */
  cpuUsPerRequest: number;
  /** Native only: share of the daemon's requests answered in C++. */
  nativeShare?: number;
}

interface Started {
  pid: number;
  port: number;
  /** Native only: the daemon's /metrics. */
  metrics?: () => Promise<string>;
  stop(): Promise<void>;
}

/** What every server must answer, byte for byte, times aside: nmi's first cache hit. */
class Reference {
  private bytes: Buffer | undefined;
  readonly rawFile: string;
  readonly jsonFile: string;

  constructor(dir: string) {
    this.rawFile = path.join(dir, 'answer.bin');
    this.jsonFile = path.join(dir, 'answer.json');
  }

  get answer(): Buffer | undefined {
    return this.bytes;
  }

  /** The first call sets the reference and writes the baselines' answer files; later calls compare. */
  check(bytes: Buffer, who: string): void {
    if (this.bytes === undefined) return this.set(bytes);
    if (timeless(bytes) !== timeless(this.bytes)) {
      throw new Error(`${who} does not answer what nmi answered (times aside):\n--- nmi\n${this.bytes.toString('latin1')}\n--- ${who}\n${bytes.toString('latin1')}`);
    }
  }

  private set(bytes: Buffer): void {
    const parsed = parseAnswer(bytes);
    if (parsed.status !== 200) throw new Error(`nmi's cache hit answered ${parsed.status}: ${parsed.body.toString()}`);
    const keepAlive = parsed.headers.find(([k]) => k.toLowerCase() === 'keep-alive')?.[1];
    const fixed: FixedAnswer = {
      status: parsed.status,
      headers: parsed.headers.filter(([k]) => !NODE_HEADERS.has(k.toLowerCase())),
      body: parsed.body.toString('base64'),
      keepAliveTimeoutS: Number(/timeout=(\d+)/.exec(keepAlive ?? '')?.[1] ?? 5),
    };
    writeFileSync(this.rawFile, bytes);
    writeFileSync(this.jsonFile, JSON.stringify(fixed));
    this.bytes = bytes;
  }
}

interface Setup {
  params: ThroughputParams;
  /** The node binary the daemons and the node:http constant server run on. */
  runtime: Runtime;
  bindingsDir: string;
  kubelet: Standin;
  imds: Standin;
  reference: Reference;
  /** The compiled C constant server. */
  constantBin: string;
  /** The redirect of each pod path, for the constant servers (nmi installs its own). */
  rules: Partial<Record<PodPath, RedirectRule>>;
  /** The ebpf path's cgroup tree (--cgroup-root) and the pod's container cgroup, where its requests come from. */
  cgroups?: PodCgroups;
}

/** The cgroup the pod's processes run in on this path: only the ebpf path places them in one. */
function podCgroup(s: Setup, p: PathName): string | undefined {
  return p === 'ebpf' ? s.cgroups!.container : undefined;
}

/** Runs a command as the pod's container does on this path (undefined: on the node, loopback). */
function podWrap(s: Setup, p: PathName): ((command: string[]) => string[]) | undefined {
  if (!fromPod(p)) return undefined;
  return (command) => inPod(command, podCgroup(s, p));
}

function ask(s: Setup, p: PathName, port: number): Promise<Buffer> {
  const close = s.params.churn;
  if (!fromPod(p)) return rawGet({ host: '127.0.0.1', port, target: TARGET, close });
  return podGet(TARGET, podCgroup(s, p), close);
}

/** The nmi server a bench server runs: `native-audit` is `native` with --audit-log; undefined for the constant servers. */
function nmiServerOf(server: ServerName): NmiServer | undefined {
  return server === 'native-audit' ? 'native' : server === 'native' || server === 'js' ? server : undefined;
}

/** A fresh daemon, its one cache miss (a 200), then one cache hit checked against the reference. */
async function startDaemon(s: Setup, server: ServerName, nmiServer: NmiServer, p: PathName): Promise<Started> {
  const port = fromPod(p) ? NMI_PORT : await freePort();
  // native-audit: the audit file in a folder of its own (the bench's temporary folder's filesystem), removed after.
  const auditDir = server === 'native-audit' ? mkdtempSync(path.join(tmpdir(), 'nmi-bench-audit-')) : undefined;
  const daemon = await startNmi({
    runtime: s.runtime, server: nmiServer, port, pin: true, cpuProfDir: s.params.cpuProfDir,
    nodeIp: fromPod(p) ? NODE_IP : '127.0.0.1',
    rules: p === 'pod' ? 'iptables' : p === 'ebpf' ? 'ebpf' : 'none',
    extraArgs: [...(p === 'ebpf' ? ['--cgroup-root', s.cgroups!.tree.root] : []), ...(auditDir ? ['--audit-log', path.join(auditDir, 'audit.jsonl')] : [])],
    bindings: s.bindingsDir, kubelet: s.kubelet, imds: s.imds,
  });
  const stop = async () => {
    await daemon.stop();
    if (auditDir) rmSync(auditDir, { recursive: true, force: true });
  };
  try {
    const miss = parseAnswer(await ask(s, p, port));
    if (miss.status !== 200) throw new Error(`the warm-up request: nmi answered ${miss.status}: ${miss.body.toString()}`);
    s.reference.check(await ask(s, p, port), `nmi --server ${server}`);
  } catch (err) {
    await stop();
    throw err;
  }
  return { pid: daemon.pid, port, metrics: nmiServer === 'native' ? daemon.metrics : undefined, stop };
}

/** A fresh constant server; on a pod path it listens where the redirect, installed for it, sends pods. */
async function startConstant(s: Setup, server: 'node' | 'c', p: PathName): Promise<Started> {
  if (!s.reference.answer) throw new Error('the constant servers need nmi answered first: list native or js before them');
  const [host, port] = fromPod(p) ? [NODE_IP, NMI_PORT] : ['127.0.0.1', 0];
  const rule = fromPod(p) ? s.rules[p]! : undefined;
  const profile = s.params.cpuProfDir ? ['--cpu-prof', `--cpu-prof-dir=${s.params.cpuProfDir}`] : [];
  const command = server === 'node'
    ? [s.runtime.path, ...profile, constantServerJs, s.reference.jsonFile, host, String(port)]
    : [s.constantBin, s.reference.rawFile, host, String(port), ...(s.params.churn ? ['close'] : [])];
  await rule?.install();
  const child = spawnChild(command, true);
  const stop = async () => {
    await child.stop();
    await rule?.remove();
  };
  try {
    const listening = await waitFor(() => `the ${server} constant server to listen:\n${child.output()}`, () => {
      if (child.process.exitCode !== null) throw new Error(`the ${server} constant server exited ${child.process.exitCode}:\n${child.output()}`);
      return /^listening (\d+)$/m.exec(child.output()) ?? undefined;
    }, 10_000);
    const bound = Number(listening[1]);
    s.reference.check(await ask(s, p, bound), `the ${server} constant server`);
    return { pid: child.process.pid!, port: bound, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

/**
 * Waits (up to 2 s) until no connection to `port` is left open on the server's side (ESTABLISHED or
 * CLOSE_WAIT in /proc/net/tcp). nmi counts a connection toward its cap of 64 per caller until it has
 * read the FIN: wrk's 64 new connections met a 429 while a slowed server still held the last run's.
 */
async function drained(port: number): Promise<void> {
  const local = `:${port.toString(16).toUpperCase().padStart(4, '0')}`;
  for (let i = 0; i < 200; i++) {
    const open = readFileSync('/proc/net/tcp', 'utf8').split('\n').some((line) => {
      const [, address, , state] = line.trim().split(/\s+/);
      return address?.endsWith(local) && (state === '01' || state === '08');
    });
    if (!open) return;
    await sleep(10);
  }
}

async function trial(s: Setup, server: ServerName, p: PathName, n: number): Promise<Measured> {
  interrupt.signal.throwIfAborted();
  const nmiServer = nmiServerOf(server);
  const started = nmiServer ? await startDaemon(s, server, nmiServer, p) : await startConstant(s, server as 'node' | 'c', p);
  try {
    const load = {
      url: fromPod(p) ? `http://${METADATA_IP}${TARGET}` : `http://127.0.0.1:${started.port}${TARGET}`,
      wrap: podWrap(s, p),
      connections: s.params.connections,
      churn: s.params.churn,
    };
    await drained(started.port);
    await wrk({ ...load, seconds: s.params.warmupS });
    await drained(started.port);
    const cpuBefore = cpuUs(started.pid);
    const result = await wrk({ ...load, seconds: s.params.durationS });
    const cpuUsPerRequest = (cpuUs(started.pid) - cpuBefore) / Math.max(1, result.requests);
    const measured: Measured = { path: p, server, trial: n, ...result, rssKiB: memory(started.pid).rssKiB, cpuUsPerRequest };
    if (started.metrics) {
      const { hit, js } = nativeCounts(await started.metrics());
      measured.nativeShare = hit / Math.max(1, hit + js);
    }
    return measured;
  } finally {
    await started.stop();
  }
}

/** The median of one figure over all trials of a server on a path (for an even count, the upper middle one). */
export function medianOf(all: Measured[], p: PathName, server: ServerName, figure: 'cpuUsPerRequest' | 'p99Ms'): number | undefined {
  return middle(all.filter((x) => x.path === p && x.server === server).map((x) => x[figure]));
}

/** The trial with the median rate (for an even count, the upper middle one). */
export function median(results: Measured[]): Measured | undefined {
  const sorted = [...results].sort((a, b) => a.rps - b.rps);
  return sorted[Math.floor(sorted.length / 2)];
}

const WIDTHS = [9, 13, 6, 8, 9, 9, 9, 10, 7];
const HEADER = ['path', 'server', 'trial', 'req/s', 'p50', 'p99', 'cpu/req', 'RSS after', 'in C++'];

function line(m: Measured): string {
  const ms = (v: number) => `${v.toFixed(2)}ms`;
  const share = m.nativeShare === undefined ? '' : `${(m.nativeShare * 100).toFixed(1)}%`;
  return row([m.path, m.server, m.trial, m.rps.toFixed(0), ms(m.p50Ms), ms(m.p99Ms), `${m.cpuUsPerRequest.toFixed(1)}µs`, mib(m.rssKiB), share], WIDTHS) + (m.socketErrors ? `  socket errors: ${m.socketErrors}` : '');
}

interface Goal {
  what: string;
  value: number;
  met: boolean;
}

/**
 * Issue 3's and issue 4's goals on one path: rates from the median trials; p99
 * from the median p99 of all trials, as one trial's p99 swings by 2× on a shared machine.
 */
function goals(rate: (server: ServerName) => number | undefined, p99: (server: ServerName) => number | undefined): Goal[] {
  const out: Goal[] = [];
  const ratio = (what: string, a: number | undefined, b: number | undefined, bound: number, atMost = false) => {
    if (a !== undefined && b !== undefined) out.push({ what, value: a / b, met: atMost ? a <= bound * b : a >= bound * b });
  };
  ratio('js server req/s ≥ 0.80 × node:http constant', rate('js'), rate('node'), 0.8);
  ratio('fast path req/s ≥ 0.80 × C constant', rate('native'), rate('c'), 0.8);
  ratio('fast path req/s ≥ 2.50 × node:http constant', rate('native'), rate('node'), 2.5);
  ratio('fast path median p99 ≤ 1.50 × C constant\'s', p99('native'), p99('c'), 1.5, true);
  ratio('fast path with --audit-log req/s ≥ 0.95 × without', rate('native-audit'), rate('native'), 0.95);
  return out;
}

export interface ThroughputResult {
  all: Measured[];
  imdsCalls: number;
  daemonStarts: number;
}

export function printThroughput(params: ThroughputParams, { all, imdsCalls, daemonStarts }: ThroughputResult): void {
  say('');
  say(row(HEADER, WIDTHS));
  for (const m of all) say(line(m));
  say('');
  say('median trial of each (by req/s):');
  say(row(HEADER, WIDTHS));
  const medians = new Map<string, Measured>();
  for (const p of params.paths) {
    for (const server of params.servers) {
      const m = median(all.filter((x) => x.path === p && x.server === server));
      if (m) {
        medians.set(`${p}/${server}`, m);
        say(line(m));
      }
    }
  }
  const ratio = (p: PathName, a: ServerName, b: ServerName) => {
    const x = medians.get(`${p}/${a}`);
    const y = medians.get(`${p}/${b}`);
    return x && y ? `${a}/${b} ${(x.rps / y.rps).toFixed(2)}` : undefined;
  };
  // Inverted, so it reads like the rate ratio it predicts when the server's core is the bottleneck.
  const cpuRatio = (p: PathName, a: ServerName, b: ServerName) => {
    const x = medianOf(all, p, a, 'cpuUsPerRequest');
    const y = medianOf(all, p, b, 'cpuUsPerRequest');
    return x !== undefined && y !== undefined ? `${a}/${b} ${(y / x).toFixed(2)}` : undefined;
  };
  say('');
  say('req/s ratios of the median trials, per path:');
  for (const p of params.paths) {
    const pairs: Array<[ServerName, ServerName]> = [['native', 'c'], ['native', 'node'], ['native', 'js'], ['native-audit', 'native'], ['native-audit', 'c'], ['js', 'node'], ['node', 'c']];
    say(`  ${p.padEnd(9)} ${pairs.map(([a, b]) => ratio(p, a, b)).filter(Boolean).join('   ')}`);
  }
  say('p99, median of all trials, per path:');
  for (const p of params.paths) {
    const p99s = params.servers.map((server) => [server, medianOf(all, p, server, 'p99Ms')] as const).filter(([, v]) => v !== undefined);
    say(`  ${p.padEnd(9)} ${p99s.map(([server, v]) => `${server} ${v!.toFixed(2)}ms`).join('   ')}`);
  }
  say('cpu per request, inverted (b\'s cpu/req ÷ a\'s), medians of all trials, per path: less sensitive to a busy machine');
  for (const p of params.paths) {
    const pairs: Array<[ServerName, ServerName]> = [['native', 'c'], ['native', 'node'], ['native-audit', 'native'], ['js', 'node'], ['node', 'c']];
    say(`  ${p.padEnd(9)} ${pairs.map(([a, b]) => cpuRatio(p, a, b)).filter(Boolean).join('   ')}`);
  }
  say('');
  say(`goals (same path; rates of the median trials, p99 the median of all trials${params.connections === 64 ? '' : `; the p99 goal is defined at 64 connections, this run used ${params.connections}`}):`);
  let met = 0;
  let total = 0;
  for (const p of params.paths) {
    for (const g of goals((server) => medians.get(`${p}/${server}`)?.rps, (server) => medianOf(all, p, server, 'p99Ms'))) {
      total += 1;
      if (g.met) met += 1;
      say(`  ${p.padEnd(9)} ${g.what.padEnd(45)} ${g.value.toFixed(2).padStart(6)}  ${g.met ? 'met' : 'NOT met'}`);
    }
  }
  say(`  ${met} of ${total} met`);
  say('');
  say(`IMDS calls: ${imdsCalls} for ${daemonStarts} daemon starts${imdsCalls === daemonStarts ? ': one miss each, every benchmarked request a cache hit' : ': MORE than one per daemon, so some benchmarked requests missed the cache'}`);
  say(`load average at end ${loadavg().map((l) => l.toFixed(2)).join(' ')}`);
}

function kubeletPods(paths: PathName[], podIp: string | undefined): DemoPod[] {
  const labels = { aadpodidbinding: 'bench' };
  const pods: DemoPod[] = [];
  if (paths.includes('loopback')) pods.push({ name: 'bench-loopback', namespace: 'default', ip: '127.0.0.1', labels });
  if (podIp) pods.push({ name: 'bench-pod', namespace: 'default', ip: podIp, labels, uid: POD_UID });
  return pods;
}

function compileConstant(dir: string): string {
  const bin = path.join(dir, 'constant');
  execFileSync('cc', ['-O2', '-o', bin, constantC], { stdio: ['ignore', 'ignore', 'inherit'] });
  return bin;
}

/** Measures, printing each trial; the caller prints the summary (printThroughput). */
export async function runThroughput(params: ThroughputParams, runtime: Runtime): Promise<ThroughputResult> {
  // cpus(), not availableParallelism(): after a first run (--runtimes) this process is pinned to one cpu.
  if (cpus().length < 2) throw new Error('needs 2 cores: the server and wrk are pinned to different ones');
  // The server's core is the server's alone: this process hosts the stand-ins a
  // daemon polls (the kubelet's pod list), and perf sched showed it taking the
  // server's core for milliseconds at a time while unpinned.
  execFileSync('taskset', ['-a', '-p', '-c', String(LOAD_CPU), String(process.pid)], { stdio: 'ignore' });
  const tmp = mkdtempSync(path.join(tmpdir(), 'nmi-bench-'));
  const standins: Standin[] = [];
  const pod = params.paths.some(fromPod);
  const cgroups = params.paths.includes('ebpf') ? createPodCgroups() : undefined;
  try {
    const podIp = pod ? setUpNamespaces() : undefined;
    // The daemon reads every file of its --bindings folder: the answer files live beside it, not in it.
    const bindingsDir = path.join(tmp, 'bindings');
    mkdirSync(bindingsDir);
    writeFileSync(path.join(bindingsDir, 'bindings.yaml'), bindingsYaml([{ name: 'bench-identity', clientId: CLIENT_ID }], 'bench'));
    const kubelet = await startKubelet(kubeletPods(params.paths, podIp));
    standins.push(kubelet);
    const imds = await startImds();
    standins.push(imds);
    const s: Setup = {
      params, runtime, bindingsDir, kubelet, imds,
      reference: new Reference(tmp),
      constantBin: params.servers.includes('c') ? compileConstant(tmp) : '',
      rules: {
        pod: params.paths.includes('pod') ? await redirectRule('iptables') : undefined,
        ebpf: cgroups ? await redirectRule('ebpf', cgroups.tree.root) : undefined,
      },
      cgroups,
    };

    say('nmi bench: token requests answered from the cache, beside constant servers answering the same bytes');
    say(`  node ${runtime.version}; ${execFileSync('cc', ['--version'], { encoding: 'utf8' }).split('\n')[0]} (-O2)`);
    const mode = params.churn ? "-H 'Connection: close' (a new connection for every request)" : '(keep-alive)';
    say(`  wrk -t1 -c${params.connections} -d${params.durationS}s --latency -H 'Metadata: true' ${mode}, after an unmeasured ${params.warmupS}s run`);
    say(`  servers: ${params.servers.join(', ')}; paths: ${params.paths.join(', ')}; ${params.trials} trials each, interleaved, a fresh process each`);
    if (params.paths.includes('pod')) say(`  pod path: wrk in namespace ${POD_NS} (${podIp}) → ${METADATA_IP}:80 → DNAT (iptables, chain aad-metadata) → ${NODE_IP}:${NMI_PORT} in ${NODE_NS}`);
    if (cgroups) say(`  ebpf path: wrk in namespace ${POD_NS} and cgroup ${cgroups.container} → ${METADATA_IP}:80 → connect rewritten by cgroup/connect4 at ${cgroups.tree.root} (no iptables rule, no NAT) → ${NODE_IP}:${NMI_PORT}; nmi attests each connection by cgroup`);
    say(`  server pinned to cpu ${SERVER_CPU}; wrk, and this process with its stand-ins, to cpu ${LOAD_CPU}; load average at start ${loadavg().map((l) => l.toFixed(2)).join(' ')}`);
    if (params.cpuProfDir) say(`  profiling the node processes into ${params.cpuProfDir} (rates are lower while profiling)`);
    say(`  GET ${TARGET}`);

    const all: Measured[] = [];
    let daemons = 0;
    for (let n = 1; n <= params.trials; n++) {
      for (const p of params.paths) {
        for (const server of params.servers) {
          const m = await trial(s, server, p, n);
          if (nmiServerOf(server)) daemons += 1;
          all.push(m);
          say(`  ${line(m).trim()}`);
          if (n === 1 && all.length === 1) {
            const a = parseAnswer(s.reference.answer!);
            say(`  answer: ${a.status}, ${s.reference.answer!.length} bytes (body ${a.body.length}), headers ${a.headers.map(([k]) => k).join(', ')}`);
          }
        }
      }
    }
    return { all, imdsCalls: imds.calls, daemonStarts: daemons };
  } finally {
    await stopChildren();
    standins.forEach((x) => x.close());
    if (pod) removeNamespaces();
    cgroups?.tree.remove();
    rmSync(tmp, { recursive: true, force: true });
  }
}
