// No interception at all (`--rules none`), for clusters whose dataplane cannot
// have NAT rules: pods point msal and the Azure SDKs at nmi themselves with
// AZURE_POD_IDENTITY_AUTHORITY_HOST=http://<node-ip>:2579, and nmi still tells
// them apart by their source address.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { createCluster, crd, type Cluster, type ClusterPod } from '../harness/cluster.js';
import { nodeScriptInPod } from '../harness/netns.js';
import { nmiAsync, type NmiProcess } from '../harness/nmi-process.js';
import { decodeStandinToken } from '../standins/imds.js';

const VAULT = 'https://vault.azure.net';
const idA = { client: '11111111-1111-1111-1111-111111111111', res: '/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a' };

let cluster: Cluster;
let bound: ClusterPod;
let unbound: ClusterPod;
let daemon: NmiProcess;

before(async () => {
  cluster = await createCluster();
  bound = cluster.addPod({ name: 'app', labels: { aadpodidbinding: 'a' } });
  unbound = cluster.addPod({ name: 'other' });
  cluster.writeBindings([crd.userAssigned('id-a', idA.client, idA.res), crd.binding('bind-a', 'id-a', 'a')]);
  daemon = await cluster.startNmi(['--rules', 'none']);
});

after(async () => {
  await cluster?.close();
});

/** msal-node's ManagedIdentityApplication in the pod's namespace, pointed at nmi by the variable alone. */
async function msalInPod(pod: ClusterPod): Promise<{ token?: string; error?: string }> {
  const script = `
    import { ManagedIdentityApplication } from '@azure/msal-node';
    try {
      const r = await new ManagedIdentityApplication().acquireToken({ resource: '${VAULT}' });
      console.log(JSON.stringify({ token: r.accessToken }));
    } catch (err) {
      console.log(JSON.stringify({ error: err.errorCode ?? err.message }));
    }`;
  const stdout = await nodeScriptInPod(pod.ns, script, { AZURE_POD_IDENTITY_AUTHORITY_HOST: `http://${cluster.node.nodeIp}:2579` });
  return JSON.parse(stdout) as { token?: string; error?: string };
}

test('--rules none installs nothing: no chain, no nft table', () => {
  assert.doesNotMatch(cluster.node.exec('iptables-save', ['-t', 'nat']), /aad-metadata/);
  assert.doesNotMatch(cluster.node.exec('nft', ['list', 'ruleset']), /aad-metadata/);
});

test('a pod that sets AZURE_POD_IDENTITY_AUTHORITY_HOST gets its own identity from msal-node, no rules involved', async () => {
  const calls = cluster.imds.calls;
  const { token, error } = await msalInPod(bound);
  assert.equal(error, undefined);
  assert.equal(decodeStandinToken(token!).identity, `client_id:${idA.client}`);
  assert.equal(cluster.imds.calls, calls + 1);
});

test('a pod bound to nothing still gets nothing: the caller is known by its source address', async () => {
  const calls = cluster.imds.calls;
  const { token, error } = await msalInPod(unbound);
  assert.equal(token, undefined);
  assert.ok(error, 'msal reports the refusal');
  assert.equal(cluster.imds.calls, calls, 'IMDS was not asked');
  // Bindings from a file and no API server: no Events, said once at start; `nmi explain` still has the refusal.
  assert.match(daemon.output(), /no API server configured \(--bindings is a file, no --kubeconfig\): no Events on pods/);
  const explained = JSON.parse((await nmiAsync(['explain', 'default/other', '--json'])).stdout) as { refusals: Array<{ kind: string }> };
  assert.deepEqual(explained.refusals.map((r) => r.kind), ['no-identity']);
});
