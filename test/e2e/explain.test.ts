// `nmi explain` and pod Events end to end: pods in their own namespaces ask
// 169.254.169.254 through the real rules, nmi reads the custom resources from the
// stand-in API server and posts Events there, and `nmi explain` asks the daemon
// on its probe address, for each reason a pod gets no token.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { request } from 'undici';
import { createCluster, crd, TOKEN_URL, type Cluster, type ClusterPod } from '../harness/cluster.js';
import type { PodAgent } from '../harness/netns.js';
import { nmiAsync as runNmi, type NmiProcess } from '../harness/nmi-process.js';
import { waitFor } from '../harness/wait-for.js';
import { startApiServer, type ApiServer, type KubeObject } from '../standins/apiserver.js';
import { makePodJson } from '../standins/kubelet.js';

const VAULT = 'https://vault.azure.net';
const query = (extra = '') => `${TOKEN_URL}?api-version=2018-02-01&resource=${encodeURIComponent(VAULT)}${extra}`;
const META = { Metadata: 'true' };
const ID1 = { client: '11111111-0000-0000-0000-000000000000', res: '/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/web' };
const ID2 = { client: '22222222-0000-0000-0000-000000000000', res: '/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/two' };

let cluster: Cluster;
let api: ApiServer;
let daemon: NmiProcess;
const pods: Record<string, ClusterPod> = {};
const agents: Record<string, PodAgent> = {};

type Json = Record<string, any>;

// Asynchronously: the daemon asks the kubelet stand-in, which this process serves, while the command waits.
async function explain(target: string, ...flags: string[]): Promise<{ code: number; stdout: string; stderr: string; json?: Json }> {
  const r = await runNmi(['explain', target, ...flags]);
  return { ...r, json: flags.includes('--json') && r.stdout ? (JSON.parse(r.stdout) as Json) : undefined };
}
const explainJson = async (target: string) => (await explain(target, '--json')).json!;
const eventsOf = (pod: ClusterPod) => api.events().filter((e) => (e.regarding as Json).name === pod.name && (e.regarding as Json).namespace === pod.namespace);

before(async () => {
  cluster = await createCluster();
  api = await startApiServer({ pki: cluster.pki });
  const kubeconfig = api.writeKubeconfig(cluster.bindingsDir);
  pods.web = cluster.addPod({ name: 'web', labels: { aadpodidbinding: 'web', app: 'web' } });
  pods.nolabel = cluster.addPod({ name: 'nolabel', labels: { app: 'x' } });
  pods.wrongsel = cluster.addPod({ name: 'wrongsel', labels: { aadpodidbinding: 'webb' } });
  pods.foreign = cluster.addPod({ name: 'foreign', namespace: 'apps', labels: { aadpodidbinding: 'shared' } });
  pods.dangling = cluster.addPod({ name: 'dangling', labels: { aadpodidbinding: 'dangling' } });
  pods.invalid = cluster.addPod({ name: 'invalid', labels: { aadpodidbinding: 'invalid' } });
  pods.nosecret = cluster.addPod({ name: 'nosecret', labels: { aadpodidbinding: 'nosecret' } });
  pods.excepted = cluster.addPod({ name: 'excepted', labels: { aadpodidbinding: 'web', passthrough: 'yes' } });
  pods.multi = cluster.addPod({ name: 'multi', labels: { aadpodidbinding: 'multi' } });
  pods.late = cluster.addPod({ name: 'late', labels: { aadpodidbinding: 'web' }, listed: false });
  const objects: KubeObject[] = [
    crd.userAssigned('web-id', ID1.client, ID1.res),
    crd.binding('web-binding', 'web-id', 'web'),
    // Namespaced: the binding in `shared` does not reach the pod in `apps`.
    crd.userAssigned('shared-id', ID2.client, ID2.res, 'shared', { 'aadpodidentity.k8s.io/Behavior': 'namespaced' }),
    crd.binding('shared-binding', 'shared-id', 'shared', 'shared'),
    crd.binding('dangling-binding', 'no-such-id', 'dangling'),
    { ...crd.userAssigned('bad-id', ID2.client, ID2.res), spec: { type: 7, clientID: ID2.client } },
    crd.binding('invalid-binding', 'bad-id', 'invalid'),
    crd.servicePrincipal('sp-id', '72f988bf-86f1-41af-91ab-2d7cd011db47', 'aaaaaaaa-0000-0000-0000-00000000000b', 'sp-secret'),
    crd.binding('sp-binding', 'sp-id', 'nosecret'),
    crd.exception('passthrough', { passthrough: 'yes' }),
    crd.userAssigned('two-id', ID2.client, ID2.res),
    crd.binding('multi-1', 'web-id', 'multi'),
    crd.binding('multi-2', 'two-id', 'multi'),
  ] as KubeObject[];
  for (const object of objects) api.put(object);
  daemon = await cluster.startNmi(
    ['--bindings', 'kubernetes', '--kubeconfig', kubeconfig, '--multiple-identities', 'refuse', '--probe-address', '0.0.0.0:8085', '--pod-refresh-interval', '1s'],
    { env: { ...process.env, NODE_EXTRA_CA_CERTS: cluster.pki.caFile } },
  );
  for (const [name, pod] of Object.entries(pods)) agents[name] = await pod.ns.agent();
});

after(async () => {
  await Promise.all(Object.values(agents).map((agent) => agent.close()));
  await api?.close();
  await cluster?.close();
});

test('a served pod: listed, its binding matches, the identity it gets, the token cached (when it ends, never the token)', async () => {
  const r = await agents.web!.http(query(), { headers: META });
  assert.equal(r.status, 200, r.body);
  const accessToken = (JSON.parse(r.body) as Json).access_token as string;
  const out = await explain('default/web', '--json');
  assert.equal(out.code, 0, out.stderr);
  const e = out.json!;
  assert.equal(e.kubelet.listed, true);
  assert.equal(e.pod.phase, 'Running');
  assert.deepEqual(e.pod.addresses, [pods.web!.ns.ip]);
  assert.equal(e.pod.hostNetwork, false);
  assert.equal(e.pod.caller, true);
  assert.equal(e.pod.createdAt, '2024-01-01T00:00:00Z');
  assert.ok(e.pod.ageSeconds > 0);
  assert.deepEqual(e.pod.labels, { aadpodidbinding: 'web', app: 'web' });
  const binding = e.bindings.find((b: Json) => b.binding === 'default/web-binding');
  assert.deepEqual(binding, { binding: 'default/web-binding', selector: 'web', identity: 'default/web-id', matches: true, reason: 'selector "web" matches' });
  assert.ok(e.bindings.filter((b: Json) => b.binding !== 'default/web-binding').every((b: Json) => !b.matches), 'the others in reach do not match');
  assert.deepEqual(e.identities, [{ identity: 'default/web-id', type: 'user-assigned managed identity (0)', clientID: ID1.client, resourceID: ID1.res, usable: true }]);
  assert.equal(e.withoutId.identity, 'default/web-id');
  assert.equal(e.tokens.length, 1);
  assert.equal(e.tokens[0].identity, 'default/web-id');
  assert.equal(e.tokens[0].resource, VAULT);
  assert.equal(e.tokens[0].state, 'fresh');
  assert.equal(e.tokens[0].heldByCaller, true);
  assert.ok(Date.parse(e.tokens[0].expiresOn) > Date.now());
  assert.deepEqual(e.refusals, []);
  assert.ok(!out.stdout.includes(accessToken), 'no token in the answer');
  // The text form says the same for a person, and by address too.
  const text = await explain(pods.web!.ns.ip);
  assert.equal(text.code, 0, text.stderr);
  assert.match(text.stdout, /^pod default\/web \(uid [0-9a-f-]+\): Running/m);
  assert.match(text.stdout, /match default\/web-binding -> default\/web-id: selector "web" matches/);
  assert.match(text.stdout, /tokens cached:\n  default\/web-id https:\/\/vault\.azure\.net: fresh, expires/);
  assert.ok(!text.stdout.includes(accessToken));
});

test('no aadpodidbinding label: said, the refusal recorded with its answer, and one Event counted in a series under load', async () => {
  const first = await agents.nolabel!.http(query(), { headers: META });
  assert.equal(first.status, 400, first.body);
  const e = await explainJson('default/nolabel');
  assert.ok(e.bindings.length > 0 && e.bindings.every((b: Json) => !b.matches && b.reason === 'the pod has no aadpodidbinding label'), JSON.stringify(e.bindings));
  assert.deepEqual(e.identities, []);
  assert.match(e.withoutId.answer, /^400 Identity not found/);
  assert.equal(e.refusals.length, 1);
  assert.equal(e.refusals[0].kind, 'no-identity');
  assert.equal(e.refusals[0].status, 400);
  assert.equal(e.refusals[0].error_description, 'Identity not found');
  assert.equal(e.refusals[0].resource, VAULT);
  await waitFor('the NoIdentity event', () => eventsOf(pods.nolabel!).length === 1);
  const [event] = eventsOf(pods.nolabel!);
  assert.equal(event!.reason, 'NoIdentity');
  assert.equal(event!.type, 'Warning');
  assert.match(event!.note as string, /nmi explain default\/nolabel" on node node1/);
  // 200 more: still one Event, its series counts them, a handful of API calls.
  const counts = await agents.nolabel!.burst(query(), 200, META, 50);
  assert.equal(Object.values(counts).reduce((a, b) => a + b, 0), 200);
  await waitFor('the series to count 201', () => (eventsOf(pods.nolabel!)[0]?.series as Json | undefined)?.count >= 2);
  assert.equal(eventsOf(pods.nolabel!).length, 1);
  const calls = api.requests.filter((r) => r.resource === 'events');
  assert.ok(calls.length <= 6, `a few Event calls for 201 refusals, not one each: ${calls.length}`);
  assert.equal((await explainJson('default/nolabel')).refusals[0].count, 201);
});

test('a selector that differs, a namespaced identity out of reach, a missing identity, an invalid one: each said', async () => {
  const wrong = await explainJson('default/wrongsel');
  assert.ok(wrong.bindings.some((b: Json) => b.binding === 'default/web-binding' && b.reason === 'selector "web" is not the pod\'s aadpodidbinding "webb"'), JSON.stringify(wrong.bindings));

  const foreign = await explainJson('apps/foreign');
  assert.deepEqual(foreign.bindings, [
    {
      binding: 'shared/shared-binding',
      selector: 'shared',
      identity: 'shared/shared-id',
      matches: false,
      reason: 'the identity is annotated aadpodidentity.k8s.io/Behavior: namespaced, and binding and identity are in namespace shared, not the pod\'s apps',
    },
  ]);

  const dangling = await explainJson('default/dangling');
  const d = dangling.bindings.find((b: Json) => b.binding === 'default/dangling-binding');
  assert.match(d.reason, /names AzureIdentity default\/no-such-id, which does not exist/);

  const invalid = await explainJson('default/invalid');
  const i = invalid.bindings.find((b: Json) => b.binding === 'default/invalid-binding');
  assert.match(i.reason, /names AzureIdentity default\/bad-id, which is invalid: .*type/);
});

test('a Secret missing: the identity unusable and why, the 500 recorded, an IdentityUnusable Event', async () => {
  const r = await agents.nosecret!.http(query(), { headers: META });
  assert.equal(r.status, 500, r.body);
  const e = await explainJson('default/nosecret');
  assert.equal(e.identities[0].usable, false);
  assert.match(e.identities[0].problem, /secret default\/sp-secret not found/);
  assert.match(e.withoutId.answer, /cannot be used: .*secret default\/sp-secret not found/);
  assert.equal(e.refusals[0].kind, 'identity-unusable');
  assert.match(e.refusals[0].cause, /secret default\/sp-secret not found/);
  await waitFor('the IdentityUnusable event', () => eventsOf(pods.nosecret!).find((ev) => ev.reason === 'IdentityUnusable'));
});

test('an exception that matches: passed through, and why', async () => {
  const e = await explainJson('default/excepted');
  assert.deepEqual(e.exceptions, [{ exception: 'default/passthrough', matches: true, reason: 'the pod has all its podLabels: its requests pass through to the real IMDS' }]);
  assert.match(e.withoutId.answer, /passed through to the real IMDS/);
  const other = await explainJson('default/web');
  assert.deepEqual(other.exceptions, [{ exception: 'default/passthrough', matches: false, reason: 'the pod lacks passthrough=yes' }]);
});

test('several identities with --multiple-identities refuse: both listed, the 400 explained, a SeveralIdentities Event', async () => {
  const r = await agents.multi!.http(query(), { headers: META });
  assert.equal(r.status, 400, r.body);
  const e = await explainJson('default/multi');
  assert.deepEqual(e.identities.map((i: Json) => i.identity), ['default/two-id', 'default/web-id']);
  assert.match(e.withoutId.answer, /^400 Multiple user assigned identities exist \(--multiple-identities refuse\): 2 are bound/);
  assert.equal(e.refusals[0].kind, 'several-identities');
  await waitFor('the SeveralIdentities event', () => eventsOf(pods.multi!).find((ev) => ev.reason === 'SeveralIdentities'));
});

test('a pod that called before the kubelet listed it: the 404s become its refusals and an UnknownCaller Event once listed', async () => {
  const r = await agents.late!.http(query(), { headers: META });
  assert.equal(r.status, 404, r.body);
  const before = await explain(pods.late!.ns.ip, '--json');
  assert.equal(before.code, 1);
  assert.equal(before.json!.kubelet.listed, false);
  assert.equal(before.json!.refusals[0].kind, 'unknown-caller');
  cluster.kubelet.pods.push(makePodJson({ name: 'late', namespace: 'default', ip: pods.late!.ns.ip, labels: { aadpodidbinding: 'web' }, nodeName: 'node1' }));
  const listed = await waitFor('the late pod listed with its refusal', async () => {
    const e = await explainJson('default/late');
    return e.pod && e.refusals.length > 0 ? e : undefined;
  });
  assert.equal(listed.refusals[0].kind, 'unknown-caller');
  assert.equal(listed.refusals[0].status, 404);
  assert.equal(listed.withoutId.identity, 'default/web-id', 'and it is served now');
  const event = await waitFor('the UnknownCaller event', () => eventsOf(pods.late!).find((ev) => ev.reason === 'UnknownCaller'));
  assert.match(event.note as string, /before the kubelet listed the pod/);
});

test('bad input: an unknown pod exits 1 saying so, a malformed name exits 2 naming it, no argument exits 2', async () => {
  const unknown = await explain('default/nobody');
  assert.equal(unknown.code, 1);
  assert.match(unknown.stdout, /^pod default\/nobody: the kubelet of this node does not list this pod \(\d+ pods listed, synced \d+ s ago\)/);
  const malformed = await explain('Default/web');
  assert.equal(malformed.code, 2);
  assert.equal(malformed.stderr, 'nmi explain: "Default" is not a namespace name (lower-case letters, digits and \'-\', at most 63)\n');
  const tooMany = await explain('a/b/c');
  assert.equal(tooMany.code, 2);
  assert.match(tooMany.stderr, /neither <namespace>\/<pod> nor a pod's IP address/);
  const none = await runNmi(['explain']);
  assert.equal(none.code, 2);
  assert.match(none.stderr, /^nmi explain: takes one argument, <namespace>\/<pod>\|<pod IP>; got none\n$/);
});

test('no daemon on the probe address: exit 1 saying so', async () => {
  const r = await explain('default/web', '--probe-address', '127.0.0.1:8099');
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^nmi explain: no nmi daemon answers on http:\/\/127\.0\.0\.1:8099 .*is it running/);
});

test('the endpoint answers loopback only, though the probe address is 0.0.0.0; health and metrics still answer there', async () => {
  const viaNode = await request(`http://${cluster.node.nodeIp}:8085/explain?pod=default/web`);
  assert.equal(viaNode.statusCode, 403);
  assert.deepEqual(await viaNode.body.json(), { error: 'explain answers on loopback only' });
  const health = await request(`http://${cluster.node.nodeIp}:8085/healthz`);
  assert.equal(health.statusCode, 200);
  await health.body.dump();
  const bad = await request('http://127.0.0.1:8085/explain?pod=x/y/z');
  assert.equal(bad.statusCode, 400);
  await bad.body.dump();
});

test('Events are counted in the metrics, and no Event, explain answer or log line carries a token', async () => {
  assert.ok(((await daemon.metric('nmi_pod_events_total{result="created"}')) ?? 0) >= 4);
  assert.equal(await daemon.metric('nmi_pod_events_total{result="failed"}'), 0);
  const r = await agents.web!.http(query(), { headers: META });
  const token = (JSON.parse(r.body) as Json).access_token as string;
  assert.ok(!daemon.output().includes(token));
  assert.ok(!JSON.stringify(api.events()).includes(token));
});
