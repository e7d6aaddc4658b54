import { test } from 'node:test';
import assert from 'node:assert/strict';
import { codes, isNmiError } from '../../src/errors/errors.js';
import type { Pod } from '../../src/kubelet/pod.js';
import { bindingsInReach, bindingVerdict, exceptionsInReach, exceptionVerdict, identitiesFor, secretFor, type MatchOptions } from '../../src/bindings/match.js';
import { parseObjects, type BindingSet } from '../../src/bindings/parse.js';
import { createSnapshot, type BindingSnapshot } from '../../src/bindings/store.js';

const crd = 'aadpodidentity.k8s.io/v1';

function pod(namespace: string, labels: Record<string, string>): Pod {
  return { uid: 'u', namespace, name: 'p', labels, ips: ['10.0.0.9'], hostNetwork: false, phase: 'Running', nodeName: 'n' };
}

function id(namespace: string, name: string, extra: { namespaced?: boolean; spec?: object } = {}): object {
  return {
    apiVersion: crd,
    kind: 'AzureIdentity',
    metadata: { name, namespace, annotations: extra.namespaced ? { 'aadpodidentity.k8s.io/Behavior': 'namespaced' } : {} },
    spec: extra.spec ?? { type: 0, clientID: `client-${namespace}-${name}` },
  };
}

function binding(namespace: string, name: string, identity: string, selector: string): object {
  return { apiVersion: crd, kind: 'AzureIdentityBinding', metadata: { name, namespace }, spec: { azureIdentity: identity, selector } };
}

function exception(namespace: string, name: string, podLabels: Record<string, string>): object {
  return { apiVersion: crd, kind: 'AzurePodIdentityException', metadata: { name, namespace }, spec: { podLabels } };
}

function set(...objects: object[]): BindingSet {
  const { errors, ...valid } = parseObjects(objects);
  assert.deepEqual(errors, []);
  return valid;
}

function snapshot(...objects: object[]): BindingSnapshot {
  return createSnapshot(set(...objects));
}

/** NMI's reach unless told otherwise: every namespace shared. */
const names = (s: BindingSnapshot, p: Pod, forceNamespaced = false, sharedNamespaces: MatchOptions['sharedNamespaces'] = '*'): string[] =>
  identitiesFor(p, s, { forceNamespaced, sharedNamespaces }).identities.map((i) => `${i.namespace}/${i.name}`);

test('a pod is bound when its aadpodidbinding label equals a binding selector', () => {
  const s = snapshot(id('app', 'web-id'), binding('app', 'web-b', 'web-id', 'web'), id('app', 'other'), binding('app', 'other-b', 'other', 'other'));
  assert.deepEqual(names(s, pod('app', { aadpodidbinding: 'web' })), ['app/web-id']);
  assert.deepEqual(names(s, pod('app', { aadpodidbinding: 'nope' })), []);
  assert.deepEqual(names(s, pod('app', { app: 'web' })), []);
  assert.deepEqual(identitiesFor(pod('app', { aadpodidbinding: 'web' }), s, { forceNamespaced: false, sharedNamespaces: '*' }).exception, false);
});

test('the binding names an identity in its own namespace', () => {
  const s = snapshot(id('other', 'web-id'), binding('app', 'web-b', 'web-id', 'web'));
  assert.deepEqual(names(s, pod('app', { aadpodidbinding: 'web' })), []);
});

test('without namespacing, a binding in another namespace binds the pod', () => {
  const s = snapshot(id('shared', 'id'), binding('shared', 'b', 'id', 'sel'));
  assert.deepEqual(names(s, pod('app', { aadpodidbinding: 'sel' })), ['shared/id']);
  // --force-namespaced: binding and identity must be in the pod's namespace.
  assert.deepEqual(names(s, pod('app', { aadpodidbinding: 'sel' }), true), []);
  assert.deepEqual(names(s, pod('shared', { aadpodidbinding: 'sel' }), true), ['shared/id']);
});

test('the namespaced annotation applies to that identity only', () => {
  const s = snapshot(
    id('shared', 'ns-id', { namespaced: true }),
    binding('shared', 'b1', 'ns-id', 'sel'),
    id('shared', 'open-id'),
    binding('shared', 'b2', 'open-id', 'sel'),
  );
  assert.deepEqual(names(s, pod('app', { aadpodidbinding: 'sel' })), ['shared/open-id']);
  assert.deepEqual(names(s, pod('shared', { aadpodidbinding: 'sel' })), ['shared/ns-id', 'shared/open-id']);
});

test('several bindings to one identity give it once; several identities come in a stable order', () => {
  const s = snapshot(id('a', 'x'), id('a', 'y'), binding('a', 'b3', 'y', 'sel'), binding('a', 'b1', 'x', 'sel'), binding('a', 'b2', 'x', 'sel'));
  assert.deepEqual(names(s, pod('a', { aadpodidbinding: 'sel' })), ['a/x', 'a/y']);
});

test("the order --multiple-identities first serves from: the pod's namespace first, then by identity name, then namespace", () => {
  const objects = [
    id('z', 'a-id'), binding('z', 'b1', 'a-id', 'sel'),
    id('app', 'm-id'), binding('app', 'b2', 'm-id', 'sel'),
    id('app', 'b-id'), binding('app', 'b0', 'b-id', 'sel'),
    id('k', 'a-id'), binding('k', 'b3', 'a-id', 'sel'),
    id('k', 'c-id'), binding('k', 'a9', 'c-id', 'sel'),
  ];
  const order = ['app/b-id', 'app/m-id', 'k/a-id', 'z/a-id', 'k/c-id'];
  assert.deepEqual(names(snapshot(...objects), pod('app', { aadpodidbinding: 'sel' })), order);
  // Whatever order the objects arrive in.
  assert.deepEqual(names(snapshot(...[...objects].reverse()), pod('app', { aadpodidbinding: 'sel' })), order);
  assert.deepEqual(names(snapshot(...objects), pod('k', { aadpodidbinding: 'sel' })), ['k/a-id', 'k/c-id', 'z/a-id', 'app/b-id', 'app/m-id']);
});

test('pods bound alike (namespace and selector) share one identity list; the namespace still counts', () => {
  const s = snapshot(id('shared', 'ns-id', { namespaced: true }), binding('shared', 'b1', 'ns-id', 'sel'), id('shared', 'open-id'), binding('shared', 'b2', 'open-id', 'sel'));
  const options = { forceNamespaced: false, sharedNamespaces: '*' } as const;
  const of = (ns: string, labels: Record<string, string>) => identitiesFor(pod(ns, labels), s, options).identities;
  // The native caller table keeps one list per distinct array: 250 pods bound alike are one list.
  assert.equal(of('shared', { aadpodidbinding: 'sel', app: 'one' }), of('shared', { aadpodidbinding: 'sel', app: 'two' }));
  assert.deepEqual(of('app', { aadpodidbinding: 'sel' }).map((i) => i.name), ['open-id']);
  assert.deepEqual(of('shared', { aadpodidbinding: 'sel' }).map((i) => i.name), ['ns-id', 'open-id']);
});

test('a binding whose identity is missing binds nothing', () => {
  const s = snapshot(binding('a', 'b', 'ghost', 'sel'));
  assert.deepEqual(identitiesFor(pod('a', { aadpodidbinding: 'sel' }), s, { forceNamespaced: false, sharedNamespaces: '*' }), { exception: false, identities: [] });
});

test('an exception needs ALL its labels on a pod of its namespace; empty podLabels match nothing', () => {
  const s = snapshot(
    id('a', 'x'),
    binding('a', 'b', 'x', 'sel'),
    exception('a', 'e', { app: 'dns', tier: 'infra' }),
    exception('a', 'empty', {}),
    exception('b', 'elsewhere', { app: 'solo' }),
  );
  const match = (ns: string, labels: Record<string, string>): boolean => identitiesFor(pod(ns, labels), s, { forceNamespaced: false, sharedNamespaces: '*' }).exception;
  assert.equal(match('a', { app: 'dns', tier: 'infra', aadpodidbinding: 'sel' }), true);
  assert.deepEqual(identitiesFor(pod('a', { app: 'dns', tier: 'infra' }), s, { forceNamespaced: false, sharedNamespaces: '*' }).identities, []);
  assert.equal(match('a', { app: 'dns' }), false);
  assert.equal(match('a', { app: 'dns', tier: 'web' }), false);
  assert.equal(match('a', {}), false);
  assert.equal(match('a', { app: 'solo' }), false);
  assert.equal(match('b', { app: 'solo', extra: '1' }), true);
});

test('why each binding and exception applies to a pod or not, as data (nmi explain words it)', () => {
  const s = snapshot(
    id('shared', 'ns-id', { namespaced: true }),
    binding('shared', 'b-ns', 'ns-id', 'sel'),
    id('shared', 'open-id'),
    binding('shared', 'b-open', 'open-id', 'sel'),
    binding('app', 'b-ghost', 'ghost', 'sel'),
    binding('app', 'b-other', 'open-id', 'other'),
    exception('app', 'e', { app: 'dns', tier: 'infra' }),
    exception('app', 'empty', {}),
  );
  const p = pod('app', { aadpodidbinding: 'sel', app: 'dns' });
  const verdicts = (forceNamespaced: boolean) =>
    bindingsInReach(p, s).map((b) => {
      const v = bindingVerdict(p, b, s, { forceNamespaced, sharedNamespaces: '*' });
      return [b.name, v.applies ? `applies ${v.identity.name}` : v.why === 'namespaced' ? `namespaced by ${v.by}` : v.why];
    });
  // The pod's namespace's bindings and those anywhere with its selector, by namespace/name.
  assert.deepEqual(verdicts(false), [['b-ghost', 'no-identity'], ['b-other', 'other-selector'], ['b-ns', 'namespaced by annotation'], ['b-open', 'applies open-id']]);
  assert.deepEqual(verdicts(true).slice(2), [['b-ns', 'namespaced by force-namespaced'], ['b-open', 'namespaced by force-namespaced']]);
  const other = bindingVerdict(p, s.bindings.get('app/b-other')!, s, { forceNamespaced: false, sharedNamespaces: '*' });
  assert.deepEqual(other, { applies: false, why: 'other-selector', podSelector: 'sel' });
  assert.deepEqual(bindingVerdict(pod('app', {}), s.bindings.get('app/b-other')!, s, { forceNamespaced: false, sharedNamespaces: '*' }), { applies: false, why: 'no-label' });
  assert.deepEqual(bindingVerdict(p, s.bindings.get('app/b-ghost')!, s, { forceNamespaced: false, sharedNamespaces: '*' }), { applies: false, why: 'no-identity', identity: 'app/ghost' });
  const invalid = createSnapshot({ ...set(binding('app', 'b-ghost', 'ghost', 'sel')), invalid: new Map([['AzureIdentity app/ghost', 'spec.type is wrong']]) });
  assert.deepEqual(bindingVerdict(p, invalid.bindings.get('app/b-ghost')!, invalid, { forceNamespaced: false, sharedNamespaces: '*' }), { applies: false, why: 'no-identity', identity: 'app/ghost', invalid: 'spec.type is wrong' });
  assert.deepEqual(
    exceptionsInReach(p, s).map((e) => [e.name, exceptionVerdict(p, e)]),
    [['e', { applies: false, why: 'labels-missing', missing: [['tier', 'infra']] }], ['empty', { applies: false, why: 'no-pod-labels' }]],
  );
  assert.deepEqual(exceptionVerdict(pod('app', { app: 'dns', tier: 'infra' }), s.exceptions.get('app/e')!), { applies: true });
});

const sp = (type: number, secret = 'sp'): object =>
  id('a', `sp${type}`, { spec: { type, tenantID: 't', clientID: 'c', clientPassword: { name: secret, namespace: 'a' } } });

function secretObject(name: string, stringData: Record<string, string>, namespace = 'a'): object {
  return { apiVersion: 'v1', kind: 'Secret', metadata: { name, namespace }, stringData };
}

test('secretFor resolves a client secret or a certificate and password', () => {
  const s = snapshot(sp(1), sp(2, 'cert'), secretObject('sp', { clientSecret: 'hunter2' }), secretObject('cert', { certificate: 'PEM', password: 'pw' }));
  assert.deepEqual(secretFor(s.identities.get('a/sp1')!, s, {}), { type: 1, clientSecret: 'hunter2' });
  assert.deepEqual(secretFor(s.identities.get('a/sp2')!, s, {}), { type: 2, certificate: 'PEM', password: 'pw' });
});

test("a client secret in a Secret's only key, whatever its name, as NMI read it; with several keys, clientSecret", () => {
  const s = snapshot(sp(1), secretObject('sp', { 'client-secret': 'hunter2' }));
  assert.deepEqual(secretFor(s.identities.get('a/sp1')!, s, {}), { type: 1, clientSecret: 'hunter2' });
  const several = snapshot(sp(1), secretObject('sp', { note: 'n', clientSecret: 'hunter2' }));
  assert.deepEqual(secretFor(several.identities.get('a/sp1')!, several, {}), { type: 1, clientSecret: 'hunter2' });
  // A certificate's Secret keeps its named keys: one key is not enough to tell certificate from password.
  const cert = snapshot(sp(2), secretObject('sp', { pem: 'PEM' }));
  assert.throws(() => secretFor(cert.identities.get('a/sp2')!, cert, {}), /secret a\/sp has no key certificate$/);
});

test('a certificate secret without a password gives an empty password', () => {
  const s = snapshot(sp(2, 'cert'), secretObject('cert', { certificate: 'PEM' }));
  assert.deepEqual(secretFor(s.identities.get('a/sp2')!, s, {}), { type: 2, certificate: 'PEM', password: '' });
});

test('secretFor errors name what is missing, never a value', () => {
  const expect = (fn: () => unknown, pattern: RegExp): void => {
    assert.throws(fn, (err: unknown) => isNmiError(err, codes.BINDINGS) && pattern.test(err.message) && !err.message.includes('hunter2'));
  };
  const missing = snapshot(sp(1));
  expect(() => secretFor(missing.identities.get('a/sp1')!, missing, {}), /^AzureIdentity a\/sp1: secret a\/sp not found$/);
  const wrongKey = snapshot(sp(1), sp(2), secretObject('sp', { password: 'hunter2', other: 'hunter2' }));
  expect(() => secretFor(wrongKey.identities.get('a/sp1')!, wrongKey, {}), /secret a\/sp has 2 keys and none is clientSecret: keep one key, or name the client secret's key clientSecret$/);
  expect(() => secretFor(wrongKey.identities.get('a/sp2')!, wrongKey, {}), /secret a\/sp has no key certificate$/);
  const empty = snapshot(sp(1), secretObject('sp', { token: '' }));
  expect(() => secretFor(empty.identities.get('a/sp1')!, empty, {}), /secret a\/sp has an empty token$/);
  const none = snapshot(sp(1), secretObject('sp', {}));
  expect(() => secretFor(none.identities.get('a/sp1')!, none, {}), /secret a\/sp has no key clientSecret$/);
  const msi = snapshot(id('a', 'msi'));
  expect(() => secretFor(msi.identities.get('a/msi')!, msi, {}), /user-assigned identity has no secret/);
});

test("a binding serves pods of another namespace only from a shared namespace: a tenant cannot give its identity to another namespace's pods", () => {
  const s = snapshot(id('tenant', 'mine'), binding('tenant', 'steal', 'mine', 'web'), id('platform', 'csi'), binding('platform', 'csi-b', 'csi', 'web'), id('payments', 'own'), binding('payments', 'own-b', 'own', 'web'));
  const victim = pod('payments', { aadpodidbinding: 'web' });
  assert.deepEqual(names(s, victim, false, new Set()), ['payments/own']);
  assert.deepEqual(names(s, victim, false, new Set(['platform'])), ['payments/own', 'platform/csi']);
  assert.deepEqual(names(s, victim, false, '*'), ['payments/own', 'platform/csi', 'tenant/mine']);
  // --force-namespaced walls off the shared namespaces too.
  assert.deepEqual(names(s, victim, true, '*'), ['payments/own']);
  const verdict = bindingVerdict(victim, s.bindings.get('tenant/steal')!, s, { forceNamespaced: false });
  assert.deepEqual(verdict, { applies: false, why: 'not-shared', namespace: 'tenant' });
});

test("a service principal's Secret only from its identity's own namespace, unless --cross-namespace-secrets", () => {
  const s = snapshot(id('tenant', 'thief', { spec: { type: 1, tenantID: 't', clientID: 'c', clientPassword: { name: 'victim-secret', namespace: 'payments' } } }), secretObject('victim-secret', { clientSecret: 'hunter2' }, 'payments'));
  const thief = s.identities.get('tenant/thief')!;
  assert.throws(
    () => secretFor(thief, s, {}),
    (err: unknown) => isNmiError(err, codes.BINDINGS) && /secret payments\/victim-secret is not in the identity's namespace/.test(err.message) && !err.message.includes('hunter2'),
  );
  assert.deepEqual(secretFor(thief, s, { crossNamespaceSecrets: true }), { type: 1, clientSecret: 'hunter2' });
});
