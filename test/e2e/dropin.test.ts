// What clusters moving from aad-pod-identity's NMI rely on, end to end: pods in
// their own namespaces asking 169.254.169.254 through the real rules, nmi
// reading the custom resources from the API server as a cluster runs it (each
// object judged alone), the kubelet, IMDS and two Entra IDs (the default
// authority host and another cloud's) as stand-ins over real TLS.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { createCluster, crd, TOKEN_URL, type Cluster, type ClusterPod } from '../harness/cluster.js';
import { nodeScriptInPod, type PodAgent } from '../harness/netns.js';
import type { NmiProcess } from '../harness/nmi-process.js';
import { startApiServer, type ApiServer, type KubeObject } from '../standins/apiserver.js';
import { startEntra, type EntraStandin } from '../standins/entra.js';
import { decodeStandinToken } from '../standins/imds.js';

const VAULT = 'https://vault.azure.net';
const query = (extra = '') => `${TOKEN_URL}?api-version=2018-02-01&resource=${encodeURIComponent(VAULT)}${extra}`;
const META = { Metadata: 'true' };
const msi = (n: number) => ({
  client: `${n}${n}${n}${n}${n}${n}${n}${n}-0000-0000-0000-000000000000`,
  res: `/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id${n}`,
});
const [alpha, beta, zeta] = [msi(1), msi(2), msi(3)];
const TENANT = '72f988bf-86f1-41af-91ab-2d7cd011db47';
const gov = { tenantId: TENANT, clientId: 'aaaaaaaa-0000-0000-0000-00000000000a', clientSecret: 'gov-secret-value' };
const plain = { tenantId: TENANT, clientId: 'aaaaaaaa-0000-0000-0000-00000000000b', clientSecret: 'plain-secret-value' };

let cluster: Cluster;
let apiServer: ApiServer;
let kubeconfig: string;
let entra: EntraStandin;
let otherCloud: EntraStandin;
let nmi: NmiProcess;
const agents: Record<string, PodAgent> = {};
let multi: ClusterPod;

const json = (body: string) => JSON.parse(body) as Record<string, string>;

/**
 * As a cluster moving from NMI would run it: a binding in the shared namespace serves pods of others, and the other
 * cloud's stand-in is allowed as an adEndpoint (a real sovereign cloud's Entra ID host needs no flag).
 */
function startNmi(extra: string[] = []): Promise<NmiProcess> {
  const nmiReach = ['--shared-identity-namespaces', 'shared', '--aad-endpoint-allow', new URL(otherCloud.url).host];
  const flags = ['--bindings', 'kubernetes', '--kubeconfig', kubeconfig, '--aad-authority-host', entra.url, ...nmiReach, ...extra];
  return cluster.startNmi(flags, { env: { ...process.env, NODE_EXTRA_CA_CERTS: cluster.pki.caFile } });
}

before(async () => {
  cluster = await createCluster();
  entra = await startEntra({ pki: cluster.pki });
  otherCloud = await startEntra({ pki: cluster.pki });
  apiServer = await startApiServer({ pki: cluster.pki });
  kubeconfig = apiServer.writeKubeconfig(cluster.bindingsDir);
  // The app of the other cloud is not known to the default authority host: asking there would be a 400.
  otherCloud.register(gov);
  entra.register(plain);
  multi = cluster.addPod({ name: 'multi', namespace: 'apps', labels: { aadpodidbinding: 'multi' } });
  const pods = {
    multi,
    sovereign: cluster.addPod({ name: 'sovereign', labels: { aadpodidbinding: 'gov' } }),
    plain: cluster.addPod({ name: 'plain', labels: { aadpodidbinding: 'plain' } }),
    broken: cluster.addPod({ name: 'broken', labels: { aadpodidbinding: 'broken' } }),
    ambiguous: cluster.addPod({ name: 'ambiguous', labels: { aadpodidbinding: 'ambiguous' } }),
  };
  const sp = (name: string, app: { clientId: string }, secret: string, extra: Record<string, unknown> = {}) => {
    const identity = crd.servicePrincipal(name, TENANT, app.clientId, secret);
    return { ...identity, spec: { ...identity.spec, ...extra } };
  };
  const objects: KubeObject[] = [
    // Three identities for one pod: its own namespace's first, then by name, so apps/beta, though shared/alpha sorts first.
    crd.userAssigned('zeta', zeta.client, zeta.res, 'apps'),
    crd.userAssigned('beta', beta.client, beta.res, 'apps'),
    crd.userAssigned('alpha', alpha.client, alpha.res, 'shared'),
    crd.binding('bind-zeta', 'zeta', 'multi', 'apps'),
    crd.binding('bind-beta', 'beta', 'multi', 'apps'),
    crd.binding('bind-alpha', 'alpha', 'multi', 'shared'),
    // Another cloud's service principal; its Secret's one key is not called clientSecret (NMI took any).
    sp('gov-sp', gov, 'gov-secret', { adEndpoint: `${otherCloud.url}/` }),
    crd.secret('gov-secret', { password: gov.clientSecret }),
    crd.binding('bind-gov', 'gov-sp', 'gov'),
    sp('plain-sp', plain, 'plain-secret'),
    crd.secret('plain-secret', { clientSecret: plain.clientSecret, note: 'rotated monthly' }),
    crd.binding('bind-plain', 'plain-sp', 'plain'),
    // An adEndpoint that is not https: that identity alone is refused.
    sp('insecure-sp', plain, 'plain-secret', { adEndpoint: 'http://login.example.test/' }),
    crd.binding('bind-insecure', 'insecure-sp', 'broken'),
    // Two keys, neither clientSecret: nmi cannot tell which is the secret.
    sp('ambiguous-sp', plain, 'ambiguous-secret'),
    crd.secret('ambiguous-secret', { first: 'a', second: 'b' }),
    crd.binding('bind-ambiguous', 'ambiguous-sp', 'ambiguous'),
  ];
  for (const object of objects) apiServer.put(object);
  nmi = await startNmi();
  for (const [name, pod] of Object.entries(pods)) agents[name] = await pod.ns.agent();
});

after(async () => {
  await Promise.all(Object.values(agents).map((agent) => agent.close()));
  await otherCloud?.close();
  await entra?.close();
  await apiServer?.close();
  await cluster?.close();
});

test('several identities and none requested: the first in the documented order, as NMI answered, and the log says which', async () => {
  for (let i = 0; i < 3; i++) {
    const r = await agents.multi!.http(query(), { headers: META });
    assert.equal(r.status, 200, r.body);
    assert.equal(json(r.body).client_id, beta.client);
  }
  // Naming one still gets that one, from any namespace it is bound from.
  const named = await agents.multi!.http(query(`&client_id=${alpha.client}`), { headers: META });
  assert.equal(json(named.body).client_id, alpha.client);
  const said = nmi.output().split('\n').filter((line) => line.includes('several identities bound'));
  assert.equal(said.length, 1, nmi.output());
  assert.deepEqual(JSON.parse(said[0]!).bound, ['apps/beta', 'apps/zeta', 'shared/alpha']);
});

test("msal-node's ManagedIdentityApplication asking for no particular identity gets the first", async () => {
  // A system-assigned request, as an app written for a VM makes it.
  const script = `
    import { ManagedIdentityApplication } from '@azure/msal-node';
    const r = await new ManagedIdentityApplication().acquireToken({ resource: '${VAULT}' });
    console.log(r.accessToken);`;
  const stdout = await nodeScriptInPod(multi.ns, script, { AZURE_POD_IDENTITY_AUTHORITY_HOST: '' });
  assert.equal(decodeStandinToken(stdout.trim()).identity, `client_id:${beta.client}`);
});

test("adEndpoint: the service principal's token comes from its own cloud's Entra ID, with the Secret's only key", async () => {
  const before = { entra: entra.calls, other: otherCloud.calls };
  const r = await agents.sovereign!.http(query(), { headers: META });
  assert.equal(r.status, 200, r.body);
  assert.equal(decodeStandinToken(json(r.body).access_token!).identity, `sp:${TENANT}/${gov.clientId}`);
  assert.deepEqual({ entra: entra.calls, other: otherCloud.calls }, { entra: before.entra, other: before.other + 1 });
  assert.equal(otherCloud.requests.at(-1)?.path, `/${TENANT}/oauth2/v2.0/token`);
});

test('a Secret with several keys: clientSecret is the one; the default authority host without adEndpoint', async () => {
  const before = entra.calls;
  const r = await agents.plain!.http(query(), { headers: META });
  assert.equal(r.status, 200, r.body);
  assert.equal(decodeStandinToken(json(r.body).access_token!).identity, `sp:${TENANT}/${plain.clientId}`);
  assert.equal(entra.calls, before + 1);
});

test('a bad adEndpoint rejects that identity alone, named in the log', async () => {
  const r = await agents.broken!.http(query(), { headers: META });
  assert.equal(r.status, 400, r.body);
  assert.deepEqual(json(r.body), { error: 'invalid_request', error_description: 'Identity not found' });
  assert.match(nmi.output(), /AzureIdentity default\/insecure-sp: spec\.adEndpoint must be an https URL/);
});

test('a Secret with several keys and no clientSecret: a clear 500 for that pod, the reason in the log, no value anywhere', async () => {
  const r = await agents.ambiguous!.http(query(), { headers: META });
  assert.equal(r.status, 500, r.body);
  assert.equal(json(r.body).error_description, "The identity bound to this pod cannot be used as configured; the node agent's log says why");
  assert.match(nmi.output(), /secret default\/ambiguous-secret has 2 keys and none is clientSecret/);
  for (const secret of [gov.clientSecret, plain.clientSecret]) assert.ok(!nmi.output().includes(secret));
});

test("IMDS being updated (410, then 404): the pod's request waits and gets its token, never the 4xx", async () => {
  const calls = cluster.imds.calls;
  cluster.imds.failNext(2, { status: 410, body: { error: 'gone', error_description: 'IMDS is being updated' } });
  cluster.imds.failNext(1, { status: 404 });
  const r = await agents.multi!.http(query(`&client_id=${zeta.client}`), { headers: META });
  assert.equal(r.status, 200, r.body);
  assert.equal(json(r.body).client_id, zeta.client);
  assert.equal(cluster.imds.calls, calls + 4);
});

test('--multiple-identities refuse: IMDS\'s own 400 for several identities and none requested', async () => {
  assert.equal(await nmi.stop(), 0);
  nmi = await startNmi(['--multiple-identities', 'refuse']);
  const r = await agents.multi!.http(query(), { headers: META });
  assert.equal(r.status, 400, r.body);
  assert.deepEqual(json(r.body), {
    error: 'invalid_request',
    error_description: 'Multiple user assigned identities exist, please specify the clientId / resourceId of the identity in the token request',
  });
  const named = await agents.multi!.http(query(`&client_id=${zeta.client}`), { headers: META });
  assert.equal(named.status, 200, named.body);
  assert.equal(json(named.body).client_id, zeta.client);
});
