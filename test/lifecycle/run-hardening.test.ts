// `nmi run` keeps its memory and its configuration to itself. No core file
// (RLIMIT_CORE 0, whatever it was started with) and not dumpable, so no process of
// its uid reads its memory: observed from outside, as the kernel shows it,
// /proc/<pid>/limits, the owner of a non-root process's /proc files (root once it
// is not dumpable), and a process of nmi's uid refused its /proc/<pid>/environ.
// nmi runs as nobody when this test runs as root (setpriv), else as the test's own
// user. And a bindings file another user may write stops it at start, exit 2.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { chmodSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { nmiAsync, startNmi, type NmiProcess } from '../harness/nmi-process.js';
import { startKubelet, type Kubelet } from '../standins/kubelet.js';
import { createPki, type Pki } from '../standins/pki.js';
import { asUser, NOBODY } from '../harness/users.js';

const asRoot = process.getuid?.() === 0;
/** Run as nobody when we are root: a non-root nmi is what shows dumpability in /proc's owners. */
const asOther = asRoot ? asUser(NOBODY) : [];

let pki: Pki;
let kubelet: Kubelet;
let dir: string;
let daemon: NmiProcess;

before(async () => {
  pki = createPki();
  kubelet = await startKubelet({ pki });
  // The stand-in's CA and client key must be readable by nobody too.
  chmodSync(pki.dir, 0o755);
  for (const name of readdirSync(pki.dir)) chmodSync(path.join(pki.dir, name), 0o644);
  dir = mkdtempSync(path.join(tmpdir(), 'nmi-core-'));
  chmodSync(dir, 0o755);
  const bindings = path.join(dir, 'bindings.yaml');
  writeFileSync(bindings, '', { mode: 0o644 });
  // Started with core files allowed, as a shell with `ulimit -c unlimited` would: nmi must turn them off itself.
  daemon = await startNmi(['--node-ip', '127.0.0.1', '--port', '28579', '--bindings', bindings, ...kubeletFlags()], {
    probe: '127.0.0.1:28585',
    prefix: ['prlimit', '--core=unlimited', '--', ...asOther],
  });
});

function kubeletFlags(): string[] {
  return [
    '--rules', 'none', '--kubelet-url', kubelet.url.href, '--kubelet-ca', kubelet.caFile,
    '--kubelet-client-cert', kubelet.client.cert, '--kubelet-client-key', kubelet.client.key, '--kubelet-server-name', '127.0.0.1',
  ];
}

after(async () => {
  await daemon?.stop();
  await kubelet?.close();
  pki?.remove();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

test('the running daemon may write no core file: RLIMIT_CORE 0 soft and hard', () => {
  const limits = readFileSync(`/proc/${daemon.child.pid}/limits`, 'utf8');
  assert.match(limits, /^Max core file size\s+0\s+0\s+bytes\s*$/m, limits);
});

test('the running daemon is not dumpable: its /proc files are root\'s though it runs as another uid', () => {
  const pid = daemon.child.pid!;
  const uid = Number(/^Uid:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1]);
  assert.notEqual(uid, 0, 'nmi runs as a non-root uid here');
  // The kernel gives a process's /proc entries to root once it is not dumpable (task_dump_owner).
  assert.equal(statSync(`/proc/${pid}/status`).uid, 0);
  // And a process of nmi's own uid may not read what ptrace would show.
  const peek = spawnSync(asOther[0] ?? 'cat', asOther.length > 0 ? [...asOther.slice(1), 'cat', `/proc/${pid}/environ`] : [`/proc/${pid}/environ`], { encoding: 'utf8' });
  assert.notEqual(peek.status, 0, 'reading its environment must fail');
  assert.match(peek.stderr, /Permission denied/);
});

test('nmi run with a bindings file others may write: exit 2, the last line naming --bindings, the path and why', async () => {
  const open = path.join(dir, 'open.yaml');
  writeFileSync(open, '');
  chmodSync(open, 0o646);
  const r = await nmiAsync(['run', '--node-ip', '127.0.0.1', '--port', '28589', '--probe-address', '127.0.0.1:28590', '--bindings', open, ...kubeletFlags()]);
  assert.equal(r.code, 2, r.stderr);
  assert.equal(r.stderr.trim().split('\n').at(-1), `nmi run: --bindings ${open}: refused: ${open} is writable by others (mode 0646)`);
});
