// The DaemonSet's start gate end to end: a node registered with the start taint,
// nmi in the node namespace with the stand-in kubelet, IMDS and API server. The
// taint comes off only when a pod on the node is already answered by nmi
// through the rules, and goes back on a clean stop before the rules go.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createCluster, crd, TOKEN_URL, type Cluster } from '../harness/cluster.js';
import { waitFor } from '../harness/wait-for.js';
import type { PodAgent } from '../harness/netns.js';
import { startApiServer, type ApiServer, type KubeObject } from '../standins/apiserver.js';

const GATE = { key: 'startup-taint.cluster-autoscaler.kubernetes.io/nmi-not-ready', value: 'true', effect: 'NoSchedule' };
const FLAG = `${GATE.key}=${GATE.value}:${GATE.effect}`;
// Another component's taint, which nmi must leave alone.
const OTHER = { key: 'example.com/gpu-driver-missing', effect: 'NoSchedule' };
const URL = `${TOKEN_URL}?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net`;

let cluster: Cluster;
let api: ApiServer;
let kubeconfig: string;
let kubeconfigDir: string;
let agent: PodAgent;

const taints = () => (api.get('Node', '', 'node1')?.spec as { taints?: object[] }).taints ?? [];
const nodePatches = () => api.requests.filter((r) => r.method === 'PATCH' && r.path === '/api/v1/nodes/node1');
const rulesInstalled = () => /-A PREROUTING -j aad-metadata/.test(cluster.node.exec('iptables-save', ['-t', 'nat']));
const registered = (): KubeObject => ({ apiVersion: 'v1', kind: 'Node', metadata: { name: 'node1' }, spec: { taints: [OTHER, GATE] } });

before(async () => {
  cluster = await createCluster();
  api = await startApiServer({ pki: cluster.pki });
  kubeconfigDir = mkdtempSync(path.join(tmpdir(), 'nmi-gate-'));
  kubeconfig = api.writeKubeconfig(kubeconfigDir);
  cluster.writeBindings([crd.userAssigned('id-a', '11111111-1111-1111-1111-111111111111', '/subscriptions/s/x/a'), crd.binding('bind-a', 'id-a', 'a')]);
  agent = await cluster.addPod({ name: 'app', labels: { aadpodidbinding: 'a' } }).ns.agent();
});

after(async () => {
  await agent?.close();
  await api?.close();
  await cluster?.close();
  rmSync(kubeconfigDir, { recursive: true, force: true });
});

test('the taint comes off once a pod is answered through the rules, and goes back before the rules on a clean stop', async () => {
  api.put(registered());
  api.requests.length = 0;
  // What a pod scheduled the moment the taint is gone would find.
  let atOpen: { rules: boolean; status?: number } | undefined;
  api.beforeNext('PATCH', '/api/v1/nodes/node1', async () => {
    atOpen = { rules: rulesInstalled(), status: (await agent.http(URL, { headers: { Metadata: 'true' } })).status };
  });
  const nmi = await cluster.startNmi(['--kubeconfig', kubeconfig, '--start-taint', FLAG]);
  await waitFor('the start taint removed', () => taints().length === 1 || undefined);
  assert.deepEqual(taints(), [OTHER], 'only its own taint');
  assert.deepEqual(atOpen, { rules: true, status: 200 });
  assert.equal(await nmi.metric('nmi_start_gate_open'), 1);

  let atClose: { rules: boolean } | undefined;
  api.beforeNext('PATCH', '/api/v1/nodes/node1', () => {
    atClose = { rules: rulesInstalled() };
  });
  assert.equal(await nmi.stop('SIGTERM'), 0, nmi.output());
  assert.deepEqual(taints(), [OTHER, GATE], 'tainted again, as the node registered');
  assert.deepEqual(atClose, { rules: true }, 'tainted while the redirect was still there');
  assert.equal(rulesInstalled(), false, '--on-exit remove');
  assert.equal(nodePatches().length, 2);
  assert.doesNotMatch(nmi.output(), /could not/);
});

test('--on-exit keep: the node stays schedulable across a stop (pods fail closed meanwhile), and a restart writes nothing', async () => {
  api.put(registered());
  api.requests.length = 0;
  const first = await cluster.startNmi(['--kubeconfig', kubeconfig, '--start-taint', FLAG, '--on-exit', 'keep']);
  await waitFor('the start taint removed', () => taints().length === 1 || undefined);
  assert.equal(await first.stop('SIGTERM'), 0, first.output());
  assert.deepEqual(taints(), [OTHER]);
  assert.equal(rulesInstalled(), true);
  assert.equal(nodePatches().length, 1);

  const second = await cluster.startNmi(['--kubeconfig', kubeconfig, '--start-taint', FLAG]);
  await waitFor('the gate seen open', async () => (await second.metric('nmi_start_gate_open')) === 1 || undefined);
  assert.equal(nodePatches().length, 1, 'nothing to remove: no write');
  assert.equal(await second.stop('SIGTERM'), 0, second.output());
  assert.deepEqual(taints(), [OTHER, GATE]);
});

test('an API server that is down does not hold readiness back: the taint comes off when it answers', async () => {
  api.put(registered());
  await api.pause();
  let nmi;
  try {
    nmi = await cluster.startNmi(['--kubeconfig', kubeconfig, '--start-taint', FLAG]);
    assert.equal(await nmi.metric('nmi_start_gate_open'), 0);
    assert.equal((await agent.http(URL, { headers: { Metadata: 'true' } })).status, 200);
  } finally {
    await api.resume();
  }
  await waitFor('the start taint removed', () => taints().length === 1 || undefined, 60_000);
  assert.match(nmi.output(), /could not remove the start taint/);
  assert.equal(await nmi.stop('SIGTERM'), 0, nmi.output());
});
