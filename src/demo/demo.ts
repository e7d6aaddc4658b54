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
import { jwtClaims } from '../util/jwt.js';
import { startEntra, startTokenIssuer } from './federation.js';
import { podUid, startImds, startKubelet, type DemoPod, type Standin } from './standins.js';
import { messageOf } from '../errors/errors.js';

const NODE_NS = 'nmi-demo-node';
const POD_NS = 'nmi-demo-pod';
/** The second pod: its token comes through Workload ID federation. */
const FED_NS = 'nmi-demo-pod2';
const PROBE = '127.0.0.1:8085';
/** The folder and daemon of a demo killed halfway outlive it; the next demo removes them by this. */
const STATE_FILE = path.join(tmpdir(), 'nmi-demo-state.json');

interface DemoState {
  folder: string;
  pid?: number;
}
const CLIENT_ID = '00000000-0000-0000-0000-00000000d3m0'.replace('d3m0', 'de00');
const RESOURCE = 'https://management.azure.com/';
const TENANT = '00000000-0000-0000-0000-00000000de01';
const FED_CLIENT_ID = '00000000-0000-0000-0000-00000000de02';
const API_TOKEN = 'demo-api-server-token';
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
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentity
metadata: { name: federated-identity, namespace: default }
spec: { type: 3, clientID: ${FED_CLIENT_ID}, tenantID: ${TENANT} }
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentityBinding
metadata: { name: federated-binding, namespace: default }
spec: { azureIdentity: federated-identity, selector: federated }
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
async function podRequest(ns = POD_NS): Promise<{ status: number; body: string }> {
  const child = spawn('ip', ['netns', 'exec', ns, process.execPath, '-e', podScript], { stdio: ['ignore', 'pipe', 'inherit'], timeout: 20_000 });
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
    deleteNamespace(FED_NS);
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
    say('nmi demo: a throwaway node and two pods, stand-ins for the kubelet, IMDS, the API server and Entra ID, and tokens through 169.254.169.254');
    await step(0, 'removed what an interrupted demo left', () => {
      removeLeftovers();
      for (const ns of [FED_NS, POD_NS, NODE_NS]) if (listNamespaces().includes(ns)) deleteNamespace(ns);
      writeFileSync(STATE_FILE, JSON.stringify({ folder: tmp } satisfies DemoState));
    });
    await step(1, `created namespace ${NODE_NS} (node address ${NODE_IP}), ${POD_NS} and ${FED_NS}`, () => {
      createNodeNamespace(NODE_NS);
      enterNamespace(NODE_NS);
    });
    const podIp = createPodNamespace(NODE_NS, POD_NS, 1);
    const fedIp = createPodNamespace(NODE_NS, FED_NS, 2);
    say(`    pod addresses ${podIp} and ${fedIp}, routed through the node`);
    const fedPod: DemoPod = { name: 'federated-pod', namespace: 'default', ip: fedIp, labels: { aadpodidbinding: 'federated' }, serviceAccount: 'federated-sa' };
    const kubelet = await step(2, 'started a stand-in kubelet listing the pods (labels aadpodidbinding=demo and =federated)', () =>
      startKubelet([{ name: 'demo-pod', namespace: 'default', ip: podIp, labels: { aadpodidbinding: 'demo' } }, fedPod]),
    );
    standins.push(kubelet);
    const subject = `system:serviceaccount:default:${fedPod.serviceAccount}`;
    const { imds, apiServer, entra } = await step(3, `started a stand-in IMDS, an API server issuing service-account tokens, and an Entra ID trusting ${subject}`, async () => {
      const imds = await startImds();
      standins.push(imds);
      const apiServer = await startTokenIssuer([{ namespace: 'default', serviceAccount: fedPod.serviceAccount!, pod: { name: fedPod.name, uid: podUid(fedPod) } }], API_TOKEN);
      standins.push(apiServer);
      const entra = await startEntra(tmp, { tenant: TENANT, clientId: FED_CLIENT_ID, issuer: apiServer.issuer, subject, publicKey: apiServer.publicKey });
      standins.push(entra);
      return { imds, apiServer, entra };
    });
    writeFileSync(path.join(tmp, 'bindings.yaml'), bindings);
    const kubeconfig = path.join(tmp, 'kubeconfig');
    writeFileSync(
      kubeconfig,
      `apiVersion: v1\nkind: Config\nclusters: [{ name: demo, cluster: { server: "${apiServer.url}" } }]\nusers: [{ name: demo, user: { token: ${API_TOKEN} } }]\ncontexts: [{ name: demo, context: { cluster: demo, user: demo } }]\ncurrent-context: demo\n`,
    );
    say(`    bindings: AzureIdentity demo-identity (client ${CLIENT_ID}) bound to selector "demo";`);
    say(`              AzureIdentity federated-identity (type 3, Workload ID, client ${FED_CLIENT_ID}) bound to selector "federated"`);

    let output = '';
    await step(4, 'started nmi run in the node namespace; it synced pods and bindings and installed the redirect', async () => {
      daemon = spawn(
        process.execPath,
        [
          nmiBin, 'run', '--node-ip', NODE_IP, '--kubelet-url', kubelet.url, '--bindings', tmp, '--upstream-imds', imds.url, '--probe-address', PROBE,
          '--kubeconfig', kubeconfig, '--aad-authority-host', entra.url, '--pod-events=false', '--log-level', process.env.NMI_DEMO_LOG_LEVEL ?? 'warn',
        ],
        // The stand-in Entra ID's certificate, made for this run, is trusted by this nmi alone.
        { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, NODE_EXTRA_CA_CERTS: entra.certFile } },
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

    const federated = await step(7, `the second pod (service account ${fedPod.serviceAccount}) asked the same URL: nmi requested the pod's service-account token and exchanged it at Entra ID`, () =>
      podRequest(FED_NS),
    );
    if (federated.status !== 200) throw new Error(`the second pod got ${federated.status}: ${federated.body}\nnmi said:\n${output}`);
    const claims = jwtClaims((JSON.parse(federated.body) as { access_token: string }).access_token);
    say(`    answer ${federated.status}: ${JSON.stringify(redact(federated.body), null, 1).replace(/\n\s*/g, ' ')}`);
    say(`    a token of app ${FED_CLIENT_ID} for ${claims.sub}; token requests at the API server: ${apiServer.calls}, exchanges at Entra ID: ${entra.calls}`);

    await step(8, 'stopped nmi (SIGTERM): it drained and removed its rules; then removed the namespaces', cleanup);
    say('nmi demo: done');
    return 0;
  } catch (err) {
    if (!(err instanceof Interrupted)) process.stderr.write(`nmi demo: ${messageOf(err)}\n`);
    await cleanup();
    return interrupted ? 130 : 1;
  } finally {
    process.off('SIGINT', onSignal).off('SIGTERM', onSignal);
  }
}
