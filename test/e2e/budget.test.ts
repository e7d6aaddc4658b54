// The upstream budget end to end: pods asking 169.254.169.254 through the real
// rules, the daemon with its default budget, and a stand-in IMDS that throttles
// as IMDS documents (429 past 5 concurrent or 20 per second, 30 ms a call).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createCluster, crd, TOKEN_URL, type Cluster } from '../harness/cluster.js';
import { nmiBin, type PodAgent } from '../harness/netns.js';
import type { NmiProcess } from '../harness/nmi-process.js';

const META = { Metadata: 'true' };
const url = (resource: string) => `${TOKEN_URL}?api-version=2018-02-01&resource=${encodeURIComponent(resource)}`;
const flooder = { client: '11111111-0000-0000-0000-000000000000', res: '/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/flood' };
const quiet = { client: '22222222-0000-0000-0000-000000000000', res: '/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/quiet' };

let cluster: Cluster;
let nmi: NmiProcess;
const agents: Record<string, PodAgent> = {};

before(async () => {
  cluster = await createCluster({ imds: { throttle: { maxConcurrent: 5, perSecond: 20, latencyMs: 30 } } });
  const pods = {
    flood: cluster.addPod({ name: 'flood', labels: { aadpodidbinding: 'flood' } }),
    quiet: cluster.addPod({ name: 'quiet', labels: { aadpodidbinding: 'quiet' } }),
  };
  cluster.writeBindings([
    crd.userAssigned('flood', flooder.client, flooder.res),
    crd.binding('bind-flood', 'flood', 'flood'),
    crd.userAssigned('quiet', quiet.client, quiet.res),
    crd.binding('bind-quiet', 'quiet', 'quiet'),
  ]);
  nmi = await cluster.startNmi(['--max-tokens-per-pod', '40']);
  for (const [name, pod] of Object.entries(pods)) agents[name] = await pod.ns.agent();
});

after(async () => {
  await Promise.all(Object.values(agents).map((agent) => agent.close()));
  await cluster?.close();
});

test("a pod asking for many resources at once: IMDS never throttles, the pod alone gets IMDS's 429 past its bounds, another pod's first token arrives meanwhile", async () => {
  const throttledBefore = cluster.imds.throttle!.throttled;
  const resources = Array.from({ length: 120 }, (_, i) => url(`https://flood-${i}.example`));
  const flood = agents.flood!.many(resources, 48, META);
  await new Promise((resolve) => setTimeout(resolve, 500));
  const first = await agents.quiet!.http(url('https://vault.azure.net'), { headers: META });
  assert.equal(first.status, 200, first.body);
  const { counts, samples } = await flood;
  assert.equal(cluster.imds.throttle!.throttled - throttledBefore, 0, 'IMDS answered 429');
  // At most 40 distinct tokens, fetched in turn; the rest told to come back later.
  assert.ok((counts['200'] ?? 0) >= 16 && (counts['200'] ?? 0) <= 40, JSON.stringify(counts));
  assert.equal((counts['200'] ?? 0) + (counts['429'] ?? 0), resources.length, JSON.stringify(counts));
  const refused = samples['429']!;
  assert.equal(refused.headers['content-type'], 'application/json; charset=utf-8');
  assert.match(refused.headers['retry-after'] ?? '', /^[1-9]\d*$/);
  const body = JSON.parse(refused.body) as Record<string, string>;
  assert.equal(body.error, 'too_many_requests');
  assert.match(body.error_description ?? '', /this pod/);

  // Up to its 40 tokens one at a time, then a new resource is refused at once; a held one still answers, the other pod is untouched.
  const held = counts['200']!;
  const fill = Array.from({ length: 40 - held }, (_, i) => url(`https://fill-${i}.example`));
  assert.deepEqual((await agents.flood!.many(fill, 1, META)).counts, fill.length > 0 ? { 200: fill.length } : {});
  const more = await agents.flood!.http(url('https://another.example'), { headers: META });
  assert.equal(more.status, 429, more.body);
  assert.match(more.body, /distinct tokens/);
  assert.equal(more.headers['retry-after'], '60');
  assert.equal((await agents.flood!.http(url('https://fill-0.example'), { headers: META })).status, fill.length > 0 ? 200 : 429);
  assert.equal((await agents.quiet!.http(url('https://storage.azure.com'), { headers: META })).status, 200);

  // Said once a minute per pod, not per request.
  const said = nmi.output().split('\n').filter((line) => line.includes('pod over its upstream bounds'));
  assert.equal(said.length, 1, said.join('\n'));
  assert.ok(said[0]!.includes('default/flood'));
  assert.equal(await nmi.metric('nmi_upstream_throttled_total\\{upstream="imds"\\}'), 0);
  assert.ok((await nmi.metric('nmi_budget_refusals_total\\{reason="pod-pending"\\}'))! > 0);
  assert.ok((await nmi.metric('nmi_budget_refusals_total\\{reason="pod-tokens"\\}'))! > 0);
  assert.equal(await nmi.metric('nmi_upstream_budget_limit\\{upstream="imds",limit="rate"\\}'), 20);
});

test('a resource IMDS refuses costs the budget once however often the pod retries, until the refusal expires', async () => {
  cluster.imds.failNext(1, { status: 400, body: { error: 'invalid_request', error_description: 'Identity not found' } });
  const calls = cluster.imds.calls;
  for (let i = 0; i < 5; i++) {
    const r = await agents.quiet!.http(url('https://not-a-resource.example'), { headers: META });
    assert.equal(r.status, 400, r.body);
    assert.match(r.body, /Identity not found/);
  }
  assert.equal(cluster.imds.calls - calls, 1);
});

test('nmi status shows the budget in use', () => {
  const text = execFileSync(process.execPath, [nmiBin, 'status'], { encoding: 'utf8' });
  assert.match(text, /budget imds: \d+\/5 in flight, \d+ queued, 20\/s/);
  assert.match(text, /refused by budget: \d+/);
});
