// Pod events against the stand-in API server (real TLS, the API server's Event
// validation): created once, then counted in a series, never one call per
// refusal; the kubelet's per-pod rate limit; a refusing API server said once.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { PodEvents, REPORTING_CONTROLLER } from '../../src/events/pod-events.js';
import { refusalEvent } from '../../src/events/refusal-events.js';
import { RecentRefusals } from '../../src/explain/refusals.js';
import { KubeClient } from '../../src/kube/client.js';
import { loadKubeConfig } from '../../src/kube/kubeconfig.js';
import type { Pod } from '../../src/kubelet/pod.js';
import { silentLogger } from '../../src/log/logger.js';
import { captureLogs } from '../harness/log-capture.js';
import { waitFor } from '../harness/wait-for.js';
import { startApiServer, type ApiServer } from '../standins/apiserver.js';

const tmp = mkdtempSync(path.join(tmpdir(), 'nmi-events-'));
let api: ApiServer;
let client: KubeClient;
before(async () => {
  api = await startApiServer();
  client = new KubeClient(loadKubeConfig({ kubeconfig: api.writeKubeconfig(tmp) }), 'nmi-test');
});
after(async () => {
  await client.close();
  await api.close();
  rmSync(tmp, { recursive: true, force: true });
});

let pods = 0;
/** Each in a namespace of its own: the API calls for it are told apart by their path. */
function pod(): Pod {
  pods++;
  return { uid: `uid-${pods}`, namespace: `ns-${pods}`, name: `web-${pods}`, labels: {}, ips: [`10.1.0.${pods}`], hostNetwork: false, phase: 'Running', nodeName: 'node1' };
}
const noIdentity = { reason: 'NoIdentity', action: 'GetToken', note: 'Token request refused (400 Identity not found).' };
const eventsOf = (p: Pod) => api.events().filter((e) => (e.regarding as { uid: string }).uid === p.uid);
const callsFor = (p: Pod) => api.requests.filter((r) => r.resource === 'events' && r.path.startsWith(`/apis/events.k8s.io/v1/namespaces/${p.namespace}/events`));

test('a refusal becomes one Event regarding the pod, as events.k8s.io/v1 requires it', async () => {
  const events = new PodEvents({ client, nodeName: 'node1', log: silentLogger });
  const p = pod();
  events.record(p, noIdentity);
  await waitFor('the event', () => events.counts.created === 1, 15_000, 10);
  const [event] = eventsOf(p);
  assert.ok(event);
  assert.deepEqual(event.regarding, { apiVersion: 'v1', kind: 'Pod', namespace: p.namespace, name: p.name, uid: p.uid });
  assert.equal(event.reason, 'NoIdentity');
  assert.equal(event.note, noIdentity.note);
  assert.equal(event.type, 'Warning');
  assert.equal(event.action, 'GetToken');
  assert.equal(event.reportingController, REPORTING_CONTROLLER);
  assert.equal(event.reportingInstance, 'nmi-node1');
  assert.equal(event.series, undefined);
  assert.match(event.metadata.name, new RegExp(`^${p.name}\\.[0-9a-f]+$`));
  events.stop();
});

test('under load: created once, then counted in its series; a handful of calls for 500 refusals', async () => {
  const events = new PodEvents({ client, nodeName: 'node1', log: silentLogger, seriesUpdateMs: 300 });
  const p = pod();
  for (let i = 0; i < 250; i++) events.record(p, noIdentity);
  await sleep(400);
  for (let i = 0; i < 250; i++) events.record(p, noIdentity);
  await waitFor('the series to reach 500', () => (eventsOf(p)[0]?.series as { count?: number } | undefined)?.count === 500, 15_000, 10);
  // The server counts a patch before the recorder reads its answer.
  await waitFor('the recorder to read the last answer', () => events.counts.updated === callsFor(p).filter((c) => c.method === 'PATCH').length, 15_000, 10);
  assert.equal(eventsOf(p).length, 1, 'one Event');
  const calls = callsFor(p);
  assert.equal(calls.filter((c) => c.method === 'POST').length, 1, 'one create');
  const patches = calls.filter((c) => c.method === 'PATCH').length;
  assert.ok(patches >= 1 && patches <= 4, `a few series updates, not one per refusal: ${patches}`);
  assert.equal(events.counts.created, 1);
  assert.equal(events.counts.updated, patches);
  const series = eventsOf(p)[0]!.series as { lastObservedTime: string };
  assert.match(series.lastObservedTime, /\.\d{6}Z$/);
  events.stop();
});

test('one PATCH of a series per seriesUpdateMs however the refusals arrive, even while a PATCH is in flight', async () => {
  const events = new PodEvents({ client, nodeName: 'node1', log: silentLogger });
  const p = pod();
  events.record(p, noIdentity);
  await waitFor('the event', () => events.counts.created === 1, 15_000, 10);
  // More refusals arrive while the first PATCH is on its way.
  api.beforeNext('PATCH', `/apis/events.k8s.io/v1/namespaces/${p.namespace}/events`, () => {
    for (let i = 0; i < 100; i++) events.record(p, noIdentity);
  });
  for (let i = 0; i < 100; i++) events.record(p, noIdentity);
  await waitFor('the first series update', () => events.counts.updated >= 1, 15_000, 10);
  await sleep(500);
  assert.equal(callsFor(p).filter((c) => c.method === 'PATCH').length, 1, 'a second PATCH within seriesUpdateMs (30 s)');
  events.stop();
});

test('another note or reason is another Event; one past the series window starts a new one', async () => {
  let now = Date.now();
  const events = new PodEvents({ client, nodeName: 'node1', log: silentLogger, now: () => now });
  const p = pod();
  events.record(p, noIdentity);
  events.record(p, { ...noIdentity, note: 'Token request for https://vault.azure.net refused (400 Identity not found).' });
  events.record(p, { reason: 'SeveralIdentities', action: 'GetToken', note: 'several' });
  await waitFor('three events', () => events.counts.created === 3, 15_000, 10);
  now += 6 * 60_000 + 1;
  events.record(p, noIdentity);
  await waitFor('a fourth event', () => events.counts.created === 4, 15_000, 10);
  assert.equal(eventsOf(p).length, 4);
  assert.equal(callsFor(p).filter((c) => c.method === 'PATCH').length, 0);
  events.stop();
});

test("the kubelet's spam filter: 25 new Events per pod, then one per 5 minutes; other pods are not held back", async () => {
  let now = Date.now();
  const events = new PodEvents({ client, nodeName: 'node1', log: silentLogger, now: () => now });
  const noisy = pod();
  const quiet = pod();
  for (let i = 0; i < 40; i++) events.record(noisy, { ...noIdentity, note: `resource ${i}` });
  events.record(quiet, noIdentity);
  await waitFor('26 events', () => events.counts.created === 26, 15_000, 10);
  assert.equal(eventsOf(noisy).length, 25);
  assert.equal(eventsOf(quiet).length, 1);
  assert.equal(events.counts.dropped, 15);
  now += 5 * 60_000;
  events.record(noisy, { ...noIdentity, note: 'resource 41' });
  events.record(noisy, { ...noIdentity, note: 'resource 42' });
  await waitFor('one more', () => events.counts.created === 27, 15_000, 10);
  assert.equal(events.counts.dropped, 16);
  events.stop();
});

test("the node's API calls through one bucket: a burst, then one per nodeRefillMs, whichever pods they are for", async () => {
  const events = new PodEvents({ client, nodeName: 'node1', log: silentLogger, nodeBurst: 5, nodeRefillMs: 150 });
  const many = Array.from({ length: 10 }, () => pod());
  const before = api.requests.length;
  for (const p of many) events.record(p, noIdentity);
  await waitFor('ten events', () => events.counts.created === 10, 15_000, 10);
  const at = api.requests.slice(before).filter((r) => r.resource === 'events' && r.method === 'POST').map((r) => r.at);
  assert.equal(at.length, 10);
  // The sixth waited for a token, and each after it for the next.
  for (let i = 5; i < 10; i++) assert.ok(at[i]! - at[0]! >= (i - 4) * 150 - 20, `call ${i + 1} came ${at[i]! - at[0]!} ms after the first`);
  assert.equal(events.counts.dropped, 0);
  events.stop();
});

test('an API server refusing Events: said once with the RBAC it needs, no retries, the series abandoned', async () => {
  const { log, lines } = captureLogs();
  const events = new PodEvents({ client, nodeName: 'node1', log });
  const p = pod();
  api.failNext(2, 403, `/apis/events.k8s.io/v1/namespaces/${p.namespace}/events`);
  events.record(p, noIdentity);
  events.record(p, { ...noIdentity, note: 'other' });
  await waitFor('two failures', () => events.counts.failed === 2, 15_000, 10);
  for (let i = 0; i < 50; i++) events.record(p, noIdentity);
  await sleep(100);
  assert.equal(callsFor(p).length, 2, 'nothing more was sent');
  const warnings = lines().filter((l) => /could not create a pod event/.test(l.msg));
  assert.equal(warnings.length, 1);
  assert.match(warnings[0]!.msg, /needs create on events\.k8s\.io events/);
  events.stop();
});

test('pods gone are forgotten; a stopped recorder sends nothing', async () => {
  const events = new PodEvents({ client, nodeName: 'node1', log: silentLogger });
  const gone = pod();
  events.record(gone, noIdentity);
  await waitFor('created', () => events.counts.created === 1, 15_000, 10);
  events.retain([]);
  events.record(gone, noIdentity);
  await waitFor('created again', () => events.counts.created === 2, 15_000, 10);
  assert.equal(eventsOf(gone).length, 2, 'a forgotten series starts a new Event');
  events.stop();
  const after = pod();
  events.record(after, noIdentity);
  await sleep(100);
  assert.equal(callsFor(after).length, 0);
});

test('refusals to Events: each kind an operator must act on has a reason and a stable note; transient ones none', () => {
  const refusals = new RecentRefusals();
  const seen: Array<ReturnType<typeof refusalEvent>> = [];
  const p = pod();
  refusals.listen((who, refusal) => seen.push(refusalEvent(who, refusal, 'node1')));
  const answer = { status: 400, error: 'invalid_request', error_description: 'Identity not found', resource: 'https://vault.azure.net' };
  refusals.refused(p, 'no-identity', answer);
  refusals.refused(p, 'no-identity', answer);
  refusals.refused(p, 'several-identities', { ...answer, error_description: 'Multiple user assigned identities exist' });
  refusals.refused(p, 'identity-unusable', { status: 500, error: 'internal_error', error_description: 'x', identity: 'default/sp', cause: 'secret default/sp-secret not found' });
  refusals.refused(p, 'upstream-refused', { ...answer, identity: 'default/msi' });
  refusals.refused(p, 'spoof', { status: 403, error: 'access_denied', error_description: 'x', cause: '10.1.0.9 is pod default/other' });
  refusals.refused(p, 'budget', { status: 429, error: 'too_many_requests', error_description: 'x' });
  refusals.refused(p, 'upstream-unavailable', { status: 503, error: 'temporarily_unavailable', error_description: 'x' });
  assert.deepEqual(
    seen.map((e) => e?.reason),
    ['NoIdentity', 'NoIdentity', 'SeveralIdentities', 'IdentityUnusable', 'TokenRefused', 'SpoofAttempt', undefined, undefined],
  );
  assert.equal(seen[0]!.note, seen[1]!.note, 'a repeat has the same note, so it joins the series');
  assert.match(seen[0]!.note, new RegExp(`nmi explain ${p.namespace}/${p.name}" on node node1`));
  assert.match(seen[3]!.note, /secret default\/sp-secret not found/);
  assert.match(seen[5]!.note, /10\.1\.0\.9 is pod default\/other/);
  assert.equal(refusals.forPod(p.uid).find((r) => r.kind === 'no-identity')?.count, 2);
});

test('an address refused before the kubelet listed its pod becomes that pod\'s refusal once it is listed', () => {
  let now = 1_000_000;
  const refusals = new RecentRefusals(() => now);
  const seen: string[] = [];
  refusals.listen((who, refusal) => seen.push(`${who.name} ${refusal.kind} ${refusal.count}`));
  refusals.unknownCaller('10.9.0.1');
  refusals.unknownCaller('10.9.0.1');
  refusals.unknownCaller('10.9.0.2');
  assert.equal(refusals.forAddress('10.9.0.1')?.count, 2);
  const late: Pod = { ...pod(), ips: ['10.9.0.1'] };
  const finished: Pod = { ...pod(), ips: ['10.9.0.2'], phase: 'Succeeded' };
  refusals.podsListed([late, finished]);
  assert.deepEqual(seen, [`${late.name} unknown-caller 2`]);
  assert.equal(refusals.forAddress('10.9.0.1'), undefined);
  assert.equal(refusals.forPod(late.uid)[0]?.status, 404);
  // A finished pod is no caller; an address forgotten after 10 minutes is no one's.
  now += 10 * 60_000 + 1;
  refusals.podsListed([{ ...finished, phase: 'Running' }]);
  assert.deepEqual(seen.length, 1);
  // Gone pods take their refusals along.
  refusals.podsListed([]);
  assert.deepEqual(refusals.forPod(late.uid), []);
});
