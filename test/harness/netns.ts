// Throwaway "node" and "pod" network namespaces joined by veth pairs. The test
// process moves its main thread into the node namespace (setns through the
// addon), so stand-ins it serves and the nmi it spawns live there; pod clients
// run as child processes in their pod namespace. Names carry the pid, so test
// files run in parallel; everything is removed in after() and at exit.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { createNodeNamespace, createPodNamespace, deleteNamespace, enterNamespace, NODE_IP, nsExec } from '../../src/netns/netns.js';

export { NODE_IP, nsExec };
export const projectRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
export const nmiBin = path.join(projectRoot, 'bin', 'nmi.js');

/** iptables-save's text without what changes between two saves of the same rules: its dated comments and the packet counters. */
export function comparableRules(saved: string): string {
  return saved
    .split('\n')
    .filter((l) => !l.startsWith('#'))
    .map((l) => l.replace(/\[\d+:\d+\]/g, '[0:0]'))
    .join('\n');
}

let counter = 0;
const created: string[] = [];

/**
 * Runs an ES module script with this node in the pod's namespace, from the project root (so it imports the
 * project's packages, msal-node among them), with `env` over this process's environment; its stdout.
 * Asynchronous: the stand-ins nmi asks meanwhile are served by this process, which a synchronous call would block.
 */
export async function nodeScriptInPod(pod: Pick<PodNs, 'name'>, script: string, env: NodeJS.ProcessEnv = {}): Promise<string> {
  const args = ['netns', 'exec', pod.name, process.execPath, '--input-type=module', '-e', script];
  const { stdout } = await promisify(execFile)('ip', args, { cwd: projectRoot, encoding: 'utf8', env: { ...process.env, ...env } });
  return stdout;
}

export interface PodNs {
  name: string;
  ip: string;
  /** A long-lived client in the pod namespace, driven by JSON lines. */
  agent(): Promise<PodAgent>;
  exec(cmd: string, args: string[]): string;
}

export interface NodeNs {
  name: string;
  nodeIp: string;
  pods: PodNs[];
  addPod(): PodNs;
  exec(cmd: string, args: string[], input?: string): string;
  destroy(): void;
}

const agents = new Set<ChildProcess>();
process.on('exit', () => {
  agents.forEach((child) => child.kill('SIGKILL'));
  created.forEach(deleteNamespace);
});

/** Creates a node namespace with an "eth0" holding NODE_IP and a default route, and enters it. */
export function createNode(): NodeNs {
  const base = `nmi-t${process.pid}-${counter++}`;
  const nodeName = `${base}-n`;
  created.push(nodeName);
  createNodeNamespace(nodeName);
  enterNamespace(nodeName);
  const pods: PodNs[] = [];
  return {
    name: nodeName,
    nodeIp: NODE_IP,
    pods,
    exec: (cmd, args, input) => nsExec(nodeName, cmd, args, input),
    addPod() {
      const podName = `${base}-p${pods.length + 1}`;
      created.push(podName);
      const podIp = createPodNamespace(nodeName, podName, pods.length + 1);
      const pod: PodNs = { name: podName, ip: podIp, exec: (cmd, args) => nsExec(podName, cmd, args), agent: () => startPodAgent(podName) };
      pods.push(pod);
      return pod;
    },
    destroy() {
      for (const name of [...pods.map((p) => p.name), nodeName]) deleteNamespace(name);
    },
  };
}

export interface HttpResult {
  status: number;
  headers: Record<string, string>;
  body: string;
  error?: string;
  /** From sending the request to the end of the answer, in the pod. */
  ms?: number;
}

export interface ManyResult {
  /** By status, or `error:CODE`. */
  counts: Record<string, number>;
  /** The first answer of each status. */
  samples: Record<string, HttpResult>;
}

export interface SteadyResult {
  counts: Record<string, number>;
  /** The longest single request. */
  longestMs: number;
  /** The longest stretch between two successful answers. */
  longestGapMs: number;
}

export interface PodAgent {
  http(url: string, init?: { method?: string; headers?: Record<string, string> }): Promise<HttpResult>;
  /** n concurrent GETs; counts of `<status> <body prefix>`. */
  /** n requests at once, each on a connection of its own, or over `connections` kept alive (nmi caps a pod's connections). */
  burst(url: string, n: number, headers?: Record<string, string>, connections?: number): Promise<Record<string, number>>;
  /** GETs every URL once, `concurrency` at a time; with durationMs, round and round until it is over. */
  many(urls: string[], concurrency: number, headers?: Record<string, string>, durationMs?: number): Promise<ManyResult>;
  /** GETs one at a time on new connections, intervalMs apart, for durationMs: counts by status (or `error:CODE`), and the longest one. */
  steady(url: string, o: { durationMs: number; intervalMs: number; headers?: Record<string, string> }): Promise<SteadyResult>;
  /** Opens a TCP connection and returns the first line the server sends, or the error code. */
  connect(host: string, port: number, timeoutMs?: number): Promise<{ line?: string; error?: string }>;
  /** Connects repeatedly for durationMs; counts first lines (or errors) seen. */
  connectLoop(host: string, port: number, durationMs: number): Promise<Record<string, number>>;
  /** Opens a connection and keeps it; returns an id for later `send`. */
  hold(host: string, port: number): Promise<{ id: number; line?: string; error?: string }>;
  /** Writes a line on a held connection; returns the next line from the server, or the error. */
  send(id: number, text: string, timeoutMs?: number): Promise<{ line?: string; error?: string }>;
  close(): Promise<void>;
}

async function startPodAgent(ns: string): Promise<PodAgent> {
  const script = path.join(projectRoot, 'dist', 'test', 'harness', 'pod-agent.js');
  const child: ChildProcess = spawn('ip', ['netns', 'exec', ns, process.execPath, script], { stdio: ['pipe', 'pipe', 'inherit'] });
  // A test that fails before close() must not keep its file alive: unref'd, and killed at exit.
  agents.add(child);
  child.on('exit', () => agents.delete(child));
  child.unref();
  const stdout = child.stdout as unknown as { ref(): void; unref(): void };
  (child.stdin as unknown as { unref(): void }).unref();
  stdout.unref();
  const pending = new Map<number, (value: unknown) => void>();
  let next = 0;
  readline.createInterface({ input: child.stdout! }).on('line', (line) => {
    const message = JSON.parse(line) as { id: number; result: unknown };
    pending.get(message.id)?.(message.result);
    pending.delete(message.id);
    if (pending.size === 0) stdout.unref();
  });
  const call = <T>(op: string, args: Record<string, unknown>): Promise<T> =>
    new Promise((resolve) => {
      const id = next++;
      pending.set(id, resolve as (value: unknown) => void);
      stdout.ref(); // an answer is awaited: keep the process alive for it
      child.stdin!.write(`${JSON.stringify({ id, op, ...args })}\n`);
    });
  return {
    http: (url, init = {}) => call('http', { url, ...init }),
    burst: (url, n, headers, connections) => call('burst', { url, n, headers, connections }),
    many: (urls, concurrency, headers, durationMs) => call('many', { urls, concurrency, headers, durationMs }),
    steady: (url, o) => call('steady', { url, ...o }),
    connect: (host, port, timeoutMs = 2000) => call('connect', { host, port, timeoutMs }),
    connectLoop: (host, port, durationMs) => call('connectLoop', { host, port, durationMs }),
    hold: (host, port) => call('hold', { host, port }),
    send: (id, text, timeoutMs = 2000) => call('send', { conn: id, text, timeoutMs }),
    async close() {
      child.stdin!.end();
      if (child.exitCode === null) await once(child, 'exit');
    },
  };
}
