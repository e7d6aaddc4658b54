// Issue 19's benchmark: cache hits for a federated identity (type 3, its pod's
// service-account token exchanged at the stand-in Entra ID) go through the native
// fast path like a user-assigned identity's. Side by side in one run, from two pods
// of one node through 169.254.169.254 and the iptables DNAT rule, against one
// `nmi run --server native`:
//   user-assigned  a type 0 identity's token (the baseline: the fast path as measured in bench.ts)
//   federated      a type 3 identity's token, per service account
// Printed per kind: req/s and p99 (median of --trials wrk runs), the share of
// requests the C++ server answered itself (nmi_native_requests_total{result="hit"}),
// and the upstream calls made during the runs; the goal: federated at >= 0.9x the
// baseline's req/s, >= 99% of its requests native hits, and no upstream call.
//
//   sudo node dist/bench/federation.js [--trials 3] [--duration 5] [--connections 64]
import { parseArgs } from 'node:util';
import { crd, TOKEN_URL, type ClusterPod } from '../test/harness/cluster.js';
import { createFederatedNode, TENANT } from '../test/harness/federation.js';
import type { NmiProcess } from '../test/harness/nmi-process.js';
import { positiveFlags, say } from './common.js';
import { wrk, type WrkResult } from './wrk.js';

const { values } = parseArgs({
  options: {
    trials: { type: 'string', default: '3' },
    duration: { type: 'string', default: '5' },
    connections: { type: 'string', default: '64' },
  },
});
const { trials, duration: seconds, connections } = positiveFlags('federation', values, ['trials', 'duration', 'connections']);

const URL_VAULT = `${TOKEN_URL}?api-version=2018-02-01&resource=${encodeURIComponent('https://vault.azure.net')}`;
const APP = 'aaaaaaaa-0000-0000-0000-0000000000be';
const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

const node = await createFederatedNode();
try {
  const { api, entra, cluster } = node;
  api.put({ apiVersion: 'aadpodidentity.k8s.io/v1', kind: 'AzureIdentity', metadata: { name: 'fed', namespace: 'apps' }, spec: { type: 3, clientID: APP, tenantID: TENANT } });
  api.put({ ...crd.userAssigned('msi', '11111111-0000-0000-0000-0000000000be', '/subscriptions/s/x/msi', 'apps'), metadata: { name: 'msi', namespace: 'apps' } });
  api.put(crd.binding('fed', 'fed', 'fed', 'apps'));
  api.put(crd.binding('msi', 'msi', 'msi', 'apps'));
  const pods: Record<'user-assigned' | 'federated', ClusterPod> = {
    'user-assigned': node.addPod({ name: 'msi', namespace: 'apps', labels: { aadpodidbinding: 'msi' }, serviceAccount: 'msi-sa' }),
    federated: node.addPod({ name: 'fed', namespace: 'apps', labels: { aadpodidbinding: 'fed' }, serviceAccount: 'fed-sa' }),
  };
  entra.federate({ tenantId: TENANT, clientId: APP, issuer: api.issuer, subject: node.subjectOf(pods.federated) });
  const daemon: NmiProcess = await node.startNmi(['--server', 'native']);
  // The first request of each makes the token; from then on every answer is a cache hit.
  for (const pod of Object.values(pods)) {
    const agent = await pod.ns.agent();
    const first = await agent.http(URL_VAULT, { headers: { Metadata: 'true' } });
    await agent.close();
    if (first.status !== 200) throw new Error(`${pod.name}: first token ${first.status} ${first.body}`);
  }
  const hits = async () => (await daemon.metric('nmi_native_requests_total{result="hit"}')) ?? 0;
  const upstream = () => entra.calls + cluster.imds.calls;
  const results: Record<string, { runs: WrkResult[]; hitShare: number[]; upstream: number }> = {};
  for (const kind of Object.keys(pods)) results[kind] = { runs: [], hitShare: [], upstream: 0 };
  say(`bench/federation: ${trials} trials of ${seconds} s, ${connections} connections, from each pod through 169.254.169.254`);
  for (let trial = 0; trial < trials; trial++) {
    // Alternating which goes first, so neither always runs on the warmer machine.
    const order = trial % 2 === 0 ? (['user-assigned', 'federated'] as const) : (['federated', 'user-assigned'] as const);
    for (const kind of order) {
      const before = { hits: await hits(), upstream: upstream() };
      const run = await wrk({ url: URL_VAULT, connections, seconds, wrap: (command) => ['ip', 'netns', 'exec', pods[kind].ns.name, ...command] });
      const r = results[kind]!;
      r.runs.push(run);
      r.hitShare.push((await hits() - before.hits) / run.requests);
      r.upstream += upstream() - before.upstream;
      say(`  trial ${trial + 1} ${kind}: ${Math.round(run.rps)} req/s, p99 ${run.p99Ms.toFixed(2)} ms`);
    }
  }
  await daemon.stop();
  const base = results['user-assigned']!;
  const baseRps = median(base.runs.map((r) => r.rps));
  say('');
  say('| identity | req/s (median) | p99 ms (median) | vs user-assigned | native hits | upstream calls |');
  say('|---|---|---|---|---|---|');
  for (const [kind, r] of Object.entries(results)) {
    const rps = median(r.runs.map((x) => x.rps));
    const p99 = median(r.runs.map((x) => x.p99Ms));
    say(`| ${kind} | ${Math.round(rps)} | ${p99.toFixed(2)} | ${(rps / baseRps).toFixed(2)}x | ${(100 * Math.min(...r.hitShare)).toFixed(1)}% | ${r.upstream} |`);
  }
  const fed = results.federated!;
  const ratio = median(fed.runs.map((x) => x.rps)) / baseRps;
  const met = ratio >= 0.9 && Math.min(...fed.hitShare) >= 0.99 && fed.upstream === 0;
  say(`goal (federated >= 0.9x the baseline, >= 99% native hits, no upstream call): ${met ? 'met' : 'NOT met'}`);
} finally {
  await node.close();
}
