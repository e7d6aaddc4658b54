// `nmi demo`: the whole flow on one machine, touching nothing of the host's own
// network. Every step is printed with its duration; everything made is removed
// at the end, on error, and on Ctrl-C; a run killed halfway is cleaned up by the next.
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { createNodeNamespace, createPodNamespace, deleteNamespace, enterNamespace, listNamespaces, NODE_IP } from '../netns/netns.js';
import { readMetric } from '../metrics/read.js';
import { startImds, startKubelet, type Standin } from './standins.js';

const NODE_NS = 'nmi-demo-node';
const POD_NS = 'nmi-demo-pod';
const PROBE = '127.0.0.1:8085';
/** The folder and daemon of a demo killed halfway outlive it; the next demo removes them by this. */
const STATE_FILE = path.join(tmpdir(), 'nmi-demo-state.json');

interface DemoState {
  folder: string;
  pid?: number;
}
const CLIENT_ID = '00000000-0000-0000-0000-00000000d3m0'.replace('d3m0', 'de00');
const RESOURCE = 'https://management.azure.com/';
const nmiBin = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../bin/nmi.js');

const bindings = `apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentity
metadata: { name: demo-identity, namespace: default }
spec: { type: 0, clientID: ${CLIENT_ID}, resourceID: /subscriptions/demo/resourcegroups/demo/providers/Microsoft.ManagedIdentity/userAssignedIdentities/demo }
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentityBinding
metadata: { name: demo-binding, namespace: default }
spec: { azureIdentity: demo-identity, selector: demo }
`;

/** What the pod runs: one IMDS token request, answered as JSON on stdout. */
const podScript = `
const http = require('node:http');
const req = http.get('http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&resource=${encodeURIComponent(RESOURCE)}',
  { headers: { Metadata: 'true' }, timeout: 10000 }, (res) => {
    let body = '';
    res.on('data', (d) => (body += d));
    res.on('end', () => console.log(JSON.stringify({ status: res.statusCode, body })));
  });
req.on('error', (e) => console.log(JSON.stringify({ status: 0, body: e.message })));`;

function say(text: string): void {
  process.stdout.write(`${text}\n`);
}

/** Set by Ctrl-C: the main flow stops at the next check and cleans up once, itself. */
let interrupted = false;

class Interrupted extends Error {}

function checkInterrupted(): void {
  if (interrupted) throw new Interrupted('interrupted');
}

async function step<T>(n: number, what: string, fn: () => Promise<T> | T): Promise<T> {
  checkInterrupted();
  const start = performance.now();
  const result = await fn();
  checkInterrupted();
  say(`[${n}] ${what} (${(performance.now() - start).toFixed(1)} ms)`);
  return result;
}

function redact(body: string): Record<string, string> {
  const answer = JSON.parse(body) as Record<string, string>;
  if (answer.access_token) answer.access_token = `${answer.access_token.slice(0, 12)}…[redacted, ${answer.access_token.length} chars]`;
  return answer;
}

/** Async on purpose: the stand-ins live in this process and must keep answering meanwhile. */
async function podRequest(): Promise<{ status: number; body: string }> {
  const child = spawn('ip', ['netns', 'exec', POD_NS, process.execPath, '-e', podScript], { stdio: ['ignore', 'pipe', 'inherit'], timeout: 20_000 });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  await once(child, 'exit');
  return JSON.parse(out) as { status: number; body: string };
}

async function waitReady(daemon: ChildProcess, output: () => string): Promise<void> {
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline) {
    checkInterrupted();
    if (daemon.exitCode !== null) throw new Error(`nmi run exited ${daemon.exitCode}:\n${output()}`);
    const ok = await fetch(`http://${PROBE}/readyz`).then((r) => r.ok, () => false);
    if (ok) return;
    await sleep(50);
  }
  throw new Error(`nmi run not ready after 30s:\n${output()}`);
}

function removeLeftovers(): void {
  let state: Partial<DemoState>;
  try {
    state = JSON.parse(readFileSync(STATE_FILE, 'utf8')) as Partial<DemoState>;
  } catch {
    return;
  }
  const { pid, folder } = state;
  // Only if that pid is still an nmi daemon, not a recycled pid.
  if (typeof pid === 'number' && isNmiDaemon(pid)) process.kill(pid, 'SIGKILL');
  // Only a folder this demo would have made.
  if (typeof folder === 'string' && path.dirname(folder) === tmpdir() && path.basename(folder).startsWith('nmi-demo-')) {
    rmSync(folder, { recursive: true, force: true });
  }
  rmSync(STATE_FILE, { force: true });
}

function isNmiDaemon(pid: number): boolean {
  try {
    const cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
    return cmdline.includes('nmi.js') && cmdline.includes('run');
  } catch {
    return false;
  }
}

export async function runDemo(): Promise<number> {
  if (process.getuid?.() !== 0) {
    process.stderr.write('nmi demo: needs root (it creates network namespaces and rules); run it as root, e.g. sudo nmi demo\n');
    return 2;
  }
  const tmp = mkdtempSync(path.join(tmpdir(), 'nmi-demo-'));
  const standins: Standin[] = [];
  let daemon: ChildProcess | undefined;
  const cleanup = async () => {
    if (daemon && daemon.exitCode === null) {
      daemon.kill('SIGTERM');
      await Promise.race([once(daemon, 'exit'), sleep(15_000, undefined, { ref: false })]);
    }
    standins.forEach((s) => s.close());
    deleteNamespace(POD_NS);
    deleteNamespace(NODE_NS);
    rmSync(tmp, { recursive: true, force: true });
    rmSync(STATE_FILE, { force: true });
  };
  interrupted = false;
  const onSignal = () => {
    interrupted = true;
    say('interrupted: cleaning up');
  };
  process.once('SIGINT', onSignal).once('SIGTERM', onSignal);

  try {
    say('nmi demo: a throwaway node and pod, a stand-in kubelet and IMDS, and a token through 169.254.169.254');
    await step(0, 'removed what an interrupted demo left', () => {
      removeLeftovers();
      for (const ns of [POD_NS, NODE_NS]) if (listNamespaces().includes(ns)) deleteNamespace(ns);
      writeFileSync(STATE_FILE, JSON.stringify({ folder: tmp } satisfies DemoState));
    });
    await step(1, `created namespace ${NODE_NS} (node address ${NODE_IP}) and ${POD_NS}`, () => {
      createNodeNamespace(NODE_NS);
      enterNamespace(NODE_NS);
    });
    const podIp = createPodNamespace(NODE_NS, POD_NS, 1);
    say(`    pod address ${podIp}, routed through the node`);
    const kubelet = await step(2, 'started a stand-in kubelet listing the pod (label aadpodidbinding=demo)', () =>
      startKubelet([{ name: 'demo-pod', namespace: 'default', ip: podIp, labels: { aadpodidbinding: 'demo' } }]),
    );
    standins.push(kubelet);
    const imds = await step(3, 'started a stand-in IMDS for user-assigned identity tokens', () => startImds());
    standins.push(imds);
    writeFileSync(path.join(tmp, 'bindings.yaml'), bindings);
    say(`    bindings: AzureIdentity demo-identity (client ${CLIENT_ID}) bound to selector "demo"`);

    let output = '';
    await step(4, 'started nmi run in the node namespace; it synced pods and bindings and installed the redirect', async () => {
      daemon = spawn(
        process.execPath,
        [nmiBin, 'run', '--node-ip', NODE_IP, '--kubelet-url', kubelet.url, '--bindings', tmp, '--upstream-imds', imds.url, '--probe-address', PROBE, '--log-level', process.env.NMI_DEMO_LOG_LEVEL ?? 'warn'],
        { stdio: ['ignore', 'pipe', 'pipe'] },
      );
      writeFileSync(STATE_FILE, JSON.stringify({ folder: tmp, pid: daemon.pid } satisfies DemoState));
      daemon.stdout!.on('data', (d: Buffer) => (output += d.toString()));
      daemon.stderr!.on('data', (d: Buffer) => (output += d.toString()));
      await waitReady(daemon, () => output);
    });
    const status = await new Promise<string>((resolve) => {
      const child = spawn(process.execPath, [nmiBin, 'status'], { stdio: ['ignore', 'pipe', 'inherit'] });
      let text = '';
      child.stdout.on('data', (d: Buffer) => (text += d.toString()));
      child.on('exit', () => resolve(text));
    });
    say(status.trimEnd().split('\n').map((l) => `    ${l}`).join('\n'));

    const first = await step(5, `the pod asked http://169.254.169.254/metadata/identity/oauth2/token for ${RESOURCE}`, () => podRequest());
    if (first.status !== 200) throw new Error(`the pod got ${first.status}: ${first.body}\nnmi said:\n${output}`);
    say(`    answer ${first.status}: ${JSON.stringify(redact(first.body), null, 1).replace(/\n\s*/g, ' ')}`);
    say(`    IMDS calls so far: ${imds.calls}`);
    const second = await step(6, 'the pod asked again: answered from the cache', () => podRequest());
    if (second.status !== 200) throw new Error(`the second request got ${second.status}: ${second.body}`);
    say(`    IMDS calls so far: ${imds.calls} (unchanged: a cache hit)`);
    const metrics = await fetch(`http://${PROBE}/metrics`).then((r) => r.text(), () => '');
    const hits = readMetric(metrics, 'nmi_native_requests_total\\{result="hit"\\}') ?? 0;
    say(`    answered in C++ by the native fast path, without entering JavaScript: ${hits} request(s)`);

    await step(7, 'stopped nmi (SIGTERM): it drained and removed its rules; then removed the namespaces', cleanup);
    say('nmi demo: done');
    return 0;
  } catch (err) {
    if (!(err instanceof Interrupted)) process.stderr.write(`nmi demo: ${(err as Error).message}\n`);
    await cleanup();
    return interrupted ? 130 : 1;
  } finally {
    process.off('SIGINT', onSignal).off('SIGTERM', onSignal);
  }
}
