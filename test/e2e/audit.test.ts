// --audit-log end to end: pods ask 169.254.169.254 through the real rules, the
// native server answers, and the audit file says which pod got which token (its
// uti, as the pod received it, written before the answer), how many answers each
// pod had (the fast path's included), and what each pod was refused, never a token.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createCluster, crd, TOKEN_URL, type Cluster, type ClusterPod } from '../harness/cluster.js';
import type { PodAgent } from '../harness/netns.js';
import { nmiAsync, type NmiProcess } from '../harness/nmi-process.js';
import { decodeStandinToken } from '../standins/imds.js';

const MGMT = 'https://management.azure.com/';
const URL_A = `${TOKEN_URL}?api-version=2018-02-01&resource=${encodeURIComponent(MGMT)}`;
const META = { Metadata: 'true' };
const idA = { client: '11111111-1111-1111-1111-111111111111', res: '/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a' };

type Record_ = Record<string, any>;

let cluster: Cluster;
let dir: string;
let auditFile: string;
let nmi: NmiProcess;
const pods: Record<string, ClusterPod> = {};
const agents: Record<string, PodAgent> = {};
/** Every access token a pod received, to look for in the file. */
const received = new Set<string>();
/** 200s pod-a had, all told. */
let answeredA = 0;

const records = (file = auditFile): Record_[] =>
  readFileSync(file, 'utf8')
    .split('\n')
    .filter(Boolean)
    .map((line) => JSON.parse(line) as Record_);

async function tokenFor(agent: PodAgent): Promise<string> {
  const r = await agent.http(URL_A, { headers: META });
  assert.equal(r.status, 200, r.body);
  const token = (JSON.parse(r.body) as { access_token: string }).access_token;
  received.add(token);
  return token;
}

const hits = async () => (await nmi.metric('nmi_native_requests_total\\{result="hit"\\}')) ?? 0;

before(async () => {
  cluster = await createCluster();
  dir = mkdtempSync(path.join(tmpdir(), 'nmi-audit-'));
  auditFile = path.join(dir, 'audit.jsonl');
  pods.a = cluster.addPod({ name: 'pod-a', labels: { aadpodidbinding: 'a' }, serviceAccount: 'web' });
  pods.a2 = cluster.addPod({ name: 'pod-a2', labels: { aadpodidbinding: 'a' } });
  pods.refused = cluster.addPod({ name: 'pod-refused', labels: { aadpodidbinding: 'nobody' } });
  cluster.writeBindings([crd.userAssigned('id-a', idA.client, idA.res), crd.binding('bind-a', 'id-a', 'a')]);
  // An interval longer than the test: the usage and refusal records are the stop's, each interval's one.
  nmi = await cluster.startNmi(['--server', 'native', '--audit-log', auditFile, '--audit-interval', '1h']);
  for (const [name, pod] of Object.entries(pods)) agents[name] = await pod.ns.agent();
});

after(async () => {
  await Promise.all(Object.values(agents).map((agent) => agent.close()));
  await cluster?.close();
  rmSync(dir, { recursive: true, force: true });
});

test("a pod's first token is recorded before the pod has it: its uti is the token's", async () => {
  const token = await tokenFor(agents.a!);
  answeredA++;
  // Read as soon as the answer is in: the record was written before it.
  const served = records().filter((r) => r.kind === 'served');
  assert.equal(served.length, 1, JSON.stringify(served));
  const claims = decodeStandinToken(token);
  const record = served[0]!;
  assert.ok(claims.uti, 'the stand-in issues uti');
  assert.equal(record.tokenId, claims.uti);
  assert.equal(record.objectId, claims.oid);
  assert.deepEqual(record.pod, { namespace: 'default', name: 'pod-a', uid: pods.a!.uid, serviceAccount: 'web' });
  assert.deepEqual(record.identity, { clientId: idA.client, namespace: 'default', name: 'id-a', type: 0 });
  assert.equal(record.resource, MGMT);
  assert.equal(record.source, 'imds');
  assert.equal(record.node, 'node1');
  assert.equal(record.expiresOn, new Date(claims.exp * 1000).toISOString());
});

test('a second pod of the same identity gets a record of its own, though the token is in the fast path', async () => {
  const token = await tokenFor(agents.a2!);
  const served = records().filter((r) => r.kind === 'served' && r.pod.name === 'pod-a2');
  assert.equal(served.length, 1);
  assert.equal(served[0]!.tokenId, decodeStandinToken(token).uti);
});

test("nmi explain shows the pod's last served token by its uti", async () => {
  const token = await tokenFor(agents.a!);
  answeredA++;
  const r = await nmiAsync(['explain', 'default/pod-a', '--json']);
  assert.equal(r.code, 0, r.stderr);
  const served = (JSON.parse(r.stdout) as { served?: Record_[] }).served;
  assert.deepEqual(served?.map((s) => [s.identity, s.resource, s.tokenId, s.source]), [['default/id-a', MGMT, decodeStandinToken(token).uti, 'imds']]);
  const { stdout } = await nmiAsync(['explain', 'default/pod-a']);
  assert.match(stdout, /^tokens served lately \(audit, by uti; newest first\):$/m);
  assert.ok(stdout.includes(`default/id-a ${MGMT}: uti ${decodeStandinToken(token).uti}, `), stdout);
});

test('1,000 answers of the fast path are counted, without a line each', async () => {
  // Until the token is in pod-a's row of the native table.
  const start = await hits();
  while ((await hits()) === start) {
    await tokenFor(agents.a!);
    answeredA++;
  }
  const before = await hits();
  const linesBefore = records().length;
  const result = await agents.a!.many(Array.from({ length: 1000 }, () => URL_A), 8, META);
  assert.deepEqual(result.counts, { 200: 1000 });
  answeredA += 1000;
  assert.equal((await hits()) - before, 1000, 'all 1,000 answered in C++');
  assert.equal(records().length, linesBefore, 'no record per answer');
});

test('a refused pod is counted per refusal kind', async () => {
  for (let i = 0; i < 3; i++) {
    const r = await agents.refused!.http(URL_A, { headers: META });
    assert.equal(r.status, 400, r.body);
  }
});

test('at stop: one usage record per pod, identity and resource with every answer counted, one refusal record, no token anywhere', async () => {
  assert.equal(await nmi.stop(), 0);
  const all = records();
  const usage = all.filter((r) => r.kind === 'usage');
  const ofA = usage.filter((r) => r.pod.name === 'pod-a');
  assert.equal(ofA.length, 1, JSON.stringify(usage));
  const [a] = ofA as [Record_];
  assert.equal(a.count, answeredA);
  assert.deepEqual(a.identity, { clientId: idA.client });
  assert.equal(a.resource, MGMT);
  assert.ok(a.from < a.to);
  assert.equal(usage.find((r) => r.pod.name === 'pod-a2')?.count, 1);
  const refused = all.filter((r) => r.kind === 'refused');
  assert.equal(refused.length, 1, JSON.stringify(refused));
  const [r] = refused as [Record_];
  assert.deepEqual(
    { pod: r.pod.name, reason: r.reason, status: r.status, count: r.count },
    { pod: 'pod-refused', reason: 'no-identity', status: 400, count: 3 },
  );
  const text = readFileSync(auditFile, 'utf8');
  for (const token of received) assert.ok(!text.includes(token), 'no token in the file');
  // Nor any JWT (a service-account token is one too), nor a part of one.
  assert.ok(!/eyJ|access_token|standin/.test(text), 'nothing token-shaped in the file');
});

test('a read-only audit file is counted and logged once; nmi serves on', async () => {
  const ro = mkdtempSync(path.join(tmpdir(), 'nmi-audit-ro-'));
  const file = path.join(ro, 'audit.jsonl');
  writeFileSync(file, '');
  execFileSync('mount', ['--bind', ro, ro]);
  try {
    execFileSync('mount', ['-o', 'remount,bind,ro', ro]);
    nmi = await cluster.startNmi(['--server', 'native', '--audit-log', file]);
    for (let i = 0; i < 3; i++) await tokenFor(agents.a!);
    assert.ok(((await nmi.metric('nmi_audit_records_total\\{result="failed"\\}')) ?? 0) >= 1, 'counted');
    const said = nmi.output().split('\n').filter((line) => line.includes('audit stream: cannot write records'));
    assert.equal(said.length, 1, nmi.output());
    assert.match(said[0]!, /EROFS/);
    assert.equal(await nmi.stop(), 0);
    assert.equal(readFileSync(file, 'utf8'), '');
  } finally {
    execFileSync('umount', [ro]);
    rmSync(ro, { recursive: true, force: true });
  }
});

test('--server js: every answer goes through the core, which counts it', async () => {
  const file = path.join(dir, 'audit-js.jsonl');
  nmi = await cluster.startNmi(['--server', 'js', '--audit-log', file, '--audit-interval', '1h']);
  const tokens = new Set<string>();
  for (let i = 0; i < 5; i++) tokens.add(await tokenFor(agents.a!));
  assert.equal(await nmi.stop(), 0);
  const all = records(file);
  assert.deepEqual(all.filter((r) => r.kind === 'served').map((r) => r.tokenId), [...tokens].map((t) => decodeStandinToken(t).uti));
  assert.deepEqual(all.filter((r) => r.kind === 'usage').map((r) => [r.pod.name, r.count]), [['pod-a', 5]]);
});
