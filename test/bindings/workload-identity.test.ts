// Federated identities (type 3) and Workload ID's own convention, as the
// bindings match them: served per service account (the pod's own), the label
// and annotations honoured, a binding winning over the convention.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { identitiesFor, workloadIdentity } from '../../src/bindings/match.js';
import { IdentityType, identityKey, identityNameOf } from '../../src/bindings/model.js';
import { parseIdentity, parseObjects } from '../../src/bindings/parse.js';
import { changedIdentities, createSnapshot, type BindingSnapshot } from '../../src/bindings/store.js';
import type { Pod } from '../../src/kubelet/pod.js';

const TENANT = '72f988bf-86f1-41af-91ab-2d7cd011db47';
const APP = 'aaaaaaaa-0000-0000-0000-00000000000f';

function pod(name: string, labels: Record<string, string>, serviceAccount?: string, namespace = 'apps'): Pod {
  return { uid: `uid-${name}`, namespace, name, labels, ips: ['10.0.0.9'], hostNetwork: false, phase: 'Running', nodeName: 'n', ...(serviceAccount && { serviceAccount }) };
}
const federated = (name = 'fed', spec: object = { type: 3, clientID: APP, tenantID: TENANT }) => ({
  apiVersion: 'aadpodidentity.k8s.io/v1',
  kind: 'AzureIdentity',
  metadata: { name, namespace: 'apps' },
  spec,
});
const binding = (identity: string, selector: string) => ({ apiVersion: 'aadpodidentity.k8s.io/v1', kind: 'AzureIdentityBinding', metadata: { name: `b-${identity}`, namespace: 'apps' }, spec: { azureIdentity: identity, selector } });
const account = (name: string, annotations: Record<string, string>, namespace = 'apps') => ({ apiVersion: 'v1', kind: 'ServiceAccount', metadata: { name, namespace, annotations } });

function snapshot(...objects: object[]): BindingSnapshot {
  const { errors, ...set } = parseObjects(objects);
  assert.deepEqual(errors, []);
  return createSnapshot(set);
}

test('type 3 parses with clientID and tenantID (and adEndpoint), no secret; without them it is refused by name', () => {
  const identity = parseIdentity(federated('fed', { type: 3, clientID: APP, tenantID: TENANT, adEndpoint: 'https://login.microsoftonline.us/' }));
  assert.equal(identity.type, IdentityType.Federated);
  assert.equal(identity.adEndpoint, 'https://login.microsoftonline.us');
  assert.equal(identity.clientPassword, undefined);
  assert.throws(() => parseIdentity(federated('fed', { type: 3, clientID: APP })), /AzureIdentity apps\/fed: spec\.tenantID is required/);
  assert.throws(() => parseIdentity(federated('fed', { type: 4, clientID: APP })), /3 \(federated, Workload ID\)/);
});

test('a federated identity is served per service account: two pods bound alike with different accounts get different identity keys', () => {
  const s = snapshot(federated(), binding('fed', 'web'));
  // One options object, as nmi run passes: answers are shared per (snapshot, options).
  const options = { forceNamespaced: false };
  const [a] = identitiesFor(pod('a', { aadpodidbinding: 'web' }, 'web-sa'), s, options).identities;
  const [b] = identitiesFor(pod('b', { aadpodidbinding: 'web' }, 'other-sa'), s, options).identities;
  const [a2] = identitiesFor(pod('a2', { aadpodidbinding: 'web' }, 'web-sa'), s, options).identities;
  const [none] = identitiesFor(pod('d', { aadpodidbinding: 'web' }), s, options).identities;
  assert.equal(a!.serviceAccount, 'apps/web-sa');
  assert.equal(identityKey(a!), 'apps/fed@apps/web-sa');
  assert.equal(identityKey(b!), 'apps/fed@apps/other-sa');
  assert.equal(none!.serviceAccount, 'apps/default', "Kubernetes' default account when the kubelet names none");
  assert.equal(a2, a, 'pods of one account share one identity object (the tables share their lists)');
  assert.equal(identityNameOf(identityKey(a!)), 'apps/fed');
  assert.notEqual(identityNameOf(identityKey(a!)), 'apps/fe');
});

test("Workload ID's convention: the label and the account's client id; the tenant from its annotation or the flag; otherwise why not", () => {
  const s = snapshot(
    account('wi', { 'azure.workload.identity/client-id': APP, 'azure.workload.identity/tenant-id': TENANT }),
    account('no-tenant', { 'azure.workload.identity/client-id': APP }),
    account('plain', {}),
  );
  const labelled = { 'azure.workload.identity/use': 'true' };
  const [served] = identitiesFor(pod('p', labelled, 'wi'), s, { forceNamespaced: false }).identities;
  assert.equal(served?.type, IdentityType.Federated);
  assert.equal(served?.clientID, APP);
  assert.equal(served?.tenantID, TENANT);
  assert.equal(served?.serviceAccount, 'apps/wi');
  assert.equal(identityKey(served!), 'apps/serviceaccount:wi@apps/wi');
  assert.deepEqual(identitiesFor(pod('q', {}, 'wi'), s, { forceNamespaced: false }).identities, [], 'no label, no identity');
  assert.deepEqual(identitiesFor(pod('r', labelled, 'no-tenant'), s, { forceNamespaced: false }).identities, []);
  assert.deepEqual(workloadIdentity(pod('r', labelled, 'no-tenant'), s, { forceNamespaced: false }), { why: 'no-tenant', serviceAccount: 'apps/no-tenant' });
  assert.equal(identitiesFor(pod('r2', labelled, 'no-tenant'), s, { forceNamespaced: false, workloadTenant: 'contoso.onmicrosoft.com' }).identities[0]?.tenantID, 'contoso.onmicrosoft.com');
  assert.deepEqual(workloadIdentity(pod('s', labelled, 'plain'), s, { forceNamespaced: false }), { why: 'not-annotated', serviceAccount: 'apps/plain' });
  assert.deepEqual(identitiesFor(pod('t', { 'azure.workload.identity/use': 'false' }, 'wi'), s, { forceNamespaced: false }).identities, []);
});

test('a binding wins over the convention; an annotation change invalidates the identity it stands for', () => {
  const objects = [
    account('wi', { 'azure.workload.identity/client-id': APP, 'azure.workload.identity/tenant-id': TENANT }),
    { ...federated('msi', { type: 0, clientID: '11111111-0000-0000-0000-000000000000' }) },
    binding('msi', 'web'),
  ];
  const s = snapshot(...objects);
  const both = pod('p', { 'azure.workload.identity/use': 'true', aadpodidbinding: 'web' }, 'wi');
  assert.deepEqual(identitiesFor(both, s, { forceNamespaced: false }).identities.map((i) => i.name), ['msi']);
  const changed = snapshot(account('wi', { 'azure.workload.identity/client-id': 'bbbbbbbb-0000-0000-0000-00000000000f', 'azure.workload.identity/tenant-id': TENANT }), ...objects.slice(1));
  assert.deepEqual([...changedIdentities(s, changed)], ['apps/serviceaccount:wi']);
});
