// Workload ID federation end to end: pods in their own namespaces ask
// 169.254.169.254 through the real rules; nmi requests each calling pod's own
// service-account token from the stand-in API server (TokenRequest, RS256, OIDC
// discovery) and exchanges it at the stand-in Entra ID, which validates it for
// real against the API server's JWKS and its federated identity credentials.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { crd, TOKEN_URL, type ClusterPod } from '../harness/cluster.js';
import { createFederatedNode, TENANT, type FederatedNode } from '../harness/federation.js';
import { nodeScriptInPod, type PodAgent } from '../harness/netns.js';
import { nmiAsync, type NmiProcess } from '../harness/nmi-process.js';
import { waitFor } from '../harness/wait-for.js';
import type { ApiServer, KubeObject } from '../standins/apiserver.js';
import type { EntraStandin } from '../standins/entra.js';
import { decodeStandinToken } from '../standins/imds.js';

const VAULT = 'https://vault.azure.net';
const STORAGE = 'https://storage.azure.com';
const query = (resource = VAULT) => `${TOKEN_URL}?api-version=2018-02-01&resource=${encodeURIComponent(resource)}`;
const META = { Metadata: 'true' };
const APP = 'aaaaaaaa-0000-0000-0000-0000000000fe';
const WI_APP = 'bbbbbbbb-0000-0000-0000-0000000000fe';

let node: FederatedNode;
let api: ApiServer;
let entra: EntraStandin;
let daemon: NmiProcess;
const pods: Record<string, ClusterPod> = {};
const agents: Record<string, PodAgent> = {};

type Json = Record<string, any>;
const json = (body: string) => JSON.parse(body) as Json;
const subjectOf = (pod: ClusterPod) => node.subjectOf(pod);
const madeFrom = (accessToken: string) => decodeStandinToken(accessToken).identity;

before(async () => {
  node = await createFederatedNode();
  ({ api, entra } = node);
  pods.a = node.addPod({ name: 'fed-a', namespace: 'apps', labels: { aadpodidbinding: 'fed' }, serviceAccount: 'sa-a' });
  pods.b = node.addPod({ name: 'fed-b', namespace: 'apps', labels: { aadpodidbinding: 'fed' }, serviceAccount: 'sa-b' });
  const annotations = { 'azure.workload.identity/client-id': WI_APP, 'azure.workload.identity/tenant-id': TENANT };
  pods.wi = node.addPod({ name: 'wi', namespace: 'apps', labels: { 'azure.workload.identity/use': 'true' }, serviceAccount: 'wi-sa', annotations });
  api.put({ apiVersion: 'aadpodidentity.k8s.io/v1', kind: 'AzureIdentity', metadata: { name: 'fed', namespace: 'apps' }, spec: { type: 3, clientID: APP, tenantID: TENANT } } as KubeObject);
  api.put(crd.binding('fed-binding', 'fed', 'fed', 'apps') as KubeObject);
  // Only sa-a is trusted by the app: sa-b's pod is bound to the same identity, and must never get its tokens.
  entra.federate({ tenantId: TENANT, clientId: APP, issuer: api.issuer, subject: subjectOf(pods.a) });
  entra.federate({ tenantId: TENANT, clientId: WI_APP, issuer: api.issuer, subject: subjectOf(pods.wi) });
  daemon = await node.startNmi();
  for (const [name, pod] of Object.entries(pods)) agents[name] = await pod.ns.agent();
});

after(async () => {
  await Promise.all(Object.values(agents).map((agent) => agent.close()));
  await node?.close();
});

test("a pod bound to a type 3 identity: msal-node's ManagedIdentityApplication gets an Entra token made from the pod's own service account", async () => {
  const script = `
    import { ManagedIdentityApplication } from '@azure/msal-node';
    const r = await new ManagedIdentityApplication().acquireToken({ resource: '${VAULT}' });
    console.log(JSON.stringify({ token: r.accessToken, expiresOn: r.expiresOn }));`;
  const out = JSON.parse(await nodeScriptInPod(pods.a!.ns, script, { AZURE_POD_IDENTITY_AUTHORITY_HOST: '' })) as { token: string; expiresOn: string };
  assert.equal(madeFrom(out.token), `fic:${TENANT}/${APP}/${subjectOf(pods.a!)}`);
  assert.ok(Date.parse(out.expiresOn) > Date.now() + 30 * 60_000);
  // The token request was for that pod: its service account, bound to it, for Entra ID's exchange audience, short-lived.
  const asked = api.tokenRequests.filter((r) => r.serviceAccount === 'sa-a');
  assert.equal(asked.length, 1);
  assert.deepEqual(asked[0]!.boundObjectRef, { kind: 'Pod', apiVersion: 'v1', name: 'fed-a', uid: pods.a!.uid });
  assert.deepEqual(asked[0]!.audiences, ['api://AzureADTokenExchange']);
  assert.equal(asked[0]!.expirationSeconds, 600);
  assert.equal(asked[0]!.namespace, 'apps');
});

test("a pod of a service account with no federated credential gets IMDS's 400 naming the cause, never the other pod's token", async () => {
  const r = await agents.b!.http(query(), { headers: META });
  assert.equal(r.status, 400, r.body);
  assert.equal(r.headers['content-type'], 'application/json; charset=utf-8');
  const body = json(r.body);
  assert.deepEqual(Object.keys(body), ['error', 'error_description']);
  assert.match(body.error_description, /^Workload identity federation failed for apps\/fed: no federated identity credential of app aaaaaaaa-0000-0000-0000-0000000000fe \(tenant [^)]+\) matches service account apps\/sa-b/);
  assert.match(body.error_description, /subject system:serviceaccount:apps:sa-b/);
  assert.match(body.error_description, /Entra ID: AADSTS700213/);
  // The request for it was made from sa-b's own token, bound to fed-b.
  assert.deepEqual(api.tokenRequests.filter((t) => t.serviceAccount === 'sa-b').map((t) => t.boundObjectRef?.name), ['fed-b']);
  // A's token is cached (and in the native tables) by now; B still never gets it.
  const a = await agents.a!.http(query(), { headers: META });
  assert.equal(a.status, 200, a.body);
  for (let i = 0; i < 5; i++) {
    const again = await agents.b!.http(query(), { headers: META });
    assert.equal(again.status, 400, again.body);
    assert.ok(!again.body.includes(json(a.body).access_token));
  }
  for (const t of api.tokenRequests) {
    assert.equal(t.boundObjectRef?.name === 'fed-a', t.serviceAccount === 'sa-a', 'each token bound to a pod of its own account');
  }
});

test("cache hits for a federated identity are served by the native fast path, one exchange per (account, resource)", async () => {
  const before = (await daemon.metric('nmi_native_requests_total{result="hit"}')) ?? 0;
  const exchanges = entra.calls;
  const counts = await agents.a!.burst(query(), 50, META);
  assert.deepEqual(Object.keys(counts).map((k) => k.slice(0, 3)), ['200']);
  assert.ok(((await daemon.metric('nmi_native_requests_total{result="hit"}')) ?? 0) >= before + 40, 'answered in C++');
  assert.equal(entra.calls, exchanges, 'no new exchange');
  // Another resource is another exchange, and another token request.
  const storage = await agents.a!.http(query(STORAGE), { headers: META });
  assert.equal(storage.status, 200, storage.body);
  assert.equal(json(storage.body).resource, STORAGE);
  assert.equal(entra.calls, exchanges + 1);
});

test("Workload ID's own convention: the pod's label and its service account's annotations, no binding", async () => {
  const r = await agents.wi!.http(query(), { headers: META });
  assert.equal(r.status, 200, r.body);
  assert.equal(madeFrom(json(r.body).access_token), `fic:${TENANT}/${WI_APP}/${subjectOf(pods.wi!)}`);
  assert.equal(json(r.body).client_id, WI_APP);
  const explained = json((await nmiAsync(['explain', 'apps/wi', '--json'])).stdout);
  assert.equal(explained.workloadIdentity.used, true);
  assert.equal(explained.identities[0].type, 'federated through Workload ID (3)');
  assert.equal(explained.identities[0].serviceAccount, 'apps/wi-sa');
  const fed = json((await nmiAsync(['explain', 'apps/fed-a', '--json'])).stdout);
  assert.equal(fed.pod.serviceAccount, 'apps/sa-a');
  assert.equal(fed.identities[0].serviceAccount, 'apps/sa-a');
  assert.match(fed.workloadIdentity.reason, /not labelled azure\.workload\.identity\/use/);
});

test('an expired service-account token: the 400 says to check the clocks (AADSTS700024)', async () => {
  api.tokenClockSkewSec = -7200;
  try {
    const r = await agents.a!.http(query('https://management.azure.com/'), { headers: META });
    assert.equal(r.status, 400, r.body);
    assert.match(json(r.body).error_description, /outside its valid time .* check the clocks .*Entra ID: AADSTS700024/);
  } finally {
    api.tokenClockSkewSec = 0;
  }
});

test('the annotation gone, seen when the account is read again (a new pod of it starts): the identity it stood for is no longer served, cached token and all', async () => {
  api.put({ apiVersion: 'v1', kind: 'ServiceAccount', metadata: { name: 'wi-sa', namespace: 'apps' } });
  // nmi reads a ServiceAccount for this node's pods only, never watches them: a new pod of the account reads it again.
  const reads = api.requests.filter((r) => r.resource === 'serviceaccounts').length;
  pods.wi2 = node.addPod({ name: 'wi-2', namespace: 'apps', labels: { 'azure.workload.identity/use': 'true' }, serviceAccount: 'wi-sa' });
  await waitFor('the account read again', () => api.requests.filter((r) => r.resource === 'serviceaccounts').length > reads);
  await waitFor('the Workload ID identity withdrawn', async () => {
    const r = await agents.wi!.http(query(), { headers: META });
    return r.status === 400 && json(r.body).error_description === 'Identity not found';
  });
});

test('no service-account token, assertion or access token in the log', async () => {
  const output = daemon.output();
  assert.ok(api.tokenRequests.length >= 4);
  for (const t of api.tokenRequests) if (t.token) assert.ok(!output.includes(t.token), 'a service-account token was logged');
  for (const t of api.tokenRequests) if (t.token) assert.ok(!output.includes(t.token.split('.')[2]!), 'a signature was logged');
  const r = await agents.a!.http(query(), { headers: META });
  assert.ok(!output.includes(json(r.body).access_token));
  assert.ok(entra.requests.every((req) => !JSON.stringify(req).includes(api.tokenRequests[0]!.token!)), 'the stand-in redacts assertions too');
});

test("--token-request-kubeconfig: the kubelet's credential asks for the node's pods' tokens, and nmi's own needs no serviceaccounts/token", async () => {
  await daemon.stop('SIGTERM');
  // nmi's own credential may no longer request tokens: as without the cluster-wide grant.
  api.failNext(1_000_000, 403, '/api/v1/namespaces/apps/serviceaccounts/');
  const dir = node.cluster.bindingsDir;
  const own = await node.startNmi(['--token-request-kubeconfig', api.writeNodeKubeconfig(dir, 'node1')]);
  try {
    const before = api.tokenRequests.length;
    const r = await agents.a!.http(query(STORAGE), { headers: META });
    assert.equal(r.status, 200, r.body);
    assert.equal(madeFrom(json(r.body).access_token), `fic:${TENANT}/${APP}/${subjectOf(pods.a!)}`);
    assert.equal(api.tokenRequests.length, before + 1);
    assert.equal(api.tokenRequests.at(-1)!.status, 201);
  } finally {
    await own.stop('SIGTERM');
  }
  // Another node's kubelet credential cannot ask for this node's pods: what the Node authorizer allows, no more.
  const other = await node.startNmi(['--token-request-kubeconfig', api.writeNodeKubeconfig(dir, 'node2')]);
  try {
    const r = await agents.a!.http(query(STORAGE), { headers: META });
    assert.equal(r.status, 500, r.body);
    assert.equal(api.tokenRequests.at(-1)!.status, 403);
  } finally {
    await other.stop('SIGTERM');
  }
});
