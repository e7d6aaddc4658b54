import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { once } from 'node:events';
import { chmodSync, chownSync, mkdirSync, mkdtempSync, renameSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { codes, isNmiError } from '../../src/errors/errors.js';
import type { Logger } from '../../src/log/logger.js';
import { FileBindingSource, loadBindings } from '../../src/bindings/file-source.js';
import { BindingStore } from '../../src/bindings/store.js';
import { captureLogs } from '../harness/log-capture.js';

const root = mkdtempSync(path.join(tmpdir(), 'nmi-bindings-'));
const stores: BindingStore[] = [];
// The source's watch and poll timer do not hold the process open (the daemon's servers do).
const keepAlive = setInterval(() => undefined, 1000);
after(() => {
  clearInterval(keepAlive);
  for (const s of stores) s.stop();
  rmSync(root, { recursive: true, force: true });
});

let n = 0;
function scratch(): string {
  const dir = path.join(root, String(n++));
  mkdirSync(dir);
  return dir;
}

const capture = captureLogs;

async function open(target: string, log: Logger = capture().log): Promise<BindingStore> {
  const store = new BindingStore(new FileBindingSource(target, log, { pollIntervalMs: 200, debounceMs: 20 }), log);
  stores.push(store);
  await store.start();
  return store;
}

function until<T>(what: () => T | undefined, store: BindingStore): Promise<T> {
  return new Promise((resolve) => {
    const check = (): void => {
      const v = what();
      if (v !== undefined && v !== false) {
        store.off('change', check);
        clearInterval(timer);
        resolve(v);
      }
    };
    // Changes arrive as events; the interval only re-checks for the not-ready → ready case.
    const timer = setInterval(check, 50);
    store.on('change', check);
    check();
  });
}

const MULTI = `apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentity
metadata:
  name: web-id
  namespace: app
spec:
  type: 0
  clientID: 11111111-1111-1111-1111-111111111111
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentityBinding
metadata:
  name: web-b
  namespace: app
spec:
  azureIdentity: web-id
  selector: web
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentity
metadata:
  name: sp
  namespace: app
spec:
  type: 1
  tenantID: tenant
  clientID: client
  clientPassword: {name: sp-secret, namespace: app}
---
apiVersion: v1
kind: Secret
metadata:
  name: sp-secret
  namespace: app
stringData:
  clientSecret: hunter2
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzurePodIdentityException
metadata:
  name: dns
  namespace: kube-system
spec:
  podLabels: {app: dns}
`;

test('a multi-document YAML file loads every kind', async () => {
  const file = path.join(scratch(), 'bindings.yaml');
  writeFileSync(file, MULTI);
  const store = await open(file);
  assert.equal(store.ready, true, 'a readable file is synced by the time start() resolves');
  const s = store.snapshot;
  assert.deepEqual([...s.identities.keys()].sort(), ['app/sp', 'app/web-id']);
  assert.deepEqual([...s.bindings.keys()], ['app/web-b']);
  assert.deepEqual([...s.exceptions.keys()], ['kube-system/dns']);
  assert.deepEqual(s.secrets.get('app/sp-secret')?.data, { clientSecret: 'hunter2' });
});

test('JSON files, a kind: List, and a folder of them', async () => {
  const dir = scratch();
  writeFileSync(
    path.join(dir, 'a.json'),
    JSON.stringify({
      apiVersion: 'v1',
      kind: 'List',
      items: [
        { apiVersion: 'aadpodidentity.k8s.io/v1', kind: 'AzureIdentity', metadata: { name: 'j' }, spec: { type: 0, clientID: 'c' } },
        { apiVersion: 'aadpodidentity.k8s.io/v1', kind: 'AzureIdentityBinding', metadata: { name: 'jb' }, spec: { azureIdentity: 'j', selector: 'j' } },
      ],
    }),
  );
  writeFileSync(path.join(dir, 'b.yml'), 'apiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentity\nmetadata: {name: y}\nspec: {type: 0, clientID: y}\n');
  writeFileSync(path.join(dir, 'notes.txt'), 'not bindings');
  writeFileSync(path.join(dir, '.hidden.yaml'), 'broken: [');
  const loaded = await loadBindings(dir);
  assert.deepEqual(loaded.files.map((f) => path.basename(f)), ['a.json', 'b.yml']);
  assert.deepEqual(loaded.result.errors, []);
  const store = await open(dir);
  assert.deepEqual([...store.snapshot.identities.keys()].sort(), ['default/j', 'default/y']);
  assert.deepEqual([...store.snapshot.bindings.keys()], ['default/jb']);
});

test('the same object in two files is rejected', async () => {
  const dir = scratch();
  const doc = 'apiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentity\nmetadata: {name: dup}\nspec: {type: 0, clientID: c}\n';
  writeFileSync(path.join(dir, 'a.yaml'), doc);
  writeFileSync(path.join(dir, 'b.yaml'), doc);
  const { result } = await loadBindings(dir);
  assert.equal(result.errors.length, 1);
  assert.match(result.errors[0]!, /b\.yaml: identities default\/dup is also defined in .*a\.yaml$/);
});

test('an edited file is picked up, with a change for the edited identity', async () => {
  const file = path.join(scratch(), 'bindings.yaml');
  writeFileSync(file, MULTI);
  const store = await open(file);
  const changed = once(store, 'change');
  writeFileSync(file, MULTI.replace('11111111-1111-1111-1111-111111111111', '22222222-2222-2222-2222-222222222222'));
  const [keys] = (await changed) as [Set<string>];
  assert.deepEqual([...keys], ['app/web-id']);
  assert.equal(store.snapshot.identities.get('app/web-id')?.clientID, '22222222-2222-2222-2222-222222222222');
});

test('a file replaced by rename (as editors and kubectl do) is picked up', async () => {
  const dir = scratch();
  const file = path.join(dir, 'bindings.yaml');
  writeFileSync(file, MULTI);
  const store = await open(file);
  const changed = once(store, 'change');
  writeFileSync(path.join(dir, '.tmp'), MULTI.replace(/---\napiVersion: aadpodidentity.k8s.io\/v1\nkind: AzureIdentityBinding[^]*?selector: web\n/, ''));
  renameSync(path.join(dir, '.tmp'), file);
  const [keys] = (await changed) as [Set<string>];
  assert.deepEqual([...keys], ['app/web-id']);
  assert.equal(store.snapshot.bindings.size, 0);
});

test('a ConfigMap-style folder swapped through its ..data link is picked up', async () => {
  const dir = scratch();
  const v1 = path.join(dir, '..v1');
  const v2 = path.join(dir, '..v2');
  mkdirSync(v1);
  mkdirSync(v2);
  writeFileSync(path.join(v1, 'bindings.yaml'), MULTI);
  writeFileSync(path.join(v2, 'bindings.yaml'), MULTI.replace('selector: web', 'selector: web2'));
  symlinkSync('..v1', path.join(dir, '..data'));
  symlinkSync('..data/bindings.yaml', path.join(dir, 'bindings.yaml'));
  const store = await open(dir);
  assert.deepEqual([...(store.snapshot.bindingsBySelector.keys() ?? [])], ['web']);
  const changed = once(store, 'change');
  symlinkSync('..v2', path.join(dir, '..data_tmp'));
  renameSync(path.join(dir, '..data_tmp'), path.join(dir, '..data'));
  await changed;
  assert.deepEqual([...store.snapshot.bindingsBySelector.keys()], ['web2']);
});

test('a broken file keeps the last good set and says why in one line, without secret values', async () => {
  const file = path.join(scratch(), 'bindings.yaml');
  writeFileSync(file, MULTI);
  const { log, lines } = capture();
  const store = await open(file, log);
  const good = store.snapshot;

  writeFileSync(file, `${MULTI}---\nkind: Secret\nstringData:\n  clientSecret: hunter3 : x\n`);
  const syntax = await until(() => lines().find((l) => l.level === 40), store);
  assert.match(syntax.msg, /^bindings rejected, keeping the last good set: .*bindings\.yaml:\d+:\d+: /);
  assert.equal(store.snapshot, good);

  writeFileSync(file, MULTI.replace('type: 1', 'type: 7'));
  const invalid = await until(() => lines().filter((l) => l.level === 40)[1], store);
  assert.match(invalid.msg, /bindings\.yaml: AzureIdentity app\/sp: spec.type must be 0/);
  assert.equal(store.snapshot, good);
  for (const l of lines()) assert.doesNotMatch(JSON.stringify(l), /hunter/);

  const changed = once(store, 'change');
  writeFileSync(file, MULTI.replace('selector: web', 'selector: fixed'));
  await changed;
  assert.deepEqual([...store.snapshot.bindingsBySelector.keys()], ['fixed']);
});

test('broken at start: not ready until the file is fixed', async () => {
  const file = path.join(scratch(), 'bindings.yaml');
  writeFileSync(file, 'apiVersion: [');
  const store = await open(file);
  assert.equal(store.ready, false);
  writeFileSync(file, MULTI);
  await store.whenReady();
  assert.equal(store.snapshot.identities.size, 2);
});

test('a missing path fails start with a bindings error', async () => {
  const source = new FileBindingSource(path.join(root, 'nope.yaml'), capture().log);
  await assert.rejects(source.start(() => undefined), (err: unknown) => isNmiError(err, codes.BINDINGS) && /--bindings .*nope\.yaml/.test(err.message));
});

test('a deleted file keeps the last good set', async () => {
  const dir = scratch();
  const file = path.join(dir, 'bindings.yaml');
  writeFileSync(file, MULTI);
  const { log, lines } = capture();
  const store = await open(file, log);
  rmSync(file);
  const warned = await until(() => lines().find((l) => l.level === 40), store);
  assert.match(warned.msg, /bindings unreadable, keeping the last good set/);
  assert.equal(store.snapshot.identities.size, 2);
  const changed = once(store, 'change');
  writeFileSync(file, MULTI.replace('selector: web', 'selector: back'));
  await changed;
  assert.deepEqual([...store.snapshot.bindingsBySelector.keys()], ['back']);
});

/** start() refused with a usage error naming --bindings, the path given, and what is wrong. */
async function refusedAtStart(target: string, why: RegExp): Promise<void> {
  const source = new FileBindingSource(target, capture().log);
  await assert.rejects(source.start(() => undefined), (err: unknown) => {
    assert.ok(isNmiError(err, codes.USAGE), String(err));
    assert.ok(err.message.startsWith(`--bindings ${target}: refused: `), err.message);
    assert.match(err.message, why);
    return true;
  });
}

test('bindings another user could write are refused at start: the file, its folder, a folder\'s files and where their links lead', async () => {
  const file = path.join(scratch(), 'bindings.yaml');
  writeFileSync(file, MULTI);
  chmodSync(file, 0o666);
  await refusedAtStart(file, new RegExp(`${file} is writable by its group and others \\(mode 0666\\)`));
  chmodSync(file, 0o664);
  await refusedAtStart(file, new RegExp(`${file} is writable by its group \\(mode 0664\\)`));
  chmodSync(file, 0o644);
  chmodSync(path.dirname(file), 0o777);
  await refusedAtStart(file, new RegExp(`${path.dirname(file)} is writable by its group and others \\(mode 0777\\)`));

  const folder = scratch();
  writeFileSync(path.join(folder, 'a.yaml'), MULTI);
  chmodSync(path.join(folder, 'a.yaml'), 0o646);
  await refusedAtStart(folder, /a\.yaml is writable by others \(mode 0646\)/);
  chmodSync(path.join(folder, 'a.yaml'), 0o644);
  chmodSync(folder, 0o757);
  await refusedAtStart(folder, /is writable by others \(mode 0757\)/);
  chmodSync(folder, 0o755);
  // A link in a safe folder to a file in a folder anyone may write.
  const open = scratch();
  writeFileSync(path.join(open, 'b.yaml'), MULTI.replace(/web/g, 'other'));
  chmodSync(open, 0o1777);
  symlinkSync(path.join(open, 'b.yaml'), path.join(folder, 'b.yaml'));
  await refusedAtStart(folder, new RegExp(`${open} is writable by its group and others \\(mode 1777\\)`));
});

test('bindings owned by another uid are refused at start', { skip: process.getuid?.() !== 0 && 'needs root to give a file away' }, async () => {
  const file = path.join(scratch(), 'bindings.yaml');
  writeFileSync(file, MULTI);
  chownSync(file, 65534, 65534);
  await refusedAtStart(file, /bindings\.yaml is owned by uid 65534, neither root nor nmi's uid 0/);
  chownSync(file, 0, 0);
  chownSync(path.dirname(file), 65534, 65534);
  await refusedAtStart(file, /is owned by uid 65534, neither root nor nmi's uid 0/);
});

test('bindings made writable by others after start: the last good set is kept and the reason logged once', async () => {
  const file = path.join(scratch(), 'bindings.yaml');
  writeFileSync(file, MULTI);
  const { log, lines } = capture();
  const store = await open(file, log);
  const good = store.snapshot;
  chmodSync(file, 0o666);
  writeFileSync(file, MULTI.replace('selector: web', 'selector: planted'));
  const warned = await until(() => lines().find((l) => l.level === 40), store);
  assert.equal(warned.msg, `bindings refused, keeping the last good set: ${file} is writable by its group and others (mode 0666)`);
  // Several polls later: still the last good set, still one line.
  await new Promise((resolve) => setTimeout(resolve, 700));
  assert.equal(store.snapshot, good);
  assert.equal(lines().filter((l) => /bindings refused/.test(l.msg)).length, 1);
  const changed = once(store, 'change');
  chmodSync(file, 0o644);
  await changed;
  assert.deepEqual([...store.snapshot.bindingsBySelector.keys()], ['planted']);
});

test('a folder on a read-only mount (a ConfigMap volume: the kubelet makes its folder 0777) is trusted; writable, it is not', { skip: process.getuid?.() !== 0 && 'needs root to mount' }, () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'nmi-ro-bindings-'));
  try {
    chmodSync(dir, 0o777);
    writeFileSync(path.join(dir, 'bindings.yaml'), '');
    const module = new URL('../../src/bindings/file-source.js', import.meta.url).href;
    const check = `import('${module}').then(async (m) => console.log(JSON.stringify((await m.bindingsTrustProblem('${dir}')) ?? null)))`;
    const run = (mount: string) => execFileSync('unshare', ['-m', '--propagation', 'private', 'sh', '-c', `${mount} "${process.execPath}" -e "${check}"`], { encoding: 'utf8' }).trim();
    assert.match(JSON.parse(run('')) as string, /is writable by its group and others \(mode 0777\)$/);
    assert.equal(JSON.parse(run(`mount --bind ${dir} ${dir} && mount -o remount,bind,ro ${dir} &&`)), null);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
