import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { codes, isNmiError } from '../../src/errors/errors.js';
import type { Logger } from '../../src/log/logger.js';
import { KubeBindingSource, type KubeSourceOptions } from '../../src/bindings/kube-source.js';
import { loadKubeConfig } from '../../src/kube/kubeconfig.js';
import { secretFor } from '../../src/bindings/match.js';
import { BindingStore } from '../../src/bindings/store.js';
import { createPki } from '../standins/pki.js';
import { startApiServer, writeKubeconfig, type ApiServer, type KubeObject } from '../standins/apiserver.js';
import { captureLogs } from '../harness/log-capture.js';
import { waitFor } from '../harness/wait-for.js';

const pki = createPki('kube-source');
const dir = mkdtempSync(path.join(tmpdir(), 'nmi-kube-'));
const cleanups: (() => unknown)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
  pki.remove();
  rmSync(dir, { recursive: true, force: true });
});

const crd = 'aadpodidentity.k8s.io/v1';
const identity = (name: string, clientID = `client-${name}`, namespace = 'app'): KubeObject => ({
  apiVersion: crd,
  kind: 'AzureIdentity',
  metadata: { name, namespace },
  spec: { type: 0, clientID },
});
const spIdentity = (name: string, secret: string, secretNamespace = 'app'): KubeObject => ({
  apiVersion: crd,
  kind: 'AzureIdentity',
  metadata: { name, namespace: 'app' },
  spec: { type: 1, tenantID: 't', clientID: 'c', clientPassword: { name: secret, namespace: secretNamespace } },
});
const binding = (name: string, id: string, selector = id): KubeObject => ({
  apiVersion: crd,
  kind: 'AzureIdentityBinding',
  metadata: { name, namespace: 'app' },
  spec: { azureIdentity: id, selector },
});
const exception = (name: string, labels: Record<string, string>): KubeObject => ({
  apiVersion: crd,
  kind: 'AzurePodIdentityException',
  metadata: { name, namespace: 'app' },
  spec: { podLabels: labels },
});
const secret = (name: string, clientSecret: string, namespace = 'app'): KubeObject => ({
  apiVersion: 'v1',
  kind: 'Secret',
  metadata: { name, namespace },
  data: { clientSecret: Buffer.from(clientSecret).toString('base64') },
});

const capture = captureLogs;

async function api(): Promise<ApiServer> {
  const server = await startApiServer({ pki });
  cleanups.push(() => server.close());
  return server;
}

const fast: KubeSourceOptions = { backoff: { initialMs: 20, maxMs: 200 }, secretRefreshMs: 3_600_000, watchTimeoutSeconds: 300 };

async function connect(server: ApiServer, options: KubeSourceOptions = {}, log: Logger = capture().log): Promise<BindingStore> {
  const kubeconfig = options.pathPrefix ? undefined : server.writeKubeconfig(mkdtempSync(path.join(dir, 'kc-')));
  const source = new KubeBindingSource(log, { kubeconfig, ...fast, ...options });
  const store = new BindingStore(source, log);
  cleanups.push(() => store.stop());
  await store.start();
  return store;
}

/** Tells the store which identities' Secrets this node needs, as nmi run does for its pods', and waits for them. */
async function need(store: BindingStore, ...identities: string[]): Promise<void> {
  store.needSecrets(new Set(identities));
  await store.secretsSettled();
}

/** The next change event's keys, as a sorted list. */
async function nextChange(store: BindingStore): Promise<string[]> {
  const [keys] = (await once(store, 'change')) as [Set<string>];
  return [...keys].sort();
}

test("lists the three resources, and reads only the Secrets of the identities the node's pods need", async () => {
  const server = await api();
  server.put(identity('web'));
  server.put(spIdentity('sp', 'sp-secret'));
  server.put(secret('sp-secret', 'hunter2'));
  server.put(secret('unrelated', 'x'));
  server.put(binding('web-b', 'web'));
  server.put(exception('dns', { app: 'dns' }));
  const store = await connect(server);
  await store.whenReady();
  assert.equal(server.requests.some((r) => r.resource === 'secrets'), false, 'a Secret was read before a pod of the node needed it');
  await need(store, 'app/sp', 'app/web');
  const s = store.snapshot;
  assert.deepEqual([...s.identities.keys()].sort(), ['app/sp', 'app/web']);
  assert.deepEqual([...s.bindings.keys()], ['app/web-b']);
  assert.deepEqual([...s.exceptions.keys()], ['app/dns']);
  assert.deepEqual([...s.secrets.keys()], ['app/sp-secret'], 'only named secrets are fetched');
  assert.deepEqual(secretFor(s.identities.get('app/sp')!, s, {}), { type: 1, clientSecret: 'hunter2' });
  const secretGets = server.requests.filter((r) => r.resource === 'secrets').map((r) => r.path);
  assert.deepEqual(secretGets, ['/api/v1/namespaces/app/secrets/sp-secret']);
  for (const plural of ['azureidentities', 'azureidentitybindings', 'azurepodidentityexceptions']) {
    assert.equal(server.lists(plural).length, 1, plural);
  }
});

test('lists page by page', async () => {
  const server = await api();
  for (let i = 0; i < 7; i++) server.put(identity(`id${i}`));
  const store = await connect(server, { pageSize: 3 });
  await store.whenReady();
  assert.equal(store.snapshot.identities.size, 7);
  assert.deepEqual(server.lists('azureidentities').map((r) => r.query.limit), ['3', '3', '3']);
  assert.ok(server.lists('azureidentities')[1]!.query.continue);
});

test('watch events add, modify and delete, each with a change event', async () => {
  const server = await api();
  server.put(identity('web'));
  const store = await connect(server);
  await store.whenReady();
  await server.waitForWatches('azureidentities');
  await server.waitForWatches('azureidentitybindings');
  const watch = server.watches('azureidentities')[0]!;
  assert.equal(watch.query.resourceVersion, server.resourceVersion, "from the list's resourceVersion");
  assert.equal(watch.query.allowWatchBookmarks, 'true');

  let change = nextChange(store);
  server.put(binding('web-b', 'web', 'sel'));
  assert.deepEqual(await change, ['app/web']);
  assert.deepEqual(store.snapshot.bindingsBySelector.get('sel')?.map((b) => b.name), ['web-b']);

  change = nextChange(store);
  server.put(identity('web', 'client-2'));
  assert.deepEqual(await change, ['app/web']);
  assert.equal(store.snapshot.identities.get('app/web')?.clientID, 'client-2');

  server.bookmark();
  change = nextChange(store);
  server.remove('AzureIdentity', 'app', 'web');
  assert.deepEqual(await change, ['app/web']);
  assert.equal(store.snapshot.identities.size, 0);

  // Exceptions change the snapshot, not any token.
  server.put(exception('dns', { app: 'dns' }));
  await waitFor('the exception', () => store.snapshot.exceptions.size === 1, 15_000, 10);
});

test('a dropped watch resumes from the last resourceVersion, without listing again', async () => {
  const server = await api();
  server.put(identity('web'));
  const store = await connect(server);
  await store.whenReady();
  await server.waitForWatches('azureidentities');
  const change = nextChange(store);
  const seen = server.put(identity('web', 'client-2')).metadata.resourceVersion;
  await change;

  server.dropWatches();
  // Changed while no watch is open: replayed by the resumed watch.
  server.put(binding('other-b', 'other'));
  server.put(identity('web', 'client-3'));
  await waitFor('client-3 and other-b', () => store.snapshot.identities.get('app/web')?.clientID === 'client-3' && store.snapshot.bindings.has('app/other-b'), 15_000, 10);
  const watches = server.watches('azureidentities');
  assert.ok(watches.length >= 2);
  assert.equal(watches[1]!.query.resourceVersion, seen, 'resumed from the last event seen');
  assert.equal(server.lists('azureidentities').length, 1, 'no relist');
  assert.equal(server.lists('azureidentitybindings').length, 1);
});

test('410 Gone as an ERROR event: list again, and deletions missed meanwhile are seen', async () => {
  const server = await api();
  server.put(identity('web'));
  server.put(identity('old'));
  const store = await connect(server);
  await store.whenReady();
  await server.waitForWatches('azureidentities');
  server.dropWatches();
  server.remove('AzureIdentity', 'app', 'old');
  server.compact();
  const change = nextChange(store);
  assert.deepEqual(await change, ['app/old']);
  assert.equal(store.snapshot.identities.has('app/old'), false);
  assert.equal(server.lists('azureidentities').length, 2);
  // After the relist the watch starts again from the new list.
  await server.waitForWatches('azureidentities');
});

test('410 Gone as an HTTP status, and an expired open watch: both list again', async () => {
  const server = await api();
  server.goneAs = 'status';
  server.put(identity('web'));
  const store = await connect(server);
  await store.whenReady();
  await server.waitForWatches('azureidentities');
  server.dropWatches();
  server.compact();
  await waitFor('a second list', () => server.lists('azureidentities').length === 2, 15_000, 10);
  await server.waitForWatches('azureidentities');
  const gone = server.requests.filter((r) => r.resource === 'azureidentities');
  assert.deepEqual(gone.slice(-3).map((r) => r.watch), [true, false, true]);

  server.expireWatches();
  await waitFor('a third list', () => server.lists('azureidentities').length === 3, 15_000, 10);
  const change = nextChange(store);
  server.put(identity('web', 'after'));
  assert.deepEqual(await change, ['app/web']);
});

test('secrets: fetched again when the identity changes and on the refresh interval; a missing one is an error for secretFor', async () => {
  const server = await api();
  server.put(spIdentity('sp', 'one'));
  server.put(secret('one', 'first'));
  const store = await connect(server, { secretRefreshMs: 100 });
  await store.whenReady();
  await need(store, 'app/sp');
  const cred = (): unknown => {
    try {
      return secretFor(store.snapshot.identities.get('app/sp')!, store.snapshot, {});
    } catch (err) {
      return err;
    }
  };
  assert.deepEqual(cred(), { type: 1, clientSecret: 'first' });

  // Rotation in place: seen on the next refresh, as a change for the identity.
  let change = nextChange(store);
  server.put(secret('one', 'rotated'));
  assert.deepEqual(await change, ['app/sp']);
  assert.deepEqual(cred(), { type: 1, clientSecret: 'rotated' });

  // The identity now names a secret that does not exist.
  change = nextChange(store);
  server.put(spIdentity('sp', 'two'));
  await change;
  await waitFor('the fetch of secret two', () => server.requests.some((r) => r.path === '/api/v1/namespaces/app/secrets/two'), 15_000, 10);
  await waitFor('the credential to fail', () => isNmiError(cred(), codes.BINDINGS), 15_000, 10);
  assert.match((cred() as Error).message, /secret app\/two not found/);
  assert.equal(store.snapshot.secrets.has('app/one'), false, 'a secret no identity names is dropped');

  change = nextChange(store);
  server.put(secret('two', 'second'));
  await change;
  assert.deepEqual(cred(), { type: 1, clientSecret: 'second' });
});

test('a failing secret fetch keeps the last value and retries', async () => {
  const server = await api();
  server.put(spIdentity('sp', 'one'));
  server.put(secret('one', 'first'));
  const { log, lines } = capture();
  const store = await connect(server, { secretRefreshMs: 100 }, log);
  await store.whenReady();
  await need(store, 'app/sp');
  server.failNext(3, 500, '/api/v1/namespaces/app/secrets/');
  server.put(secret('one', 'rotated'));
  await waitFor('the failed fetch logged', () => lines().some((l) => l.msg === 'secret fetch failed, keeping the last value'), 15_000, 10);
  assert.deepEqual(secretFor(store.snapshot.identities.get('app/sp')!, store.snapshot, {}), { type: 1, clientSecret: 'first' });
  await waitFor('the rotated secret', () => store.snapshot.secrets.get('app/one')?.data.clientSecret === 'rotated', 15_000, 10);
  for (const l of lines()) assert.doesNotMatch(JSON.stringify(l), /first|rotated|test-token/);
});

test('invalid objects are reported once and left out; the rest is served', async () => {
  const server = await api();
  server.put(identity('good'));
  server.put({ ...identity('bad'), spec: { type: 9 } });
  const { log, lines } = capture();
  const store = await connect(server, {}, log);
  await store.whenReady();
  assert.deepEqual([...store.snapshot.identities.keys()], ['app/good']);
  const warnings = (): string[] => lines().filter((l) => l.msg === 'ignoring invalid object').map((l) => String(l.err));
  assert.deepEqual(warnings(), ['AzureIdentity app/bad: spec.type must be 0 (user-assigned MSI), 1 (service principal), 2 (service principal certificate) or 3 (federated, Workload ID)']);

  // A valid object turning invalid goes away.
  const change = nextChange(store);
  server.put({ ...identity('good'), spec: { type: 0 } });
  assert.deepEqual(await change, ['app/good']);
  assert.equal(store.snapshot.identities.size, 0);
  assert.equal(warnings().length, 2);
});

test('list errors back off and retry', async () => {
  const server = await api();
  server.put(identity('web'));
  server.failNext(2, 500, '/apis/aadpodidentity.k8s.io/v1/azureidentities');
  const { log, lines } = capture();
  const store = await connect(server, {}, log);
  await store.whenReady();
  assert.equal(server.lists('azureidentities').length, 3);
  const failures = lines().filter((l) => l.msg === 'API server request failed');
  assert.equal(failures.length, 2);
  assert.match(String(failures[0]!.err), /GET \/apis\/aadpodidentity.k8s.io\/v1\/azureidentities: 500 InternalError: injected failure/);
});

test('a wrong token is refused (401) and never logged; not ready', async () => {
  const server = await api();
  const kubeconfig = writeKubeconfig(path.join(dir, 'wrong-token'), { server: server.url, caFile: server.caFile, token: 'wrong-secret-token' });
  const { log, lines } = capture();
  const store = new BindingStore(new KubeBindingSource(log, { kubeconfig, ...fast }), log);
  cleanups.push(() => store.stop());
  await store.start();
  await waitFor('two 401s', () => lines().filter((l) => /401/.test(String(l.err))).length >= 2, 15_000, 10);
  assert.equal(store.ready, false);
  for (const l of lines()) assert.doesNotMatch(JSON.stringify(l), /wrong-secret-token/);
});

test('an untrusted server certificate is an error, not a silent success', async () => {
  const server = await api();
  const other = createPki('other');
  cleanups.push(() => other.remove());
  const kubeconfig = writeKubeconfig(path.join(dir, 'other-ca'), { server: server.url, caFile: other.caFile, token: server.token });
  const { log, lines } = capture();
  const store = new BindingStore(new KubeBindingSource(log, { kubeconfig, ...fast }), log);
  cleanups.push(() => store.stop());
  await store.start();
  await waitFor('a certificate error', () => lines().some((l) => /certificate/i.test(String(l.err))), 15_000, 10);
  assert.equal(store.ready, false);
  assert.equal(server.requests.length, 0);
});

test('API server down at start: retried until it is up', async () => {
  const server = await api();
  server.put(identity('web'));
  await server.pause();
  const { log, lines } = capture();
  const store = await connect(server, {}, log);
  await waitFor('three failed requests', () => lines().filter((l) => l.msg === 'API server request failed').length >= 3, 15_000, 10);
  assert.equal(store.ready, false);
  await server.resume();
  await store.whenReady();
  assert.deepEqual([...store.snapshot.identities.keys()], ['app/web']);
});

test('in-cluster config from the service account files under a path prefix', async () => {
  const server = await api();
  server.put(identity('web'));
  const root = mkdtempSync(path.join(dir, 'sa-'));
  const env = server.writeServiceAccount(root);
  const saved = { host: process.env.KUBERNETES_SERVICE_HOST, port: process.env.KUBERNETES_SERVICE_PORT };
  Object.assign(process.env, env);
  cleanups.push(() => {
    if (saved.host === undefined) delete process.env.KUBERNETES_SERVICE_HOST;
    else process.env.KUBERNETES_SERVICE_HOST = saved.host;
    if (saved.port === undefined) delete process.env.KUBERNETES_SERVICE_PORT;
    else process.env.KUBERNETES_SERVICE_PORT = saved.port;
  });
  const store = await connect(server, { pathPrefix: root });
  await store.whenReady();
  assert.deepEqual([...store.snapshot.identities.keys()], ['app/web']);

  // Missing service account files fail start with a bindings error.
  const bad = new KubeBindingSource(capture().log, { pathPrefix: path.join(root, 'nothing') });
  await assert.rejects(bad.start(() => undefined), (err: unknown) => isNmiError(err, codes.API_SERVER) && /API server credentials/.test(err.message));
  bad.stop();
});

test('an unreadable --kubeconfig is a usage error naming the flag', () => {
  assert.throws(
    () => loadKubeConfig({ kubeconfig: path.join(dir, 'missing-kubeconfig') }),
    (err: unknown) => isNmiError(err, codes.USAGE) && /^--kubeconfig .*missing-kubeconfig: /.test(err.message),
  );
});

test("another namespace's Secret is never read unless --cross-namespace-secrets; the identity is then unusable, said why", async () => {
  const server = await api();
  server.put(spIdentity('thief', 'victim-secret', 'payments'));
  server.put(secret('victim-secret', 'hunter2', 'payments'));
  const walled = await connect(server);
  await walled.whenReady();
  await need(walled, 'app/thief');
  assert.equal(server.requests.some((r) => r.resource === 'secrets'), false, 'another namespace\'s Secret was read');
  assert.throws(() => secretFor(walled.snapshot.identities.get('app/thief')!, walled.snapshot, {}), /secret payments\/victim-secret is not in the identity's namespace/);

  const open = await connect(server, { crossNamespaceSecrets: true });
  await open.whenReady();
  await need(open, 'app/thief');
  assert.deepEqual(secretFor(open.snapshot.identities.get('app/thief')!, open.snapshot, { crossNamespaceSecrets: true }), { type: 1, clientSecret: 'hunter2' });

});

test('a Secret nmi may not read (403): the identity is unusable, and it is asked again at the refresh, not in a retry loop', async () => {
  const server = await api();
  server.put(spIdentity('sp', 'sp-secret'));
  server.put(secret('sp-secret', 'hunter2'));
  server.failNext(1_000, 403, '/api/v1/namespaces/app/secrets/');
  const { log, lines } = capture();
  const store = await connect(server, {}, log);
  await store.whenReady();
  await need(store, 'app/sp');
  assert.throws(() => secretFor(store.snapshot.identities.get('app/sp')!, store.snapshot, {}), /secret app\/sp-secret not found/);
  // With a 20 ms backoff, a retry loop would have asked dozens of times by now.
  await new Promise((resolve) => setTimeout(resolve, 500));
  assert.equal(server.requests.filter((r) => r.resource === 'secrets').length, 1);
  assert.equal(lines().filter((l) => l.msg === 'secret unusable').length, 1);
});

test("a Secret is held only while a pod of the node needs its identity: dropped with the last, read again with the next", async () => {
  const server = await api();
  server.put(spIdentity('sp', 'sp-secret'));
  server.put(secret('sp-secret', 'hunter2'));
  const store = await connect(server);
  await store.whenReady();
  await need(store, 'app/sp');
  assert.equal(store.snapshot.secrets.has('app/sp-secret'), true);
  const dropped = nextChange(store);
  store.needSecrets(new Set());
  await dropped;
  assert.equal(store.snapshot.secrets.has('app/sp-secret'), false, 'kept with no pod needing it');
  const gets = server.requests.filter((r) => r.resource === 'secrets').length;
  await need(store, 'app/sp');
  assert.equal(store.snapshot.secrets.get('app/sp-secret')?.data.clientSecret, 'hunter2');
  assert.equal(server.requests.filter((r) => r.resource === 'secrets').length, gets + 1);
});

test('service accounts nmi may not list (403): going on without them, asked again minutes later, not every backoff', async () => {
  const server = await api();
  server.put(identity('web'));
  server.failNext(1_000, 403, '/api/v1/serviceaccounts');
  const { log, lines } = capture();
  const store = await connect(server, {}, log);
  await store.whenReady();
  // With a 20 ms backoff capped at 200 ms, a retry loop would have listed them several times by now.
  await new Promise((resolve) => setTimeout(resolve, 1_000));
  assert.equal(server.requests.filter((r) => r.path === '/api/v1/serviceaccounts').length, 1);
  assert.equal(lines().filter((l) => /may not list and watch serviceaccounts/.test(l.msg)).length, 1);
});

test("an API server's 429 with Retry-After: the list waits that long, not the backoff's 20 ms", async () => {
  const server = await api();
  server.put(identity('web'));
  server.failNext(1, 429, '/apis/aadpodidentity.k8s.io/v1/azureidentities', 1);
  const store = await connect(server);
  await store.whenReady();
  const lists = server.requests.filter((r) => r.resource === 'azureidentities' && !r.watch);
  assert.equal(lists.length, 2);
  assert.ok(lists[1]!.at - lists[0]!.at >= 900, `listed again after ${lists[1]!.at - lists[0]!.at} ms`);
});

test('many Secrets needed at once: fetched a few at a time, so a node opens a few connections, not one per Secret', async () => {
  const server = await api();
  const names: string[] = [];
  let waiting = 0;
  let most = 0;
  for (let i = 0; i < 40; i++) {
    server.put(spIdentity(`sp${i}`, `secret-${i}`));
    server.put(secret(`secret-${i}`, `value-${i}`));
    names.push(`app/sp${i}`);
    // Each GET is held a moment: those in flight together are counted.
    server.beforeNext('GET', '/api/v1/namespaces/app/secrets/', async () => {
      most = Math.max(most, ++waiting);
      await new Promise((resolve) => setTimeout(resolve, 20));
      waiting--;
    });
  }
  const store = await connect(server);
  await store.whenReady();
  await need(store, ...names);
  assert.equal(store.snapshot.secrets.size, 40);
  assert.ok(most >= 2 && most <= 4, `${most} Secret GETs in flight at once`);
});

test('lists come from the watch cache (resourceVersion=0), as client-go lists; a continued page names none', async () => {
  const server = await api();
  for (let i = 0; i < 5; i++) server.put(identity(`id${i}`));
  const store = await connect(server, { pageSize: 3 });
  await store.whenReady();
  const lists = server.requests.filter((r) => r.resource === 'azureidentities' && !r.watch);
  assert.equal(lists.length, 2);
  assert.equal(lists[0]!.query.resourceVersion, '0');
  assert.ok(lists[1]!.query.continue);
  assert.equal(lists[1]!.query.resourceVersion, undefined, 'a continue token carries its own version');
});
