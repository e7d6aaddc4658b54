// A pod gets its token (run once per server): through the real rules, from the kubelet's pod list,
// the bindings file, and msal-node against the IMDS stand-in.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { request } from 'undici';
import { createCluster, crd, TOKEN_URL, viaV4Mapped, type Cluster, type ClusterPod } from '../harness/cluster.js';
import { nodeScriptInPod, type PodAgent } from '../harness/netns.js';
import { type NmiProcess } from '../harness/nmi-process.js';
import { waitFor } from '../harness/wait-for.js';
import { makePodJson } from '../standins/kubelet.js';
import { decodeStandinToken } from '../standins/imds.js';

const MGMT = 'https://management.azure.com/';
const query = (extra = '') => `${TOKEN_URL}?api-version=2018-02-01&resource=${encodeURIComponent(MGMT)}${extra}`;
const META = { Metadata: 'true' };
const idA = { client: '11111111-1111-1111-1111-111111111111', res: '/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a' };
const idB = { client: '22222222-2222-2222-2222-222222222222', res: '/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/b' };

export function tokenSuite(server: 'js' | 'native'): void {
  let cluster: Cluster;
  let nmi: NmiProcess;
  let podA: ClusterPod;
  let podB: ClusterPod;
  let podX: ClusterPod;
  let agentA: PodAgent;
  let agentB: PodAgent;
  let agentX: PodAgent;

  function json(body: string): Record<string, unknown> {
    return JSON.parse(body) as Record<string, unknown>;
  }

  before(async () => {
    cluster = await createCluster();
    podA = cluster.addPod({ name: 'pod-a', labels: { aadpodidbinding: 'a' } });
    podB = cluster.addPod({ name: 'pod-b', labels: { aadpodidbinding: 'b' } });
    podX = cluster.addPod({ name: 'pod-x', labels: { app: 'legacy' } });
    // The node's own address is a hostNetwork pod's: it must never be a caller.
    cluster.kubelet.pods.push(makePodJson({ name: 'host-pod', ip: cluster.node.nodeIp, hostNetwork: true, labels: { aadpodidbinding: 'a' } }));
    cluster.writeBindings([
      crd.userAssigned('id-a', idA.client, idA.res),
      crd.userAssigned('id-b', idB.client, idB.res),
      crd.binding('bind-a', 'id-a', 'a'),
      crd.binding('bind-b', 'id-b', 'b'),
      crd.exception('legacy', { app: 'legacy' }),
    ]);
    nmi = await cluster.startNmi(['--server', server]);
    [agentA, agentB, agentX] = await Promise.all([podA.ns.agent(), podB.ns.agent(), podX.ns.agent()]);
  });

  after(async () => {
    await Promise.all([agentA, agentB, agentX].map((a) => a?.close()));
    await cluster?.close();
  });

  test(`${server}: a bound pod gets its token through 169.254.169.254, answered as IMDS answers`, async () => {
    const r = await agentA.http(query(), { headers: META });
    assert.equal(r.status, 200, r.body);
    assert.equal(r.headers['content-type'], 'application/json; charset=utf-8');
    const body = json(r.body);
    assert.deepEqual(Object.keys(body), ['access_token', 'client_id', 'expires_in', 'expires_on', 'ext_expires_in', 'not_before', 'resource', 'token_type']);
    for (const [key, value] of Object.entries(body)) assert.equal(typeof value, 'string', `${key} is a string`);
    assert.equal(body.client_id, idA.client);
    assert.equal(body.resource, MGMT);
    assert.equal(body.token_type, 'Bearer');
    assert.equal(decodeStandinToken(body.access_token as string).identity, `client_id:${idA.client}`);
    const expiresIn = Number(body.expires_in);
    assert.ok(expiresIn > 0 && expiresIn <= 86400);
    // A dual-stack IPv6 socket (Java's default) asks ::ffff:169.254.169.254: IPv4 on the wire, so the same rule takes it.
    const mapped = await agentA.http(viaV4Mapped(query()), { headers: META });
    assert.equal(mapped.status, 200, mapped.body);
    assert.equal(json(mapped.body).client_id, idA.client);
    if (server === 'native') {
      // The first answer filled the native table: the next ones are answered in C++, identically.
      for (let i = 0; i < 5; i++) {
        const again = await agentA.http(query(), { headers: META });
        assert.equal(again.status, 200);
        assert.equal(json(again.body).access_token, body.access_token);
      }
      assert.ok(((await nmi.metric('nmi_native_requests_total\\{result="hit"\\}')) ?? 0) >= 1, 'served by the fast path');
    }
  });

  test(`${server}: msal-node's own managed-identity client in the pod gets the token unchanged`, async () => {
    // The SDK a pod would run, in the pod's namespace, talking to the default IMDS address.
    const script = `
      import { ManagedIdentityApplication } from '@azure/msal-node';
      const app = new ManagedIdentityApplication({ managedIdentityIdParams: { userAssignedClientId: '${idA.client}' } });
      const r = await app.acquireToken({ resource: '${MGMT}' });
      console.log(JSON.stringify({ token: r.accessToken, expiresOn: r.expiresOn }));`;
    const out = await nodeScriptInPod(podA.ns, script, { AZURE_POD_IDENTITY_AUTHORITY_HOST: '' });
    const r = JSON.parse(out) as { token: string };
    assert.equal(decodeStandinToken(r.token).identity, `client_id:${idA.client}`);
  });

  test(`${server}: a pod can never get another pod's identity, by any id`, async () => {
    for (const extra of [`&client_id=${idB.client}`, `&msi_res_id=${encodeURIComponent(idB.res)}`, `&mi_res_id=${encodeURIComponent(idB.res)}`, '&object_id=33333333-3333-3333-3333-333333333333']) {
      const r = await agentA.http(query(extra), { headers: META });
      assert.equal(r.status, 400, `${extra}: ${r.body}`);
      assert.deepEqual(json(r.body), { error: 'invalid_request', error_description: 'Identity not found' });
    }
    const own = await agentB.http(query(`&client_id=${idB.client}`), { headers: META });
    assert.equal(own.status, 200);
    assert.equal(decodeStandinToken(json(own.body).access_token as string).identity, `client_id:${idB.client}`);
    const byRes = await agentA.http(query(`&mi_res_id=${encodeURIComponent(idA.res)}`), { headers: META });
    assert.equal(byRes.status, 200);
    assert.equal(json(byRes.body).client_id, idA.client);
  });

  test(`${server}: a hostNetwork caller and an unknown address get nothing`, async () => {
    // From the node namespace itself: the source is the node address, a hostNetwork pod's.
    const res = await request(`http://${cluster.node.nodeIp}:2579/metadata/identity/oauth2/token?api-version=2018-02-01&resource=x`, { headers: META });
    assert.equal(res.statusCode, 404);
    assert.equal(((await res.body.json()) as { error: string }).error, 'not_found');
    const stranger = cluster.addPod({ name: 'stranger', listed: false });
    const agent = await stranger.ns.agent();
    const r = await agent.http(query(), { headers: META });
    await agent.close();
    assert.equal(r.status, 404);
    assert.equal(json(r.body).error, 'not_found');
  });

  test(`${server}: an exception pod reaches the upstream IMDS untouched`, async () => {
    const before = cluster.imds.requests.length;
    const r = await agentX.http(query(`&client_id=${idB.client}`), { headers: META });
    assert.equal(r.status, 200, r.body);
    assert.equal(decodeStandinToken(json(r.body).access_token as string).identity, `client_id:${idB.client}`);
    const seen = cluster.imds.requests.slice(before);
    assert.equal(seen.length, 1);
    assert.equal(seen[0]!.query.client_id, idB.client);
    assert.equal(seen[0]!.headers['x-forwarded-for'], undefined);
  });

  test(`${server}: a pod created after start gets its token on its first requests, with one kubelet call`, async () => {
    const late = cluster.addPod({ name: 'late', labels: { aadpodidbinding: 'a' } });
    const agent = await late.ns.agent();
    const calls = cluster.kubelet.calls;
    const counts = await agent.burst(query(), 50, META);
    await agent.close();
    const statuses = Object.keys(counts).map((k) => k.split(' ')[0]);
    assert.deepEqual([...new Set(statuses)], ['200'], JSON.stringify(counts));
    assert.equal(cluster.kubelet.calls - calls, 1, 'one coalesced kubelet refresh');
  });

  test(`${server}: 1000 requests for a cold key, 60 at a time (under the pod's connection cap), make exactly one upstream call`, async () => {
    const calls = cluster.imds.calls;
    const counts = await agentB.burst(query().replace(encodeURIComponent(MGMT), encodeURIComponent('https://vault.azure.net')), 1000, META, 60);
    const statuses = Object.entries(counts).map(([k, n]) => `${k.split(' ')[0]}x${n}`);
    assert.deepEqual(statuses, ['200x1000']);
    assert.equal(cluster.imds.calls - calls, 1);
  });

  test(`${server}: upstream 400 is passed on; an upstream that stays down gives 503 with Retry-After`, async () => {
    cluster.imds.failNext(1, { status: 400, body: { error: 'invalid_request', error_description: 'Identity not found' } });
    const bad = await agentA.http(query().replace(encodeURIComponent(MGMT), 'https%3A%2F%2Fstorage.azure.com%2F'), { headers: META });
    assert.equal(bad.status, 400);
    assert.deepEqual(json(bad.body), { error: 'invalid_request', error_description: 'Identity not found' });
    cluster.imds.failNext(50, { status: 500 });
    const down = await agentA.http(query().replace(encodeURIComponent(MGMT), 'https%3A%2F%2Fgraph.microsoft.com%2F'), { headers: META });
    assert.equal(down.status, 503, down.body);
    assert.ok(Number(down.headers['retry-after']) >= 1);
    assert.equal(typeof json(down.body).error, 'string');
    cluster.imds.failNext(0, { status: 500 });
  });

  test(`${server}: a deleted binding: the next request is refused and the cache entry is gone`, async () => {
    const ok = await agentB.http(query(), { headers: META });
    assert.equal(ok.status, 200);
    const cachedBefore = (await nmi.metric('nmi_tokens_cached')) ?? 0;
    cluster.writeBindings([
      crd.userAssigned('id-a', idA.client, idA.res),
      crd.userAssigned('id-b', idB.client, idB.res),
      crd.binding('bind-a', 'id-a', 'a'),
      crd.exception('legacy', { app: 'legacy' }),
    ]);
    await waitFor('binding removal to be seen', async () => {
      const r = await agentB.http(query(), { headers: META });
      return r.status === 400 ? r : undefined;
    });
    const r = await agentB.http(query(`&client_id=${idB.client}`), { headers: META });
    assert.deepEqual(json(r.body), { error: 'invalid_request', error_description: 'Identity not found' });
    const cachedAfter = (await nmi.metric('nmi_tokens_cached')) ?? 0;
    assert.ok(cachedAfter < cachedBefore, `cache shrank: ${cachedBefore} → ${cachedAfter}`);
  });
}
