// SIGTERM under load: requests in flight are answered, then the rules go.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { createCluster, crd, TOKEN_URL, type Cluster } from '../harness/cluster.js';
import { waitFor } from '../harness/wait-for.js';

let cluster: Cluster;

before(async () => {
  cluster = await createCluster();
  cluster.writeBindings([crd.userAssigned('id-a', '11111111-1111-1111-1111-111111111111', '/subscriptions/s/x/a'), crd.binding('bind-a', 'id-a', 'a')]);
});

after(() => cluster?.close());

test('SIGTERM while requests wait on the upstream: every one is answered 200, then the rules are removed', async () => {
  const pod = cluster.addPod({ name: 'busy', labels: { aadpodidbinding: 'a' } });
  const agent = await pod.ns.agent();
  // 100 connections from one pod, all held by the upstream: more than the default cap of 64 allows.
  const nmi = await cluster.startNmi(['--server', 'js', '--max-connections-per-source', '100']);
  cluster.imds.hang(true);
  const inFlight = agent.burst(`${TOKEN_URL}?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net`, 100, { Metadata: 'true' });
  // Every one of the 100 has reached the cache (a miss each, sharing the one held upstream call): all are in flight.
  await waitFor('100 requests in flight', async () => ((await nmi.metric('nmi_token_cache_requests_total\\{result="miss"\\}')) ?? 0) >= 100 || undefined, 60_000);
  await waitFor('the shared upstream call to be held', () => cluster.imds.calls >= 1 || undefined);
  assert.equal(cluster.imds.calls, 1, 'one upstream call for all 100');
  const stopped = nmi.stop('SIGTERM');
  await sleep(300); // nmi is draining now: the requests are still in flight
  cluster.imds.hang(false);
  const counts = await inFlight;
  assert.deepEqual(
    Object.entries(counts).map(([k, n]) => `${k.split(' ')[0]}x${n}`),
    ['200x100'],
    JSON.stringify(counts),
  );
  assert.equal(await stopped, 0, nmi.output());
  assert.doesNotMatch(cluster.node.exec('iptables-save', ['-t', 'nat']), /aad-metadata/);
  const afterStop = await agent.connect('169.254.169.254', 80, 1000);
  assert.ok(afterStop.error, 'nothing answers for the metadata address once nmi is gone');
  await agent.close();
});
