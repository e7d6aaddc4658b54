import { test } from 'node:test';
import assert from 'node:assert/strict';
import { codes, isNmiError } from '../../src/errors/errors.js';
import {
  parseBinding,
  parseException,
  parseIdentity,
  parseObject,
  parseObjects,
  parseSecret,
} from '../../src/bindings/parse.js';

const crd = 'aadpodidentity.k8s.io/v1';
const CLIENT = '00000000-0000-0000-0000-00000000000a';
const TENANT = '00000000-0000-0000-0000-00000000000b';
const RES = '/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id';

function identity(spec: Record<string, unknown>, metadata: Record<string, unknown> = {}): object {
  return { apiVersion: crd, kind: 'AzureIdentity', metadata: { name: 'id', namespace: 'ns', ...metadata }, spec };
}

function rejects(fn: () => unknown, pattern: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(isNmiError(err, codes.BINDINGS), `want NmiError BINDINGS, got ${String(err)}`);
    assert.match(err.message, pattern);
    return true;
  });
}

test('type 0 identity with clientID, resourceID or both', () => {
  const a = parseIdentity(identity({ type: 0, clientID: CLIENT }));
  assert.deepEqual(
    { name: a.name, namespace: a.namespace, type: a.type, clientID: a.clientID, resourceID: a.resourceID, namespaced: a.namespaced },
    { name: 'id', namespace: 'ns', type: 0, clientID: CLIENT, resourceID: '', namespaced: false },
  );
  assert.equal(a.clientPassword, undefined);
  assert.equal(parseIdentity(identity({ type: 0, resourceID: RES })).resourceID, RES);
  const both = parseIdentity(identity({ type: 0, resourceID: RES, clientID: CLIENT }));
  assert.equal(both.clientID, CLIENT);
  assert.equal(both.resourceID, RES);
});

test('field names match case-insensitively, as Go reads them', () => {
  const id = parseIdentity(identity({ type: 0, ClientID: CLIENT, ResourceID: RES }));
  assert.equal(id.clientID, CLIENT);
  assert.equal(id.resourceID, RES);
  const b = parseBinding({ apiVersion: crd, kind: 'AzureIdentityBinding', metadata: { name: 'b' }, spec: { AzureIdentity: 'id', Selector: 'sel' } });
  assert.equal(b.azureIdentity, 'id');
  assert.equal(b.selector, 'sel');
});

test('the namespaced annotation sets namespaced; other values do not', () => {
  assert.equal(parseIdentity(identity({ type: 0, clientID: CLIENT }, { annotations: { 'aadpodidentity.k8s.io/Behavior': 'namespaced' } })).namespaced, true);
  assert.equal(parseIdentity(identity({ type: 0, clientID: CLIENT }, { annotations: { 'aadpodidentity.k8s.io/Behavior': 'other' } })).namespaced, false);
});

test('type 0 needs clientID or resourceID, and resourceID must be an ARM id', () => {
  rejects(() => parseIdentity(identity({ type: 0 })), /^AzureIdentity ns\/id: type 0 needs spec.clientID or spec.resourceID$/);
  rejects(() => parseIdentity(identity({ type: 0, resourceID: 'not-an-arm-id' })), /AzureIdentity ns\/id: spec.resourceID/);
  rejects(() => parseIdentity(identity({ type: 0, clientID: 42 })), /spec.clientID must be a string/);
});

test('type 1 and 2 need tenantID, clientID and clientPassword {name, namespace}', () => {
  const ok = { tenantID: TENANT, clientID: CLIENT, clientPassword: { name: 'sp', namespace: 'secrets' } };
  for (const type of [1, 2]) {
    const id = parseIdentity(identity({ type, ...ok }));
    assert.equal(id.type, type);
    assert.equal(id.tenantID, TENANT);
    assert.deepEqual(id.clientPassword, { name: 'sp', namespace: 'secrets' });
    rejects(() => parseIdentity(identity({ type, ...ok, tenantID: undefined })), /AzureIdentity ns\/id: spec.tenantID is required/);
    rejects(() => parseIdentity(identity({ type, ...ok, clientID: '' })), /spec.clientID is required/);
    rejects(() => parseIdentity(identity({ type, ...ok, clientPassword: undefined })), /spec.clientPassword \{name, namespace\} is required/);
    rejects(() => parseIdentity(identity({ type, ...ok, clientPassword: { name: 'sp' } })), /spec.clientPassword.namespace is required/);
  }
});

test('spec.adEndpoint: a type 1 or 2 identity\'s authority host, an https URL kept without trailing slashes; a type 0\'s is ignored', () => {
  const sp = { tenantID: TENANT, clientID: CLIENT, clientPassword: { name: 'sp', namespace: 'secrets' } };
  for (const type of [1, 2]) {
    assert.equal(parseIdentity(identity({ type, ...sp, adEndpoint: 'https://login.microsoftonline.us/' })).adEndpoint, 'https://login.microsoftonline.us');
    assert.equal(parseIdentity(identity({ type, ...sp, ADEndpoint: 'https://login.chinacloudapi.cn' })).adEndpoint, 'https://login.chinacloudapi.cn');
    assert.equal(parseIdentity(identity({ type, ...sp, adEndpoint: 'https://adfs.contoso.test:8443/adfs//' })).adEndpoint, 'https://adfs.contoso.test:8443/adfs');
    for (const unset of [undefined, '', '  ']) assert.equal(parseIdentity(identity({ type, ...sp, adEndpoint: unset })).adEndpoint, undefined);
    for (const bad of ['login.microsoftonline.us', 'http://login.microsoftonline.us/', 'https://user:pw@login.test/', 'https://login.test/?x=1', 'https://login.test/#f', 'https://']) {
      rejects(() => parseIdentity(identity({ type, ...sp, adEndpoint: bad })), /^AzureIdentity ns\/id: spec.adEndpoint must be an https URL with no credentials, query or fragment/);
    }
    rejects(() => parseIdentity(identity({ type, ...sp, adEndpoint: 7 })), /^AzureIdentity ns\/id: spec.adEndpoint must be a string$/);
  }
  // The host is part of the identity: editing it is a change (its cached tokens go).
  assert.notEqual(parseIdentity(identity({ type: 1, ...sp })).version, parseIdentity(identity({ type: 1, ...sp, adEndpoint: 'https://login.microsoftonline.us' })).version);
  assert.equal(parseIdentity(identity({ type: 0, clientID: CLIENT, adEndpoint: 'not a url' })).adEndpoint, undefined);
});

test('a bad adEndpoint rejects that identity alone', () => {
  const sp = { tenantID: TENANT, clientID: CLIENT, clientPassword: { name: 'sp', namespace: 'secrets' } };
  const result = parseObjects([identity({ type: 1, ...sp, adEndpoint: 'http://login.test' }, { name: 'bad' }), identity({ type: 1, ...sp }, { name: 'good' })]);
  assert.deepEqual(result.identities.map((i) => i.name), ['good']);
  assert.deepEqual(result.errors.map((e) => e.message), ['AzureIdentity ns/bad: spec.adEndpoint must be an https URL with no credentials, query or fragment (such as https://login.microsoftonline.us/)']);
});

test('an unknown or missing type is an error naming the object', () => {
  rejects(() => parseIdentity(identity({ type: 4, clientID: CLIENT })), /^AzureIdentity ns\/id: spec.type must be 0 .*, 1 .*, 2 .* or 3/);
  rejects(() => parseIdentity(identity({ type: '0', clientID: CLIENT })), /^AzureIdentity ns\/id: spec.type must be/);
  rejects(() => parseIdentity(identity({ clientID: CLIENT })), /^AzureIdentity ns\/id: spec.type is required/);
});

test('metadata and spec are required; namespace defaults to default', () => {
  rejects(() => parseIdentity({ kind: 'AzureIdentity', spec: { type: 0, clientID: CLIENT } }), /metadata missing/);
  rejects(() => parseIdentity({ metadata: { name: '' }, spec: {} }), /metadata.name must be a non-empty string/);
  rejects(() => parseIdentity({ metadata: { name: 'x' } }), /AzureIdentity default\/x: spec missing/);
  assert.equal(parseIdentity({ metadata: { name: 'x' }, spec: { type: 0, clientID: CLIENT } }).namespace, 'default');
});

test('version follows content, not resourceVersion', () => {
  const a = parseIdentity(identity({ type: 0, clientID: CLIENT }, { resourceVersion: '1' }));
  const b = parseIdentity(identity({ type: 0, clientID: CLIENT }, { resourceVersion: '2' }));
  const c = parseIdentity(identity({ type: 0, clientID: CLIENT.replace('a', 'c') }, { resourceVersion: '2' }));
  assert.equal(a.version, b.version);
  assert.notEqual(a.version, c.version);
  const b1 = parseBinding({ metadata: { name: 'b' }, spec: { azureIdentity: 'id', selector: 's1' } });
  const b2 = parseBinding({ metadata: { name: 'b' }, spec: { azureIdentity: 'id', selector: 's2' } });
  assert.notEqual(b1.version, b2.version);
});

test('bindings need azureIdentity and selector as strings', () => {
  rejects(() => parseBinding({ metadata: { name: 'b', namespace: 'ns' }, spec: { selector: 's' } }), /^AzureIdentityBinding ns\/b: spec.azureIdentity is required/);
  rejects(() => parseBinding({ metadata: { name: 'b', namespace: 'ns' }, spec: { azureIdentity: 'id' } }), /spec.selector is required/);
  rejects(() => parseBinding({ metadata: { name: 'b', namespace: 'ns' }, spec: { azureIdentity: 'id', selector: 7 } }), /spec.selector must be a string/);
});

test('exceptions: podLabels is a map of strings; missing means none', () => {
  const e = parseException({ metadata: { name: 'e', namespace: 'ns' }, spec: { podLabels: { app: 'x', tier: 'y' } } });
  assert.deepEqual(e, { name: 'e', namespace: 'ns', podLabels: { app: 'x', tier: 'y' } });
  assert.deepEqual(parseException({ metadata: { name: 'e' }, spec: {} }).podLabels, {});
  rejects(() => parseException({ metadata: { name: 'e' }, spec: { podLabels: { version: 1 } } }), /spec.podLabels.version must be a string/);
  rejects(() => parseException({ metadata: { name: 'e' }, spec: { podLabels: ['a'] } }), /spec.podLabels must be a map of strings/);
});

test('secrets: base64 data decoded, stringData wins, bad base64 named without its value', () => {
  const s = parseSecret({
    apiVersion: 'v1',
    kind: 'Secret',
    metadata: { name: 'sp', namespace: 'ns' },
    data: { clientSecret: Buffer.from('from-data').toString('base64'), password: Buffer.from('p').toString('base64') },
    stringData: { clientSecret: 'from-stringData' },
  });
  assert.deepEqual(s, { name: 'sp', namespace: 'ns', data: { clientSecret: 'from-stringData', password: 'p' } });
  assert.throws(
    () => parseSecret({ metadata: { name: 'sp', namespace: 'ns' }, data: { clientSecret: 'hunter2!' } }),
    (err: Error) => /^Secret ns\/sp: data.clientSecret is not valid base64$/.test(err.message) && !err.message.includes('hunter2'),
  );
  rejects(() => parseSecret({ metadata: { name: 'sp' }, stringData: { clientSecret: 5 } }), /stringData.clientSecret must be a string/);
});

test('parseObject checks kind and apiVersion', () => {
  assert.equal(parseObject(identity({ type: 0, clientID: CLIENT })).kind, 'AzureIdentity');
  assert.equal(parseObject({ apiVersion: 'v1', kind: 'Secret', metadata: { name: 's' } }).kind, 'Secret');
  rejects(() => parseObject({ apiVersion: 'v1', kind: 'AzureIdentity', metadata: { name: 'x' }, spec: {} }), /^AzureIdentity x: apiVersion must be aadpodidentity.k8s.io\/v1$/);
  rejects(() => parseObject({ apiVersion: crd, kind: 'Secret', metadata: { name: 's' } }), /^Secret s: apiVersion must be v1$/);
  rejects(() => parseObject({ apiVersion: 'v1', kind: 'ConfigMap', metadata: { name: 'c' } }), /^ConfigMap c: unsupported kind/);
  rejects(() => parseObject('text'), /^document: not an object$/);
});

test('parseObjects flattens Lists, skips empty documents, reports invalid and duplicate objects without throwing', () => {
  const binding = { apiVersion: crd, kind: 'AzureIdentityBinding', metadata: { name: 'b', namespace: 'ns' }, spec: { azureIdentity: 'id', selector: 's' } };
  const result = parseObjects([
    null,
    { apiVersion: 'v1', kind: 'List', items: [identity({ type: 0, clientID: CLIENT }), binding] },
    { apiVersion: crd, kind: 'AzurePodIdentityException', metadata: { name: 'e', namespace: 'ns' }, spec: { podLabels: { a: 'b' } } },
    { apiVersion: 'v1', kind: 'Secret', metadata: { name: 's', namespace: 'ns' }, stringData: { clientSecret: 'x' } },
    identity({ type: 9 }, { name: 'bad' }),
    binding,
    { kind: 'List', items: 'nope' },
  ]);
  assert.equal(result.identities.length, 1);
  assert.equal(result.bindings.length, 1);
  assert.equal(result.exceptions.length, 1);
  assert.equal(result.secrets.length, 1);
  assert.deepEqual(
    result.errors.map((e) => e.message),
    [
      'AzureIdentity ns/bad: spec.type must be 0 (user-assigned MSI), 1 (service principal), 2 (service principal certificate) or 3 (federated, Workload ID)',
      'AzureIdentityBinding ns/b: defined more than once',
      'List: items must be an array',
    ],
  );
  assert.ok(result.errors.every((e) => e.code === codes.BINDINGS));
});
