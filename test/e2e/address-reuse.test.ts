// A pod's address freed by a deletion and given to a new pod: the new pod is
// answered as itself, never with the old pod's token, though the background poll
// has not run (an hour here). nmi learns the old pod is terminating (the kubelet's
// deletionTimestamp) and, from then on, re-checks that address with the kubelet
// before serving it, on the native fast path too. The pod's network namespace
// stays; the kubelet stand-in lists pod A on it, then pod B.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { createCluster, crd, TOKEN_URL, type Cluster, type ClusterPod } from '../harness/cluster.js';
import type { PodAgent } from '../harness/netns.js';
import { makePodJson } from '../standins/kubelet.js';
import { decodeStandinToken } from '../standins/imds.js';

const VAULT = 'https://vault.azure.net';
const URL = `${TOKEN_URL}?api-version=2018-02-01&resource=${encodeURIComponent(VAULT)}`;
const META = { Metadata: 'true' };
const ID_A = { client: 'aaaaaaaa-0000-0000-0000-000000000001', res: '/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a' };
const ID_B = { client: 'bbbbbbbb-0000-0000-0000-000000000002', res: '/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/b' };

let cluster: Cluster;
let podA: ClusterPod;
let other: ClusterPod;
let agentA: PodAgent;
let agentOther: PodAgent;

type Json = Record<string, any>;
const listed = (name: string) => cluster.kubelet.pods.find((p) => (p as Json).metadata.name === name) as Json;

/** Whose token the address got: the stand-in IMDS's token names its identity. */
async function tokenFor(agent: PodAgent): Promise<string> {
  const r = await agent.http(URL, { headers: META });
  assert.equal(r.status, 200, r.body);
  return decodeStandinToken((JSON.parse(r.body) as Json).access_token as string).identity;
}

before(async () => {
  cluster = await createCluster();
  podA = cluster.addPod({ name: 'a', labels: { aadpodidbinding: 'a' } });
  // Never listed: its requests make the unknown-caller refreshes this test needs.
  other = cluster.addPod({ name: 'unlisted', listed: false });
  cluster.writeBindings([
    crd.userAssigned('id-a', ID_A.client, ID_A.res), crd.binding('bind-a', 'id-a', 'a'),
    crd.userAssigned('id-b', ID_B.client, ID_B.res), crd.binding('bind-b', 'id-b', 'b'),
  ]);
  await cluster.startNmi(['--pod-refresh-interval', '1h']);
  agentA = await podA.ns.agent();
  agentOther = await other.ns.agent();
});

after(async () => {
  await agentA?.close();
  await agentOther?.close();
  await cluster?.close();
});

test('pod A terminating, then pod B on its address: B is answered as B after one kubelet call, never with A\'s token', async () => {
  // A is served, and its token cached: the native fast path answers its next request.
  assert.equal(await tokenFor(agentA), `client_id:${ID_A.client}`);
  assert.equal(await tokenFor(agentA), `client_id:${ID_A.client}`);

  // A is being deleted; nmi hears of it on the next kubelet list (an unknown caller's).
  listed('a').metadata.deletionTimestamp = '2024-01-01T01:00:00Z';
  const before = cluster.kubelet.calls;
  assert.notEqual((await agentOther.http(URL, { headers: META })).status, 200);
  assert.equal(cluster.kubelet.calls, before + 1);

  // Still running in its grace period: served as itself, once a fresh list says the address is still A's.
  assert.equal(await tokenFor(agentA), `client_id:${ID_A.client}`);
  assert.equal(cluster.kubelet.calls, before + 2);

  // A is gone; B has its address (the same network namespace here).
  const b = makePodJson({ name: 'b', ip: podA.ns.ip, labels: { aadpodidbinding: 'b' } });
  cluster.kubelet.pods.splice(cluster.kubelet.pods.indexOf(listed('a')), 1, b);
  assert.equal(await tokenFor(agentA), `client_id:${ID_B.client}`);
  assert.equal(cluster.kubelet.calls, before + 3, 'one kubelet call for the re-check');
});
