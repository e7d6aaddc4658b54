// How a pod gets a token (src/tokens/pod-tokens.ts), over the real msal
// provider, a stand-in IMDS and a stand-in Entra ID: the budget each identity's
// calls wait in, the credential each signs in with, and what `retain` keeps.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { parseObjects } from '../../src/bindings/parse.js';
import { KubeBindingSource } from '../../src/bindings/kube-source.js';
import { BindingStore, createSnapshot, type BindingSnapshot } from '../../src/bindings/store.js';
import { Budgets } from '../../src/budget/budgets.js';
import { codes, isNmiError } from '../../src/errors/errors.js';
import type { Pod } from '../../src/kubelet/pod.js';
import { MsalTokenProvider } from '../../src/tokens/msal-provider.js';
import { NetworkClient } from '../../src/tokens/network-client.js';
import { PodTokens } from '../../src/tokens/pod-tokens.js';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { captureLogs } from '../harness/log-capture.js';
import { startApiServer, type ApiServer, type KubeObject } from '../standins/apiserver.js';
import { startEntra, type EntraStandin } from '../standins/entra.js';
import { startImds, type ImdsStandin } from '../standins/imds.js';
import { createPki, type Pki } from '../standins/pki.js';

const api = 'aadpodidentity.k8s.io/v1';
const limits = { maxConcurrent: 5, ratePerSec: 100 };
const resource = 'https://vault.azure.net';

let imds: ImdsStandin;
let entra: EntraStandin;
let pki: Pki;
let network: NetworkClient;
let provider: MsalTokenProvider;

before(async () => {
  pki = createPki('pod-tokens');
  imds = await startImds();
  entra = await startEntra({ pki });
  entra.register({ tenantId: 'tenant-a', clientId: 'sp-client', clientSecret: 's3cret' });
  network = new NetworkClient({ ca: entra.caPem, headersTimeoutMs: 2000 });
  provider = new MsalTokenProvider({ upstreamImds: imds.url, aadAuthorityHost: entra.url, network });
});

after(async () => {
  await network.close();
  await imds.close();
  await entra.close();
  pki.remove();
});

function pod(name: string, selector: string, serviceAccount?: string): Pod {
  return { uid: `uid-${name}`, namespace: 'apps', name, labels: { aadpodidbinding: selector }, ips: ['10.0.0.9'], hostNetwork: false, phase: 'Running', nodeName: 'n', serviceAccount };
}

function snapshot(objects: object[]): BindingSnapshot {
  const { errors, ...valid } = parseObjects(objects);
  assert.deepEqual(errors, []);
  return createSnapshot(valid);
}

const objects = [
  { apiVersion: api, kind: 'AzureIdentity', metadata: { name: 'msi', namespace: 'apps' }, spec: { type: 0, clientID: '00000000-0000-0000-0000-00000000a001' } },
  { apiVersion: api, kind: 'AzureIdentityBinding', metadata: { name: 'msi-b', namespace: 'apps' }, spec: { azureIdentity: 'msi', selector: 'msi' } },
  { apiVersion: api, kind: 'AzureIdentity', metadata: { name: 'sp', namespace: 'apps' }, spec: { type: 1, tenantID: 'tenant-a', clientID: 'sp-client', clientPassword: { name: 'sp-secret', namespace: 'apps' } } },
  { apiVersion: api, kind: 'AzureIdentityBinding', metadata: { name: 'sp-b', namespace: 'apps' }, spec: { azureIdentity: 'sp', selector: 'sp' } },
  { apiVersion: api, kind: 'AzureIdentity', metadata: { name: 'fed', namespace: 'apps' }, spec: { type: 3, tenantID: 'tenant-a', clientID: 'fed-client' } },
  { apiVersion: api, kind: 'AzureIdentityBinding', metadata: { name: 'fed-b', namespace: 'apps' }, spec: { azureIdentity: 'fed', selector: 'fed' } },
  { apiVersion: 'v1', kind: 'Secret', metadata: { name: 'sp-secret', namespace: 'apps' }, stringData: { clientSecret: 's3cret' } },
];

function podTokens(listed: Pod[], options: { bindingsReady?: boolean } = {}) {
  const budgets = new Budgets({ imds: limits, imdsMetadata: limits, entra: limits, maxPendingPerPod: 100, maxWaitMs: 10_000 });
  const bindings = { snapshot: snapshot(objects), ready: options.bindingsReady ?? true };
  const pods = { pods: () => listed, knownUid: (uid: string) => listed.find((p) => p.uid === uid), ready: true };
  const tokens = new PodTokens({ pods, bindings, match: { forceNamespaced: false }, provider, budgets, maxTokensPerPod: 10, log: captureLogs('warn').log });
  return { tokens, budgets, bindings };
}

test("a user-assigned identity's calls wait in IMDS's budget, a service principal's in its tenant's, signed in with its Secret", async () => {
  const msiPod = pod('a', 'msi');
  const spPod = pod('b', 'sp');
  const { tokens, budgets } = podTokens([msiPod, spPod]);
  const [msi] = tokens.identitiesOf(msiPod).identities;
  const [sp] = tokens.identitiesOf(spPod).identities;
  assert.ok(msi && sp);

  assert.ok((await tokens.get(msi, resource, msiPod)).accessToken);
  assert.equal(budgets.imds.stats().granted, 1);
  assert.deepEqual([...budgets.all()].filter(([upstream]) => upstream === 'entra'), []);

  const callsBefore = entra.calls;
  assert.ok((await tokens.get(sp, resource, spPod)).accessToken);
  assert.equal(entra.calls - callsBefore, 1, 'the client secret from the Secret did not sign in at the stand-in Entra ID');
  const tenants = [...budgets.all()].filter(([upstream]) => upstream === 'entra').map(([, budget]) => budget.stats().granted);
  assert.deepEqual(tenants, [1]);
  assert.equal(budgets.imds.stats().granted, 1);

  // A hit is peeked without waiting, and never reaches a budget.
  assert.ok(tokens.peek(sp, resource));
  await tokens.get(sp, resource, spPod);
  assert.equal(entra.calls - callsBefore, 1);
});

test('a federated identity with no API server to ask for service-account tokens is unusable, said plainly', async () => {
  const fedPod = pod('c', 'fed', 'builder');
  const { tokens } = podTokens([fedPod]);
  const [fed] = tokens.identitiesOf(fedPod).identities;
  assert.ok(fed);
  const err = await tokens.get(fed, resource, fedPod).then(() => assert.fail('served'), (e: unknown) => e);
  assert.ok(isNmiError(err, codes.TOKEN), String(err));
  assert.match((err as Error).message, /federated identities need the API server/);
});

test('retain keeps tokens of identities a pod of the node uses, and drops nothing before the bindings are synced', async () => {
  const msiPod = pod('d', 'msi');
  const listed = [msiPod];
  const synced = podTokens(listed, { bindingsReady: false });
  const [msi] = synced.tokens.identitiesOf(msiPod).identities;
  assert.ok(msi);
  await synced.tokens.get(msi, resource, msiPod);
  listed.length = 0;
  synced.tokens.retain();
  assert.ok(synced.tokens.peek(msi, resource), 'dropped before the bindings were synced');
  synced.bindings.ready = true;
  listed.push(msiPod);
  synced.tokens.retain();
  assert.ok(synced.tokens.peek(msi, resource), 'dropped while its pod still runs');
  listed.length = 0;
  synced.tokens.retain();
  assert.equal(synced.tokens.peek(msi, resource), undefined, 'kept with no pod using it');
});

interface KubeNode {
  api: ApiServer;
  store: BindingStore;
  tokens: PodTokens;
  /** The pods the kubelet lists. */
  listed: Pod[];
}

/** PodTokens over bindings from a stand-in API server holding `objects`, as `nmi run --bindings kubernetes` wires them. */
async function withKubeNode(objects: object[], run: (node: KubeNode) => Promise<void>): Promise<void> {
  const api = await startApiServer({ pki });
  const dir = mkdtempSync(path.join(tmpdir(), 'nmi-pod-tokens-'));
  const log = captureLogs('warn').log;
  const store = new BindingStore(new KubeBindingSource(log, { kubeconfig: api.writeKubeconfig(dir) }), log);
  try {
    for (const object of objects) api.put(object as KubeObject);
    await store.start();
    await store.whenReady();
    const listed: Pod[] = [];
    const pods = { pods: () => listed, knownUid: (uid: string) => listed.find((p) => p.uid === uid), ready: true };
    const budgets = new Budgets({ imds: limits, imdsMetadata: limits, entra: limits, maxPendingPerPod: 100, maxWaitMs: 10_000 });
    const tokens = new PodTokens({ pods, bindings: store, match: { forceNamespaced: false }, provider, budgets, maxTokensPerPod: 10, log });
    await run({ api, store, tokens, listed });
  } finally {
    store.stop();
    await api.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

test("a Secret is read for the node's pods only: at retain for those listed, and when a pod not yet retained first asks, which waits for it", () =>
  withKubeNode(objects, async ({ api, store, tokens }) => {
    tokens.retain();
    await store.settled();
    const secretGets = () => api.requests.filter((r) => r.resource === 'secrets').length;
    assert.equal(secretGets(), 0, 'a Secret was read with no pod of the node bound to its identity');
    // A pod nmi has not retained yet asks: its identity's Secret is read now, and the request waits for it.
    const late = pod('late', 'sp');
    const [sp] = tokens.identitiesOf(late).identities;
    assert.ok(sp);
    assert.ok((await tokens.get(sp, resource, late)).accessToken);
    assert.equal(secretGets(), 1);
    // Gone from the node: the Secret goes with it.
    tokens.retain();
    await store.settled();
    assert.equal(store.snapshot.secrets.size, 0);
  }));

const workloadAccount = { apiVersion: 'v1', kind: 'ServiceAccount', metadata: { name: 'wi-sa', namespace: 'apps', annotations: { 'azure.workload.identity/client-id': 'wi-client', 'azure.workload.identity/tenant-id': 'tenant-a' } } };

test("a Workload ID pod's ServiceAccount is read for the node's pods only: at retain for those listed, and when a pod just listed asks first, which waits for it", () =>
  withKubeNode([workloadAccount], async ({ api, store, tokens, listed }) => {
    const workload = (name: string): Pod => ({ ...pod(name, '', 'wi-sa'), labels: { 'azure.workload.identity/use': 'true' } });
    const reads = () => api.requests.filter((r) => r.resource === 'serviceaccounts').length;
    listed.push(pod('plain', 'none'));
    tokens.retain();
    await store.settled();
    assert.equal(reads(), 0, 'a ServiceAccount was read with no Workload ID pod on the node');
    // Listed a moment ago, not yet retained, and asking: its account is read now, and the request waits for it.
    const early = workload('early');
    await tokens.settle(early);
    assert.equal(reads(), 1);
    assert.deepEqual(tokens.identitiesOf(early).identities.map((i) => i.clientID), ['wi-client']);
    // Retained with it on the node: nothing read again; gone: forgotten.
    listed.push(early);
    tokens.retain();
    await tokens.settle(early);
    assert.equal(reads(), 1);
    listed.length = 0;
    tokens.retain();
    await store.settled();
    assert.equal(store.snapshot.serviceAccounts.size, 0);
  }));
