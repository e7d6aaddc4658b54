// What both bench modes share: output, child processes that are always stopped,
// the nmi daemon under test, its bindings and its memory.
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { readdirSync, readFileSync, readlinkSync, realpathSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import type { Standin } from '../src/demo/standins.js';
import { nmiBin } from '../test/harness/netns.js';
import { startNmi as startNmiProcess } from '../test/harness/nmi-process.js';

/** The server under load gets one core, wrk the other. */
export const SERVER_CPU = 0;
export const LOAD_CPU = 1;

export type NmiServer = 'native' | 'js';

export function say(text: string): void {
  process.stdout.write(`${text}\n`);
}

/** A flag that must be a positive integer, or exit 2 naming it; and root, which the node benches need (unless `root` is false). */
export function positiveFlags<K extends string>(bench: string, values: Record<K, string | undefined>, names: readonly K[], root = true): Record<K, number> {
  const out = {} as Record<K, number>;
  for (const name of names) {
    const n = Number(values[name]);
    if (!Number.isInteger(n) || n < 1) {
      process.stderr.write(`bench/${bench}: --${name} must be a positive integer\n`);
      process.exit(2);
    }
    out[name] = n;
  }
  if (root && process.getuid?.() !== 0) {
    process.stderr.write(`bench/${bench}: needs root (network namespaces, iptables)\n`);
    process.exit(2);
  }
  return out;
}

/** Children to stop if the bench fails or is interrupted. */
export const running = new Set<() => Promise<void>>();
/** Ctrl-C or SIGTERM: kills wrk, and nothing further starts. */
export const interrupt = new AbortController();

export async function stopChildren(): Promise<void> {
  await Promise.all([...running].map((stop) => stop()));
}

/**
 * A port free now, below the kernel's ephemeral range (32768-60999 by default): a port
 * picked by listen(0) comes from that range, where the bench's own client connections
 * (wrk's 64, the stand-ins') may take it before the server listens (EADDRINUSE).
 */
export async function freePort(): Promise<number> {
  for (;;) {
    const port = 20_000 + Math.floor(Math.random() * 12_000);
    const free = await new Promise<boolean>((resolve) => {
      const probe = net.createServer().once('error', () => resolve(false));
      probe.listen(port, '127.0.0.1', () => probe.close(() => resolve(true)));
    });
    if (free) return port;
  }
}

export interface Child {
  process: ChildProcess;
  output(): string;
  /** SIGTERM (a --cpu-prof profile gets written), SIGKILL after 20 s. */
  stop(): Promise<void>;
}

/** A child, pinned to the server cpu when `pin`; taskset execs it, so the pid is the program's own. */
export function spawnChild(command: string[], pin: boolean): Child {
  const env = { ...process.env };
  delete env.NOTIFY_SOCKET;
  const argv = pin ? ['taskset', '-c', String(SERVER_CPU), ...command] : command;
  const child = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'], env });
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
  return { process: child, output: () => output, stop };
}

function getText(url: string): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    http
      .get(url, { agent: false, timeout: 10_000 }, (res) => {
        let text = '';
        res.on('data', (d: Buffer) => (text += d.toString()));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, text }));
      })
      .on('timeout', function (this: http.ClientRequest) {
        this.destroy(new Error(`GET ${url}: no answer in 10s`));
      })
      .on('error', reject);
  });
}

/** A node binary nmi runs on: the path spawned, the executable its process runs (`/proc/<pid>/exe`), `--version`. */
export interface Runtime {
  path: string;
  exe: string;
  version: string;
}

/** The node running the bench: what every mode but --runtimes runs nmi on. */
export const benchRuntime: Runtime = { path: process.execPath, exe: realpathSync(process.execPath), version: process.version };

export interface NmiOptions {
  runtime: Runtime;
  server: NmiServer;
  nodeIp: string;
  port: number;
  rules: 'none' | 'iptables' | 'ebpf';
  /** --bindings: a folder, or `kubernetes` (with --kubeconfig in `extraArgs`). */
  bindings: string;
  extraArgs?: string[];
  kubelet: Standin;
  imds: Standin;
  pin: boolean;
  cpuProfDir?: string;
  /** The launcher to run [this checkout's bin/nmi.js]: another build's (bench/apiserver.ts's baseline). */
  script?: string;
}

export interface Daemon {
  pid: number;
  /** From the spawn to /readyz's first 200, ±10 ms (the poll). */
  readyMs: number;
  /** Scrapes /metrics. */
  metrics(): Promise<string>;
  stop(): Promise<void>;
}

/**
 * A fresh `nmi run`, once /readyz answers 200 (pods and bindings synced, rules installed), started as the
 * tests start it (test/harness/nmi-process.ts), pinned to the server cpu when `pin`.
 */
export async function startNmi(o: NmiOptions): Promise<Daemon> {
  const probe = `127.0.0.1:${await freePort()}`;
  const profile = o.cpuProfDir ? ['--cpu-prof', `--cpu-prof-dir=${o.cpuProfDir}`] : [];
  const env = { ...process.env };
  delete env.NOTIFY_SOCKET;
  const spawned = performance.now();
  const proc = await startNmiProcess(
    ['--server', o.server, '--node-ip', o.nodeIp, '--port', String(o.port), '--rules', o.rules, '--bindings', o.bindings,
      '--kubelet-url', o.kubelet.url, '--upstream-imds', o.imds.url, '--log-level', 'warn', ...(o.extraArgs ?? [])],
    // taskset execs nmi: the pid is still the program's own.
    { probe, env, prefix: o.pin ? ['taskset', '-c', String(SERVER_CPU)] : [], command: [o.runtime.path, ...profile, o.script ?? nmiBin], waitReady: false },
  );
  // SIGTERM (a --cpu-prof profile gets written), SIGKILL after 20 s; Ctrl-C stops it while it starts, too.
  const stop = async () => {
    const killer = setTimeout(() => proc.child.kill('SIGKILL'), 20_000);
    await proc.stop();
    clearTimeout(killer);
  };
  running.add(stop);
  proc.child.once('exit', () => running.delete(stop));
  // Polled every 10 ms: readyMs is the startup the runtimes mode compares.
  await proc.whenReady(30_000, 10).catch(async (err: unknown) => {
    await stop();
    throw err;
  });
  const readyMs = performance.now() - spawned;
  const pid = proc.child.pid!;
  // nmi re-executes itself (src/lifecycle/node-flags.ts) through its execPath: what answers must still be the runtime asked for.
  const exe = readlinkSync(`/proc/${pid}/exe`);
  if (exe !== o.runtime.exe) {
    await stop();
    throw new Error(`nmi run started with ${o.runtime.path} runs ${exe}, not ${o.runtime.exe}`);
  }
  return {
    pid,
    readyMs,
    metrics: async () => (await getText(`http://${probe}/metrics`)).text,
    stop,
  };
}

/** Requests the native server answered in C++ and deferred to JS, from its /metrics. */
export function nativeCounts(metrics: string): { hit: number; js: number } {
  const count = (result: string) => Number(new RegExp(`^nmi_native_requests_total\\{result="${result}"\\} (\\d+)`, 'm').exec(metrics)?.[1] ?? 0);
  return { hit: count('hit'), js: count('js') };
}

export interface Memory {
  rssKiB: number;
  /** The part of the RSS that is file pages (mostly node's own binary) and the anonymous rest (heaps). */
  fileKiB: number;
  anonKiB: number;
  /** Peak RSS. */
  hwmKiB: number;
}

export function memory(pid: number): Memory {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kib = (field: string) => {
    const v = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(status)?.[1];
    if (v === undefined) throw new Error(`no ${field} for pid ${pid}`);
    return Number(v);
  };
  return { rssKiB: kib('VmRSS'), fileKiB: kib('RssFile'), anonKiB: kib('RssAnon'), hwmKiB: kib('VmHWM') };
}

/** CPU time the process's live threads have had, in µs (schedstat: ns, unlike /proc/pid/stat's 10 ms ticks). */
export function cpuUs(pid: number): number {
  let ns = 0;
  for (const task of readdirSync(`/proc/${pid}/task`)) {
    try {
      ns += Number(readFileSync(`/proc/${pid}/task/${task}/schedstat`, 'utf8').split(' ')[0]);
    } catch {
      // the thread ended meanwhile
    }
  }
  return ns / 1000;
}

/** The median (for an even count, the upper middle one). */
export function middle(values: number[]): number | undefined {
  return [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)];
}

export function mib(kib: number): string {
  return `${(kib / 1024).toFixed(1)}MiB`;
}

export interface BenchIdentity {
  name: string;
  clientId: string;
}

/** AzureIdentities, each bound to `selector` by its own AzureIdentityBinding, as Kubernetes objects. */
export function bindingObjects(identities: BenchIdentity[], selector: string): Array<{ apiVersion: string; kind: string; metadata: { name: string; namespace: string }; spec: Record<string, unknown> }> {
  const apiVersion = 'aadpodidentity.k8s.io/v1';
  const metadata = (name: string) => ({ name, namespace: 'default' });
  return identities.flatMap((i) => [
    {
      apiVersion, kind: 'AzureIdentity', metadata: metadata(i.name),
      spec: { type: 0, clientID: i.clientId, resourceID: `/subscriptions/bench/resourcegroups/bench/providers/Microsoft.ManagedIdentity/userAssignedIdentities/${i.name}` },
    },
    { apiVersion, kind: 'AzureIdentityBinding', metadata: metadata(`${i.name}-binding`), spec: { azureIdentity: i.name, selector } },
  ]);
}

/** The same, as a --bindings file (JSON documents are YAML documents). */
export function bindingsYaml(identities: BenchIdentity[], selector: string): string {
  return bindingObjects(identities, selector).map((o) => JSON.stringify(o)).join('\n---\n');
}

export function row(cells: Array<string | number>, widths: number[]): string {
  return cells.map((c, i) => (i === 0 ? String(c).padEnd(widths[i]!) : String(c).padStart(widths[i]!))).join('  ');
}
