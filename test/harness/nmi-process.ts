// Spawns `nmi <command>` (in the caller's current namespace, normally the test's
// node namespace) and waits for readiness on its probe address. The tests' and the
// bench's one way to start the daemon.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { request } from 'undici';
import { readMetric } from '../../src/metrics/read.js';
import { nmiBin } from './netns.js';
import { waitFor } from './wait-for.js';

export interface NmiProcess {
  child: ChildProcess;
  probe: string;
  output(): string;
  /** Sends a signal and waits for exit; returns the exit code (or 128+n for a signal). */
  stop(signal?: NodeJS.Signals): Promise<number>;
  /** Resolves once its own /readyz answers 200 (what startNmi waits for unless waitReady is false); fails if it exits first. */
  whenReady(timeoutMs?: number, pollMs?: number): Promise<void>;
  metric(name: string): Promise<number | undefined>;
}

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs an nmi command to completion; prefix is a command to run it under (e.g. nsenter into a mount namespace). */
export function nmi(args: string[], env: NodeJS.ProcessEnv = process.env, prefix: string[] = []): CliResult {
  const [file, ...rest] = [...prefix, process.execPath, nmiBin, ...args] as [string, ...string[]];
  const r = spawnSync(file, rest, { encoding: 'utf8', env, timeout: 60_000 });
  return { code: r.status ?? 128, stdout: r.stdout, stderr: r.stderr };
}

/** nmi(), without blocking this process: for commands that wait on stand-ins this process serves (nmi explain → daemon → kubelet). */
export async function nmiAsync(args: string[], env: NodeJS.ProcessEnv = process.env): Promise<CliResult> {
  const child = spawn(process.execPath, [nmiBin, ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const [code, signal] = (await once(child, 'exit')) as [number | null, NodeJS.Signals | null];
  return { code: code ?? 128 + (signal ? 15 : 0), stdout, stderr };
}

// A test that fails before stopping its daemon must not hang the file or leave it running.
const children = new Set<ChildProcess>();
process.on('exit', () => children.forEach((child) => child.kill('SIGKILL')));

export interface StartOptions {
  env?: NodeJS.ProcessEnv;
  probe?: string;
  waitReady?: boolean;
  prefix?: string[];
  /**
   * The runtime, its flags if any, and the script that are nmi: this checkout's on this test's runtime unless
   * given (the arm64 package's under qemu; the bench's runtimes, with --cpu-prof).
   */
  command?: readonly string[];
  /** How long it may take to get ready (an emulated runtime is slow). */
  readyTimeoutMs?: number;
  /** Listening sockets handed over as systemd does (fds from 3, LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID), by name. */
  listenFds?: { name: string; fd: number }[];
}

export async function startNmi(args: string[], options: StartOptions = {}): Promise<NmiProcess> {
  const probe = options.probe ?? '127.0.0.1:8085';
  const fds = options.listenFds ?? [];
  // LISTEN_PID must be nmi's own pid: the shell exports its $$, then becomes nmi with exec.
  const handOver = fds.length > 0 ? ['sh', '-c', 'export LISTEN_PID=$$; exec "$@"', 'sh'] : [];
  const [file, ...rest] = [...handOver, ...(options.prefix ?? []), ...(options.command ?? [process.execPath, nmiBin]), 'run', '--probe-address', probe, ...args] as [string, ...string[]];
  const env = options.env ?? process.env;
  const child = spawn(file, rest, {
    env: fds.length > 0 ? { ...env, LISTEN_FDS: String(fds.length), LISTEN_FDNAMES: fds.map((f) => f.name).join(':') } : env,
    stdio: ['ignore', 'pipe', 'pipe', ...fds.map((f) => f.fd)],
  });
  children.add(child);
  child.on('exit', () => children.delete(child));
  child.unref();
  (child.stdout as unknown as { unref(): void }).unref();
  (child.stderr as unknown as { unref(): void }).unref();
  let output = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (output += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (output += d));
  const get = async (path: string) => {
    try {
      const res = await request(`http://${probe}${path}`, { headersTimeout: 1000, bodyTimeout: 1000 });
      return { status: res.statusCode, body: await res.body.text(), pid: Number(res.headers['x-nmi-pid']) };
    } catch {
      return undefined;
    }
  };
  const proc: NmiProcess = {
    child,
    probe,
    output: () => output,
    async stop(signal = 'SIGTERM') {
      if (child.exitCode !== null || child.signalCode !== null) return child.exitCode ?? 128;
      child.kill(signal);
      const [code, sig] = (await once(child, 'exit')) as [number | null, NodeJS.Signals | null];
      return code ?? (sig ? 128 : 1);
    },
    async metric(name) {
      const res = await get('/metrics');
      return res && readMetric(res.body, name);
    },
    async whenReady(timeoutMs, pollMs) {
      await waitFor(() => `nmi ready on ${probe}\n${output}`, async () => {
        if (child.exitCode !== null || child.signalCode !== null) throw new Error(`nmi exited ${child.exitCode ?? child.signalCode}: ${output}`);
        // Its own 200: during a handoff the probe address answers for whichever nmi holds it.
        const res = await get('/readyz');
        return res?.status === 200 && res.pid === child.pid ? true : undefined;
      }, timeoutMs, pollMs);
    },
  };
  if (options.waitReady !== false) await proc.whenReady(options.readyTimeoutMs);
  return proc;
}
