import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { codes, isNmiError } from '../../src/errors/errors.js';
import { silentLogger } from '../../src/log/logger.js';
import { parseObjects, type BindingSet } from '../../src/bindings/parse.js';
import type { BindingSource } from '../../src/bindings/source.js';
import { BindingStore, createBindingSource } from '../../src/bindings/store.js';
import { FileBindingSource } from '../../src/bindings/file-source.js';
import { KubeBindingSource } from '../../src/bindings/kube-source.js';
import { registerBindingMetrics } from '../../src/bindings/metrics.js';
import { Registry } from 'prom-client';

const crd = 'aadpodidentity.k8s.io/v1';

/** A source the test drives by hand. */
class HandSource implements BindingSource {
  onSet: ((set: BindingSet) => void) | undefined;
  stopped = false;
  async start(onSet: (set: BindingSet) => void): Promise<void> {
    this.onSet = onSet;
  }
  stop(): void {
    this.stopped = true;
  }
  push(...objects: object[]): void {
    const { errors, ...set } = parseObjects(objects);
    assert.deepEqual(errors, []);
    this.onSet!(set);
  }
}

const identity = (name: string, clientID = `c-${name}`): object => ({ apiVersion: crd, kind: 'AzureIdentity', metadata: { name, namespace: 'a' }, spec: { type: 0, clientID } });
const sp = (name: string, secret: string): object => ({
  apiVersion: crd,
  kind: 'AzureIdentity',
  metadata: { name, namespace: 'a' },
  spec: { type: 1, tenantID: 't', clientID: 'c', clientPassword: { name: secret, namespace: 'a' } },
});
const binding = (name: string, id: string, selector = 'sel'): object => ({ apiVersion: crd, kind: 'AzureIdentityBinding', metadata: { name, namespace: 'a' }, spec: { azureIdentity: id, selector } });
const exception = (labels: Record<string, string>): object => ({ apiVersion: crd, kind: 'AzurePodIdentityException', metadata: { name: 'e', namespace: 'a' }, spec: { podLabels: labels } });
const secret = (name: string, value: string): object => ({ apiVersion: 'v1', kind: 'Secret', metadata: { name, namespace: 'a' }, stringData: { clientSecret: value } });

async function started(): Promise<{ source: HandSource; store: BindingStore; changes: Set<string>[] }> {
  const source = new HandSource();
  const store = new BindingStore(source, silentLogger);
  const changes: Set<string>[] = [];
  store.on('change', (keys) => changes.push(keys));
  await store.start();
  return { source, store, changes };
}

test('ready after the first set; whenReady resolves then', async () => {
  const { source, store } = await started();
  assert.equal(store.ready, false);
  let resolved = false;
  const ready = store.whenReady().then(() => (resolved = true));
  await new Promise((r) => setImmediate(r));
  assert.equal(resolved, false);
  source.push(identity('x'), binding('b', 'x'));
  await ready;
  assert.equal(store.ready, true);
  assert.equal(store.snapshot.identities.size, 1);
  assert.deepEqual(store.snapshot.bindingsBySelector.get('sel')?.map((b) => b.name), ['b']);
  await store.whenReady();
  store.stop();
  assert.equal(source.stopped, true);
});

test('change names identities whose identity, binding or secret changed or went away', async () => {
  const { source, changes } = await started();
  source.push(identity('x'), identity('y'), binding('bx', 'x'), binding('by', 'y'), sp('z', 's'), secret('s', 'one'), exception({ app: 'a' }));
  changes.length = 0;

  source.push(identity('x', 'c-new'), identity('y'), binding('bx', 'x'), binding('by', 'y'), sp('z', 's'), secret('s', 'one'), exception({ app: 'a' }));
  assert.deepEqual(changes.map((c) => [...c]), [['a/x']]);

  source.push(identity('x', 'c-new'), identity('y'), binding('bx', 'x'), sp('z', 's'), secret('s', 'one'), exception({ app: 'a' }));
  assert.deepEqual(changes.map((c) => [...c]).at(-1), ['a/y'], 'binding removed');

  source.push(identity('x', 'c-new'), identity('y'), binding('bx', 'x'), sp('z', 's'), secret('s', 'two'), exception({ app: 'a' }));
  assert.deepEqual(changes.map((c) => [...c]).at(-1), ['a/z'], 'secret rotated');

  source.push(identity('x', 'c-new'), binding('bx', 'x'), sp('z', 's'), exception({ app: 'a' }));
  assert.deepEqual(new Set(changes.at(-1)), new Set(['a/y', 'a/z']), 'identity and secret deleted');
});

test('no change event when nothing a token depends on changed; an update event for every set', async () => {
  const { source, store, changes } = await started();
  let updates = 0;
  store.on('update', () => updates++);
  source.push(identity('x'), binding('bx', 'x'), exception({ app: 'a' }));
  changes.length = 0;
  source.push(identity('x'), binding('bx', 'x'), exception({ app: 'a' }));
  source.push(identity('x'), binding('bx', 'x'), exception({ app: 'b' }));
  assert.deepEqual(changes, []);
  assert.equal(updates, 3, 'the exception-only edit is announced, for the native routes');
});

const saved = { host: process.env.KUBERNETES_SERVICE_HOST, port: process.env.KUBERNETES_SERVICE_PORT };
const dir = mkdtempSync(path.join(tmpdir(), 'nmi-store-'));
after(() => {
  rmSync(dir, { recursive: true, force: true });
  if (saved.host !== undefined) process.env.KUBERNETES_SERVICE_HOST = saved.host;
  if (saved.port !== undefined) process.env.KUBERNETES_SERVICE_PORT = saved.port;
});

test('createBindingSource picks the file or the API server by --bindings', async () => {
  assert.ok((await createBindingSource({ bindings: dir }, silentLogger)) instanceof FileBindingSource);
  delete process.env.KUBERNETES_SERVICE_HOST;
  delete process.env.KUBERNETES_SERVICE_PORT;
  await assert.rejects(
    () => createBindingSource({ bindings: 'kubernetes' }, silentLogger),
    (err: unknown) => isNmiError(err, codes.USAGE) && /no --kubeconfig and not in a cluster/.test(err.message),
  );
  process.env.KUBERNETES_SERVICE_HOST = '127.0.0.1';
  process.env.KUBERNETES_SERVICE_PORT = '6443';
  assert.ok((await createBindingSource({ bindings: 'kubernetes', nodeName: 'n1' }, silentLogger)) instanceof KubeBindingSource);
});

test('metrics read the store at scrape time', async () => {
  const { source, store } = await started();
  const registry = new Registry();
  registerBindingMetrics(registry, store);
  const scrape = async (): Promise<string> => registry.metrics();
  assert.match(await scrape(), /^nmi_bindings_ready 0$/m);
  source.push(identity('x'), identity('y'), binding('bx', 'x'), sp('z', 's'), secret('s', 'v'));
  source.push(identity('x'), binding('bx', 'x'));
  const text = await scrape();
  assert.match(text, /^nmi_bindings_ready 1$/m);
  assert.match(text, /^nmi_bindings_objects\{kind="AzureIdentity"\} 1$/m);
  assert.match(text, /^nmi_bindings_objects\{kind="AzureIdentityBinding"\} 1$/m);
  assert.match(text, /^nmi_bindings_objects\{kind="Secret"\} 0$/m);
  assert.match(text, /^nmi_bindings_updates_total 2$/m);
  source.push(identity('x'));
  assert.match(await scrape(), /^nmi_bindings_updates_total 3$/m);
});
