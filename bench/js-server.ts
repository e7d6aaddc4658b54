// Benchmark: nmi's js token server answering cache hits, beside a plain
// node:http server answering the same bytes (bench/constant-server.ts), in one
// run. Each trial is a fresh server process pinned to one core, loaded by wrk
// pinned to the other; a short wrk run warms each process before the measured
// one; the two servers' trials alternate (A B A B ...) so drift hits both.
//
//   npx tsc -p . && node dist/bench/js-server.js [--trials 3] [--duration 10] [--warmup 3] [--connections 64] [--cpu-prof DIR]
//
// The stand-in kubelet and IMDS run in this process: during cache hits they do no work.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import net, { type AddressInfo } from 'node:net';
import { availableParallelism, loadavg, tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { parseArgs, promisify } from 'node:util';
import { startImds, startKubelet, type Standin } from '../src/demo/standins.js';
import type { FixedAnswer } from './constant-server.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const nmiBin = path.resolve(here, '../../bin/nmi.js');
const constantServer = path.join(here, 'constant-server.js');
const run = promisify(execFile);

/** The server under load gets one core, wrk the other. */
const SERVER_CPU = 0;
const LOAD_CPU = 1;
const CLIENT_ID = '00000000-0000-0000-0000-0000000be4c0';
const RESOURCE = 'https://management.azure.com/';
const TARGET = `/metadata/identity/oauth2/token?api-version=2018-02-01&resource=${encodeURIComponent(RESOURCE)}`;
/** node:http writes these itself, for both servers alike. */
const NODE_HEADERS = new Set(['date', 'connection', 'keep-alive', 'transfer-encoding']);

const bindings = `apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentity
metadata: { name: bench-identity, namespace: default }
spec: { type: 0, clientID: ${CLIENT_ID}, resourceID: /subscriptions/bench/resourcegroups/bench/providers/Microsoft.ManagedIdentity/userAssignedIdentities/bench }
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentityBinding
metadata: { name: bench-binding, namespace: default }
spec: { azureIdentity: bench-identity, selector: bench }
`;

interface Params {
  connections: number;
  durationS: number;
  warmupS: number;
  trials: number;
  cpuProfDir?: string;
}

type ServerName = 'js' | 'constant';

interface Measured {
  server: ServerName;
  trial: number;
  rps: number;
  p50Ms: number;
  p99Ms: number;
  rssKiB: number;
  socketErrors?: string;
}

interface Started {
  url: string;
  pid: number;
  stop(): Promise<void>;
}

interface Reply {
  status: number;
  rawHeaders: string[];
  body: Buffer;
}

function parseParams(argv: string[]): Params {
  const { values } = parseArgs({
    args: argv,
    options: {
      connections: { type: 'string', default: '64' },
      duration: { type: 'string', default: '10' },
      warmup: { type: 'string', default: '3' },
      trials: { type: 'string', default: '3' },
      'cpu-prof': { type: 'string' },
    },
  });
  const count = (name: string, text: string): number => {
    const n = Number(text);
    if (!Number.isInteger(n) || n < 1) throw new Error(`--${name}: a whole number ≥ 1, got ${JSON.stringify(text)}`);
    return n;
  };
  return {
    connections: count('connections', values.connections),
    durationS: count('duration', values.duration),
    warmupS: count('warmup', values.warmup),
    trials: count('trials', values.trials),
    cpuProfDir: values['cpu-prof'] === undefined ? undefined : path.resolve(values['cpu-prof']),
  };
}

function say(text: string): void {
  process.stdout.write(`${text}\n`);
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const probe = net.createServer().once('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address() as AddressInfo;
      probe.close(() => resolve(port));
    });
  });
}

/** node:http rather than undici: the answer's raw headers, in wire order, are what the baseline copies. */
function get(url: string, headers: Record<string, string> = {}): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const req = http.get(url, { headers, agent: false, timeout: 10_000 }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, rawHeaders: res.rawHeaders, body: Buffer.concat(chunks) }));
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`GET ${url}: no answer in 10s`)));
    req.on('error', reject);
  });
}

/** The headers the server itself chose, in order. */
function ownHeaders(rawHeaders: string[]): Array<[string, string]> {
  const pairs: Array<[string, string]> = [];
  for (let i = 0; i + 1 < rawHeaders.length; i += 2) {
    const name = rawHeaders[i]!;
    if (!NODE_HEADERS.has(name.toLowerCase())) pairs.push([name, rawHeaders[i + 1]!]);
  }
  return pairs;
}

/** Children to stop if the bench itself fails or is interrupted. */
const running = new Set<() => Promise<void>>();
/** Ctrl-C or SIGTERM: kills wrk, and no further trial starts. */
const interrupt = new AbortController();

/** A pinned child that is stopped with SIGTERM (so a --cpu-prof profile gets written). */
function spawnPinned(args: string[], params: Params): { child: ChildProcess; output: () => string; stop: () => Promise<void> } {
  const nodeFlags = params.cpuProfDir ? ['--cpu-prof', `--cpu-prof-dir=${params.cpuProfDir}`] : [];
  const env = { ...process.env };
  delete env.NOTIFY_SOCKET;
  const child = spawn('taskset', ['-c', String(SERVER_CPU), process.execPath, ...nodeFlags, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env });
  let output = '';
  child.stdout!.on('data', (d: Buffer) => (output += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (output += d.toString()));
  const stop = async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    const exited = once(child, 'exit');
    child.kill('SIGTERM');
    const killer = setTimeout(() => child.kill('SIGKILL'), 20_000);
    await exited;
    clearTimeout(killer);
  };
  running.add(stop);
  child.once('exit', () => running.delete(stop));
  return { child, output: () => output, stop };
}

async function startNmi(params: Params, dir: string, kubelet: Standin, imds: Standin): Promise<Started> {
  const port = await freePort();
  const probe = await freePort();
  // taskset execs node, so the child's pid is the daemon's.
  const { child, output, stop } = spawnPinned(
    [nmiBin, 'run', '--node-ip', '127.0.0.1', '--port', String(port), '--rules', 'none', '--server', 'js',
      '--probe-address', `127.0.0.1:${probe}`, '--bindings', dir, '--kubelet-url', kubelet.url,
      '--upstream-imds', imds.url, '--log-level', 'warn'],
    params,
  );
  const deadline = Date.now() + 30_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`nmi run exited ${child.exitCode}:\n${output()}`);
    const ready = await get(`http://127.0.0.1:${probe}/readyz`).then((r) => r.status === 200, () => false);
    if (ready) break;
    if (Date.now() > deadline) {
      await stop();
      throw new Error(`nmi run not ready after 30s:\n${output()}`);
    }
    await sleep(50);
  }
  return { url: `http://127.0.0.1:${port}${TARGET}`, pid: child.pid!, stop };
}

async function startConstant(params: Params, answerFile: string): Promise<Started> {
  const { child, output, stop } = spawnPinned([constantServer, answerFile], params);
  const deadline = Date.now() + 10_000;
  let port: string | undefined;
  while (!(port = /^listening (\d+)$/m.exec(output())?.[1])) {
    if (child.exitCode !== null) throw new Error(`constant server exited ${child.exitCode}:\n${output()}`);
    if (Date.now() > deadline) {
      await stop();
      throw new Error(`constant server did not listen in 10s:\n${output()}`);
    }
    await sleep(20);
  }
  return { url: `http://127.0.0.1:${port}${TARGET}`, pid: child.pid!, stop };
}

/** The one cache miss of a fresh daemon; every request after it is a cache hit. */
async function warmCache(url: string): Promise<Reply> {
  const reply = await get(url, { Metadata: 'true' });
  if (reply.status !== 200) throw new Error(`warm-up request: nmi answered ${reply.status}: ${reply.body.toString()}`);
  return reply;
}

/** The baseline must answer byte for byte what nmi answered, Date aside. */
async function checkSameAnswer(url: string, expected: FixedAnswer): Promise<void> {
  const reply = await get(url, { Metadata: 'true' });
  const same =
    reply.status === expected.status &&
    JSON.stringify(ownHeaders(reply.rawHeaders)) === JSON.stringify(expected.headers) &&
    reply.body.equals(Buffer.from(expected.body, 'base64'));
  if (!same) throw new Error('the constant server does not answer what nmi answered');
}

function toMs(value: string, unit: string): number {
  const n = Number(value);
  return unit === 'us' ? n / 1000 : unit === 's' ? n * 1000 : n;
}

interface WrkResult {
  rps: number;
  p50Ms: number;
  p99Ms: number;
  socketErrors?: string;
}

function parseWrk(text: string): WrkResult {
  const rps = /^Requests\/sec:\s+([\d.]+)/m.exec(text);
  const p50 = /^\s+50%\s+([\d.]+)(us|ms|s)\b/m.exec(text);
  const p99 = /^\s+99%\s+([\d.]+)(us|ms|s)\b/m.exec(text);
  if (!rps || !p50 || !p99) throw new Error(`unexpected wrk output:\n${text}`);
  const non2xx = /Non-2xx or 3xx responses: (\d+)/.exec(text);
  if (non2xx) throw new Error(`wrk saw ${non2xx[1]} answers other than 2xx/3xx: not a cache-hit benchmark\n${text}`);
  const errors = /Socket errors: (.*)/.exec(text)?.[1];
  return { rps: Number(rps[1]), p50Ms: toMs(p50[1]!, p50[2]!), p99Ms: toMs(p99[1]!, p99[2]!), socketErrors: errors };
}

async function wrk(url: string, params: Params, seconds: number): Promise<WrkResult> {
  const { stdout } = await run('taskset', [
    '-c', String(LOAD_CPU), 'wrk', '-t1', `-c${params.connections}`, `-d${seconds}s`, '--latency', '-H', 'Metadata: true', url,
  ], { signal: interrupt.signal });
  return parseWrk(stdout);
}

function rssKiB(pid: number): number {
  const kb = /^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1];
  if (kb === undefined) throw new Error(`no VmRSS for pid ${pid}`);
  return Number(kb);
}

async function trial(server: ServerName, n: number, start: () => Promise<Started>, params: Params): Promise<Measured> {
  const started = await start();
  try {
    await wrk(started.url, params, params.warmupS);
    const result = await wrk(started.url, params, params.durationS);
    return { server, trial: n, ...result, rssKiB: rssKiB(started.pid) };
  } finally {
    await started.stop();
  }
}

/** The trial with the median rate (for an even count, the upper middle one). */
function median(results: Measured[]): Measured {
  const sorted = [...results].sort((a, b) => a.rps - b.rps);
  return sorted[Math.floor(sorted.length / 2)]!;
}

function row(cells: Array<string | number>, widths: number[]): string {
  return cells.map((c, i) => (i === 0 ? String(c).padEnd(widths[i]!) : String(c).padStart(widths[i]!))).join('  ');
}

function printResults(all: Measured[]): void {
  const widths = [9, 6, 10, 9, 9, 10];
  const ms = (v: number) => `${v.toFixed(2)}ms`;
  const mib = (kib: number) => `${(kib / 1024).toFixed(1)}MiB`;
  say('');
  say(row(['server', 'trial', 'req/s', 'p50', 'p99', 'RSS after'], widths));
  for (const m of all) {
    say(row([m.server, m.trial, m.rps.toFixed(0), ms(m.p50Ms), ms(m.p99Ms), mib(m.rssKiB)], widths) + (m.socketErrors ? `  socket errors: ${m.socketErrors}` : ''));
  }
  const js = median(all.filter((m) => m.server === 'js'));
  const constant = median(all.filter((m) => m.server === 'constant'));
  say('');
  say('median trial (by req/s):');
  say(row(['server', 'trial', 'req/s', 'p50', 'p99', 'RSS after'], widths));
  for (const m of [js, constant]) say(row([m.server, m.trial, m.rps.toFixed(0), ms(m.p50Ms), ms(m.p99Ms), mib(m.rssKiB)], widths));
  const ratio = js.rps / constant.rps;
  say('');
  say(`ratio js/constant req/s: ${ratio.toFixed(2)} (goal ≥ 0.80: ${ratio >= 0.8 ? 'met' : 'not met'})`);
}

async function bench(params: Params): Promise<void> {
  if (availableParallelism() < 2) throw new Error('needs 2 cores: the server and wrk are pinned to different ones');
  const tmp = mkdtempSync(path.join(tmpdir(), 'nmi-bench-'));
  const standins: Standin[] = [];
  try {
    // The daemon reads every file of its --bindings folder: the answer file lives beside it, not in it.
    const bindingsDir = path.join(tmp, 'bindings');
    mkdirSync(bindingsDir);
    writeFileSync(path.join(bindingsDir, 'bindings.yaml'), bindings);
    const kubelet = await startKubelet([{ name: 'bench-pod', namespace: 'default', ip: '127.0.0.1', labels: { aadpodidbinding: 'bench' } }]);
    standins.push(kubelet);
    const imds = await startImds();
    standins.push(imds);
    const answerFile = path.join(tmp, 'answer.json');
    let answer: FixedAnswer | undefined;
    const nmi = async () => {
      const started = await startNmi(params, bindingsDir, kubelet, imds);
      const reply = await warmCache(started.url).catch(async (err: unknown) => {
        await started.stop();
        throw err;
      });
      if (!answer) {
        answer = { status: reply.status, headers: ownHeaders(reply.rawHeaders), body: reply.body.toString('base64') };
        writeFileSync(answerFile, JSON.stringify(answer));
      }
      return started;
    };
    const constant = async () => {
      const started = await startConstant(params, answerFile);
      await checkSameAnswer(started.url, answer!).catch(async (err: unknown) => {
        await started.stop();
        throw err;
      });
      return started;
    };

    say('nmi bench: the js token server on cache hits beside a constant node:http server');
    say(`  node ${process.version}, wrk -t1 -c${params.connections} -d${params.durationS}s --latency -H 'Metadata: true' (keep-alive)`);
    say(`  each trial a fresh server process, warmed by a ${params.warmupS}s wrk run first; ${params.trials} trials per server, interleaved js, constant, js, ...`);
    say(`  server pinned to cpu ${SERVER_CPU}, wrk to cpu ${LOAD_CPU}; load average at start ${loadavg().map((l) => l.toFixed(2)).join(' ')}`);
    if (params.cpuProfDir) say(`  profiling both servers into ${params.cpuProfDir} (rates are lower while profiling)`);
    say(`  GET ${TARGET}`);

    const all: Measured[] = [];
    for (let n = 1; n <= params.trials; n++) {
      interrupt.signal.throwIfAborted();
      all.push(await trial('js', n, nmi, params));
      if (n === 1) {
        const a = answer!;
        say(`  answer ${a.status}, body ${Buffer.from(a.body, 'base64').length} bytes, headers ${a.headers.map(([k]) => k).join(', ')} (+ node's Date, Connection, Keep-Alive)`);
      }
      all.push(await trial('constant', n, constant, params));
    }
    printResults(all);
    say(`IMDS calls: ${imds.calls} for ${params.trials} daemon starts${imds.calls === params.trials ? ': one miss each, every benchmarked request a cache hit' : ': MORE than one per daemon, so some benchmarked requests missed the cache'}`);
    say(`load average at end ${loadavg().map((l) => l.toFixed(2)).join(' ')}`);
  } finally {
    await Promise.all([...running].map((stop) => stop()));
    standins.forEach((s) => s.close());
    rmSync(tmp, { recursive: true, force: true });
  }
}

async function main(argv: string[]): Promise<number> {
  const stopAll = () => {
    say('interrupted: stopping the servers');
    interrupt.abort();
    for (const stop of running) void stop();
  };
  process.once('SIGINT', stopAll).once('SIGTERM', stopAll);
  try {
    await bench(parseParams(argv));
    return 0;
  } catch (err) {
    if (interrupt.signal.aborted) return 130;
    process.stderr.write(`nmi bench: ${(err as Error).message}\n`);
    return 1;
  } finally {
    process.off('SIGINT', stopAll).off('SIGTERM', stopAll);
  }
}

process.exitCode = await main(process.argv.slice(2));
