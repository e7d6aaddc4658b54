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

const fast: KubeSourceOptions = { backoff: { initialMs: 20, maxMs: 200 }, refreshMs: 3_600_000, watchTimeoutSeconds: 300 };

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
  store.need({ secrets: new Set(identities), serviceAccounts: new Map() });
  await store.settled();
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
  const store = await connect(server, { refreshMs: 100 });
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
  const store = await connect(server, { refreshMs: 100 }, log);
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
  assert.deepEqual(lines().filter((l) => /^secret unusable/.test(l.msg)).map((l) => l.msg), ['secret unusable: nmi needs get on secrets (deploy/grants/service-principals)']);
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
  store.need({ secrets: new Set(), serviceAccounts: new Map() });
  await dropped;
  assert.equal(store.snapshot.secrets.has('app/sp-secret'), false, 'kept with no pod needing it');
  const gets = server.requests.filter((r) => r.resource === 'secrets').length;
  await need(store, 'app/sp');
  assert.equal(store.snapshot.secrets.get('app/sp-secret')?.data.clientSecret, 'hunter2');
  assert.equal(server.requests.filter((r) => r.resource === 'secrets').length, gets + 1);
});

test('custom resources nmi may not list (403): not ready, and asked again after 30 s and more, not every backoff', async () => {
  const server = await api();
  server.put(identity('web'));
  server.failNext(1_000, 403, '/apis/aadpodidentity.k8s.io/v1/azureidentities');
  const { log, lines } = capture();
  const store = await connect(server, {}, log);
  // With a 20 ms backoff capped at 200 ms, a retry loop would have listed them several times by now.
  await new Promise((resolve) => setTimeout(resolve, 1_000));
  assert.equal(store.ready, false);
  assert.equal(server.lists('azureidentities').length, 1);
  const said = lines().filter((l) => /may not list and watch azureidentities: check its RBAC/.test(l.msg));
  assert.equal(said.length, 1);
  assert.ok(Number(said[0]!.retryInMs) >= 24_000, `retried in ${String(said[0]!.retryInMs)} ms`);
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

const account = (name: string, annotations: Record<string, string> = {}, namespace = 'app'): KubeObject => ({
  apiVersion: 'v1',
  kind: 'ServiceAccount',
  metadata: { name, namespace, annotations },
});

test('a node whose pods use no Workload ID asks nothing about ServiceAccounts, however many the cluster holds', async () => {
  const server = await api();
  server.put(spIdentity('sp', 'sp-secret'));
  server.put(secret('sp-secret', 'hunter2'));
  for (let i = 0; i < 50; i++) server.put(account(`sa${i}`, { 'azure.workload.identity/client-id': `c${i}` }));
  const store = await connect(server);
  await store.whenReady();
  await need(store, 'app/sp');
  assert.equal(store.snapshot.secrets.size, 1);
  assert.deepEqual(server.requests.filter((r) => r.resource === 'serviceaccounts').map((r) => r.path), []);
});

test("ServiceAccounts: only those of the node's Workload ID pods, one GET each from the watch cache, read again for a new pod, dropped with the last", async () => {
  const server = await api();
  server.put(account('wi', { 'azure.workload.identity/client-id': 'first' }));
  server.put(account('other', { 'azure.workload.identity/client-id': 'x' }));
  const store = await connect(server);
  await store.whenReady();
  const pods = async (uids: string): Promise<void> => {
    store.need({ secrets: new Set(), serviceAccounts: uids ? new Map([['app/wi', uids]]) : new Map() });
    await store.settled();
  };
  await pods('u1');
  assert.deepEqual([...store.snapshot.serviceAccounts.keys()], ['app/wi']);
  assert.equal(store.snapshot.serviceAccounts.get('app/wi')?.clientID, 'first');
  const gets = () => server.requests.filter((r) => r.resource === 'serviceaccounts');
  assert.deepEqual(gets().map((r) => [r.path, r.query.resourceVersion]), [['/api/v1/namespaces/app/serviceaccounts/wi', '0']]);
  // Annotated anew, then a pod of the account started: the new pod reads it again, and sees the annotation.
  server.put(account('wi', { 'azure.workload.identity/client-id': 'second' }));
  await pods('u1,u2');
  assert.equal(store.snapshot.serviceAccounts.get('app/wi')?.clientID, 'second');
  assert.equal(gets().length, 2);
  // The same pods again: nothing read.
  await pods('u1,u2');
  assert.equal(gets().length, 2);
  const dropped = nextChange(store);
  await pods('');
  await dropped;
  assert.equal(store.snapshot.serviceAccounts.size, 0, 'kept with no pod of the node using it');
  assert.equal(gets().length, 2);
});

test('ServiceAccounts and Secrets needed are read again each refresh, at spread intervals', async () => {
  const server = await api();
  server.put(account('wi', { 'azure.workload.identity/client-id': 'c' }));
  const store = await connect(server, { refreshMs: 200 });
  await store.whenReady();
  store.need({ secrets: new Set(), serviceAccounts: new Map([['app/wi', 'u1']]) });
  await store.settled();
  await waitFor('four reads', () => server.requests.filter((r) => r.resource === 'serviceaccounts').length >= 4, 15_000, 10);
  const at = server.requests.filter((r) => r.resource === 'serviceaccounts').map((r) => r.at);
  const gaps = at.slice(1).map((t, i) => t - at[i]!);
  // ±25 % around 200 ms: never in step with a node started at the same moment.
  for (const gap of gaps.slice(1)) assert.ok(gap >= 140 && gap <= 400, `read again after ${gap} ms`);
  assert.ok(new Set(gaps.slice(1)).size > 1, `gaps ${gaps.join(', ')} are all the same`);
});

test('an object over the size limit is left out with one log line naming it, from a list and from a watch; the rest is served', async () => {
  const server = await api();
  const big = (name: string): KubeObject => ({ ...identity(name), metadata: { name, namespace: 'app', annotations: { filler: 'x'.repeat(70 * 1024) } } });
  server.put(big('huge'));
  server.put(identity('web'));
  const { log, lines } = capture();
  const store = await connect(server, {}, log);
  await store.whenReady();
  assert.deepEqual([...store.snapshot.identities.keys()], ['app/web']);
  const said = () => lines().filter((l) => l.msg === 'ignoring invalid object');
  assert.equal(said().length, 1);
  assert.equal(said()[0]!.object, 'app/huge');
  assert.match(String(said()[0]!.err), /over the limit of 65536 for one object/);
  // A valid object growing past the limit on a watch: gone, said once.
  const change = nextChange(store);
  server.put(big('web'));
  assert.deepEqual(await change, ['app/web']);
  assert.equal(store.snapshot.identities.size, 0);
  assert.deepEqual(said().map((l) => l.object), ['app/huge', 'app/web']);
  server.put(identity('small'));
  await waitFor('the next object served', () => store.snapshot.identities.has('app/small'), 15_000, 10);
});

test('a list page over its byte bound is asked again with half as many items, from etcd, so a page never holds more', async () => {
  for (const wholeFromCache of [false, true]) {
    const server = await api();
    // A watch cache before Kubernetes 1.33 answers resourceVersion=0 whole: only etcd pages by the limit.
    server.wholeFromCache = wholeFromCache;
    for (let i = 0; i < 12; i++) server.put({ ...identity(`id${i}`), metadata: { name: `id${i}`, namespace: 'app', annotations: { filler: 'x'.repeat(1000) } } });
    const store = await connect(server, { pageSize: 12, maxPageBytes: 4000 });
    await store.whenReady();
    assert.equal(store.snapshot.identities.size, 12);
    const pages = server.lists('azureidentities').map((r) => `${r.query.limit}${r.query.resourceVersion === '0' ? ' from the cache' : ''}`);
    // 12 and 6 items are over 4000 bytes; 3 fit, four pages of them.
    assert.deepEqual(pages, ['12 from the cache', '6', '3', '3', '3', '3']);
  }
});

test('a namespace past its limit of objects: its others left out and counted, one log line; other namespaces served', async () => {
  const server = await api();
  for (let i = 0; i < 5; i++) server.put(identity(`id${i}`));
  server.put(identity('a', 'c-a', 'other'));
  server.put(identity('b', 'c-b', 'other'));
  const { log, lines } = capture();
  const store = await connect(server, { maxObjectsPerNamespace: 3 }, log);
  await store.whenReady();
  assert.deepEqual([...store.snapshot.identities.keys()].sort(), ['app/id0', 'app/id1', 'app/id2', 'other/a', 'other/b']);
  const said = () => lines().filter((l) => /namespace over the limit of 3 azureidentities/.test(l.msg));
  assert.deepEqual(said().map((l) => [l.namespace, l.leftOut]), [['app', 2]]);
  assert.equal(store.snapshot.invalid.get('AzureIdentity app/*'), '2 more left out: over the limit of 3 per namespace');
  // More in the full namespace: left out, not said again; another namespace still served.
  server.put(identity('id5'));
  server.put(identity('c', 'c-c', 'other'));
  await waitFor('other/c served', () => store.snapshot.identities.has('other/c'), 15_000, 10);
  assert.equal(store.snapshot.identities.has('app/id5'), false);
  assert.equal(said().length, 1);
  assert.equal(store.snapshot.invalid.get('AzureIdentity app/*'), '3 more left out: over the limit of 3 per namespace');
});

test('a watch that brings nothing for stallMs is replaced from where it was; one that gets bookmarks is kept', async () => {
  const server = await api();
  server.put(identity('web'));
  const { log } = capture();
  const store = await connect(server, { stallMs: 400 }, log);
  await store.whenReady();
  await server.waitForWatches('azureidentities');
  // Bookmarks every 100 ms: the watch lives on.
  const ticker = setInterval(() => server.bookmark(), 100);
  await new Promise((resolve) => setTimeout(resolve, 1_000));
  clearInterval(ticker);
  assert.equal(server.watches('azureidentities').length, 1, 'a watch with bookmarks was replaced');
  // Silence (the stand-in keeps it open, as a stuck server or a dead connection would): replaced, not listed again.
  await waitFor('a second watch', () => server.watches('azureidentities').length >= 2, 15_000, 10);
  const [first, second] = server.watches('azureidentities');
  assert.equal(second!.query.resourceVersion, first!.query.resourceVersion);
  assert.equal(server.lists('azureidentities').length, 1);
});

test('20 sources that find the API server down retry with full jitter: when it comes back, their lists are spread over the backoff window', async () => {
  const server = await api();
  server.put(identity('web'));
  await server.pause();
  const kubeconfig = server.writeKubeconfig(mkdtempSync(path.join(dir, 'kc-')));
  const stores = await Promise.all(
    Array.from({ length: 20 }, async () => {
      const source = new KubeBindingSource(capture().log, { kubeconfig, ...fast, backoff: { initialMs: 100, maxMs: 3_200 } });
      const store = new BindingStore(source, capture().log);
      cleanups.push(() => store.stop());
      await store.start();
      return store;
    }),
  );
  await new Promise((resolve) => setTimeout(resolve, 2_000));
  const back = Date.now();
  await server.resume();
  await Promise.all(stores.map((s) => s.whenReady()));
  const at = server.lists('azureidentities').filter((r) => r.at >= back).map((r) => r.at);
  assert.equal(at.length, 20);
  // Simulated 2,000 times each: with ±20 % around each doubling they span at most ~1.0 s; drawn over the window, at least ~1.9 s.
  const span = Math.max(...at) - Math.min(...at);
  assert.ok(span >= 1_400, `20 lists within ${span} ms of each other`);
});
