// The start gate against the stand-in API server: nmi takes its one taint off
// its own Node and puts it back, never touching anyone else's taints, through
// conflicts, refusals and an API server that is down.
import { after, before, beforeEach, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { KubeClient } from '../../src/kube/client.js';
import { loadKubeConfig } from '../../src/kube/kubeconfig.js';
import { startTaint, type Taint } from '../../src/config/values.js';
import { StartGate } from '../../src/lifecycle/start-gate.js';
import { isNmiError, codes } from '../../src/errors/errors.js';
import { startApiServer, type ApiServer, type KubeObject } from '../standins/apiserver.js';
import { captureLogs } from '../harness/log-capture.js';

const GATE: Taint = { key: 'startup-taint.cluster-autoscaler.kubernetes.io/nmi-not-ready', value: 'true', effect: 'NoSchedule' };
const OTHER = { key: 'node.kubernetes.io/not-ready', effect: 'NoExecute' };
const fast = { initialMs: 20, maxMs: 100 };

let api: ApiServer;
let kubeconfig: string;
const tmp = mkdtempSync(path.join(tmpdir(), 'nmi-gate-'));

const node = (taints: object[] | undefined): KubeObject => ({ apiVersion: 'v1', kind: 'Node', metadata: { name: 'node1' }, spec: taints ? { taints } : {} });
const taintsNow = () => (api.get('Node', '', 'node1')?.spec as { taints?: object[] } | undefined)?.taints ?? [];
const patches = () => api.requests.filter((r) => r.method === 'PATCH');

before(async () => {
  api = await startApiServer();
  kubeconfig = api.writeKubeconfig(tmp);
});
after(async () => {
  await api.close();
  rmSync(tmp, { recursive: true, force: true });
});
beforeEach(() => {
  api.requests.length = 0;
});

// Each gate closes its own client when it is done, as the daemon's does.
const gate = (log = captureLogs().log) =>
  new StartGate({ client: new KubeClient(loadKubeConfig({ kubeconfig }), 'nmi-test'), nodeName: 'node1', taint: GATE, log, backoff: fast });

test('--start-taint reads kubelet --register-with-taints spelling; bad ones name the flag', () => {
  assert.equal(startTaint('off', 'start-taint'), null);
  assert.deepEqual(startTaint('example.com/gate=true:NoSchedule', 'start-taint'), { key: 'example.com/gate', value: 'true', effect: 'NoSchedule' });
  assert.deepEqual(startTaint('gate:NoExecute', 'start-taint'), { key: 'gate', effect: 'NoExecute' });
  assert.deepEqual(startTaint('gate=:PreferNoSchedule', 'start-taint'), { key: 'gate', effect: 'PreferNoSchedule' });
  for (const [raw, why] of [
    ['gate', /KEY\[=VALUE\]:EFFECT/],
    ['gate=true:NoExec', /effect "NoExec" is not one of NoSchedule, PreferNoSchedule, NoExecute/],
    ['Example.com/gate:NoSchedule', /"Example.com\/gate" in "Example.com\/gate:NoSchedule" is not a taint key/],
    ['a..b/gate:NoSchedule', /"a..b\/gate" .* is not a taint key/],
    ['-gate:NoSchedule', /"-gate" .* is not a taint key/],
    [':NoSchedule', /"" in ":NoSchedule" is not a taint key/],
    [`${'a'.repeat(64)}:NoSchedule`, /is not a taint key/],
    ['gate=a b:NoSchedule', /"a b" in "gate=a b:NoSchedule" is not a taint value/],
    [`gate=${'v'.repeat(64)}:NoSchedule`, /is not a taint value/],
  ] as const) {
    assert.throws(() => startTaint(raw, 'start-taint'), (err: Error) => isNmiError(err, codes.USAGE) && err.message.startsWith('--start-taint: ') && why.test(err.message), raw);
  }
});

test('open takes off exactly its taint (known by key and effect), leaving the others in their order', async () => {
  api.put(node([OTHER, { ...GATE, value: 'other-value' }, { key: GATE.key, effect: 'NoExecute' }]));
  const g = gate();
  await g.open();
  assert.equal(g.opened, true);
  assert.deepEqual(taintsNow(), [OTHER, { key: GATE.key, effect: 'NoExecute' }]);
  assert.equal(patches().length, 1);
  await g.stop();
  assert.equal(patches().length, 1, 'stop writes nothing');
});

test('open on a node without the taint writes nothing; close adds it once, and not twice', async () => {
  api.put(node(undefined));
  const g = gate();
  await g.open();
  assert.equal(g.opened, true);
  assert.equal(patches().length, 0);
  await g.close(5000);
  assert.equal(g.opened, false);
  assert.deepEqual(taintsNow(), [GATE]);
  await gate().close(5000);
  assert.deepEqual(taintsNow(), [GATE]);
  assert.equal(patches().length, 1);
});

test("a change made by someone else between nmi's read and write is kept: 409, read again, write again", async () => {
  api.put(node([GATE]));
  // After nmi's GET, before its PATCH: another controller adds a taint (a new resourceVersion).
  api.beforeNext('PATCH', '/api/v1/nodes/node1', () => void api.put(node([GATE, OTHER])));
  const { log, lines } = captureLogs();
  const g = gate(log);
  await g.open();
  await g.stop();
  assert.deepEqual(taintsNow(), [OTHER]);
  assert.deepEqual(patches().map((r) => r.path), ['/api/v1/nodes/node1', '/api/v1/nodes/node1']);
  assert.ok(lines().some((l) => /node changed while updating its taints/.test(l.msg)));
});

test('refusals and an API server that is down are retried with backoff, saying what to check', async () => {
  api.put(node([GATE]));
  api.failNext(2, 403, '/api/v1/nodes/');
  const { log, lines } = captureLogs();
  const refused = gate(log);
  await refused.open();
  await refused.stop();
  assert.deepEqual(taintsNow(), []);
  const warnings = lines().filter((l) => l.msg === 'could not remove the start taint');
  assert.equal(warnings.length, 2);
  assert.match(String(warnings[0]!.hint), /get and patch on nodes/);

  api.put(node([GATE]));
  await api.pause();
  const g = gate(log);
  const opened = g.open();
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(g.opened, false, 'not opened while the API server is down');
  await api.resume();
  await opened;
  await g.stop();
  assert.deepEqual(taintsNow(), []);
});

test('a node that does not exist is retried and named; stop gives up without writing', async () => {
  api.remove('Node', '', 'node1');
  const { log, lines } = captureLogs();
  const g = gate(log);
  const opened = g.open();
  await new Promise((r) => setTimeout(r, 200));
  await g.stop();
  await opened;
  assert.equal(g.opened, false);
  assert.ok(lines().some((l) => l.hint === '--node-name does not name a Node'));
  assert.equal(patches().length, 0);
});

test('close gives up after its timeout when the API server stays down, and says pods may be scheduled', async () => {
  api.put(node([]));
  const { log, lines } = captureLogs();
  const g = gate(log);
  await g.open();
  await api.pause();
  try {
    const started = Date.now();
    await g.close(400);
    assert.ok(Date.now() - started < 5000);
    const error = lines().find((l) => l.level === 50);
    assert.match(String(error?.msg), /could not taint the node again/);
    assert.match(String(error?.err), /ECONNREFUSED|connect/);
  } finally {
    await api.resume();
  }
  assert.deepEqual(taintsNow(), []);
});
