// `nmi run` re-executes itself with its server's node flags: which argv it
// builds, and the real thing (same pid, the flags in /proc/<pid>/cmdline).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { NODE_FLAGS, nodeArgs } from '../../src/lifecycle/node-flags.js';
import { addon } from '../../src/native/addon.js';
import { nmiBin } from '../harness/netns.js';

const script = ['/usr/bin/node', '/opt/nmi/bin/nmi.js', 'run', '--server', 'js'];

test('a node started without the flags gets them, before the script and its arguments', () => {
  assert.deepEqual(nodeArgs(NODE_FLAGS.js, [], script), [...NODE_FLAGS.js, '/opt/nmi/bin/nmi.js', 'run', '--server', 'js']);
});

test('a node already running with exactly the flags is left alone', () => {
  assert.equal(nodeArgs(NODE_FLAGS.native, [...NODE_FLAGS.native], script), undefined);
  assert.equal(nodeArgs(NODE_FLAGS.js, ['--cpu-prof', ...NODE_FLAGS.js, '--inspect'], script), undefined);
});

test("the other server's flags are replaced, every other node option is kept in its place", () => {
  const execArgv = ['--cpu-prof', '--cpu-prof-dir=/tmp/p', ...NODE_FLAGS.native, '--stack-size=900'];
  assert.deepEqual(nodeArgs(NODE_FLAGS.js, execArgv, script), ['--cpu-prof', '--cpu-prof-dir=/tmp/p', '--stack-size=900', ...NODE_FLAGS.js, '/opt/nmi/bin/nmi.js', 'run', '--server', 'js']);
});

test('a managed flag spelled with underscores, negated or with another value counts as set, and is replaced', () => {
  for (const spelling of ['--max_semi_space_size=1', '--max-semi-space-size=16', '--memory-reducer', '--no-optimize-for-size']) {
    const args = nodeArgs(NODE_FLAGS.native, [spelling], script);
    assert.deepEqual(args, [...NODE_FLAGS.native, '/opt/nmi/bin/nmi.js', 'run', '--server', 'js'], spelling);
  }
});

test('exec reports why it failed and leaves the process running, its descriptors as they were', () => {
  const fdFlags = () => [0, 1, 2].map((fd) => /^flags:\s+(\d+)$/m.exec(readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'))?.[1]);
  const before = fdFlags();
  assert.throws(() => addon().exec('/nonexistent/node', ['/nonexistent/node'], []), { code: 'NMI_ERR_NATIVE_CALL', message: /No such file/ });
  assert.deepEqual(fdFlags(), before);
  assert.throws(() => addon().exec('/bin/true', ['a\0b'] as string[], []), /NUL/);
  assert.throws(() => addon().exec('/bin/true', [1] as unknown as string[], []), /array of strings/);
});

/** Starts `nmi run` against a kubelet that never answers (so it stays at its first sync), and reads its cmdline once it has re-executed. */
async function cmdlineOf(server: 'native' | 'js', nodeOptions: string[]): Promise<string[]> {
  const silent = net.createServer(() => {}).listen(0, '127.0.0.1');
  await once(silent, 'listening');
  const probe = net.createServer().listen(0, '127.0.0.1');
  await once(probe, 'listening');
  const probePort = (probe.address() as net.AddressInfo).port;
  probe.close();
  const bindings = mkdtempSync(path.join(tmpdir(), 'nmi-flags-'));
  const child = spawn(process.execPath, [...nodeOptions, nmiBin, 'run', '--server', server, '--node-ip', '127.0.0.1', '--port', '65000', '--rules', 'none',
    '--probe-address', `127.0.0.1:${probePort}`, '--kubelet-url', `https://127.0.0.1:${(silent.address() as net.AddressInfo).port}`, '--bindings', bindings],
    { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  try {
    for (let i = 0; i < 200; i++) {
      if (child.exitCode !== null) throw new Error(`nmi run exited ${child.exitCode}: ${stderr}`);
      const cmdline = readFileSync(`/proc/${child.pid}/cmdline`, 'utf8').split('\0').slice(0, -1);
      if (NODE_FLAGS[server].every((flag) => cmdline.includes(flag))) return cmdline;
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
    throw new Error(`pid ${child.pid} never ran with ${NODE_FLAGS[server].join(' ')}: ${stderr}`);
  } finally {
    child.kill('SIGKILL');
    if (child.exitCode === null && child.signalCode === null) await once(child, 'exit');
    silent.close();
    silent.unref();
    rmSync(bindings, { recursive: true, force: true });
  }
}

test('a re-executed nmi writes to the stderr it was started with (node marks inherited descriptors close-on-exec)', () => {
  const r = spawnSync(process.execPath, [nmiBin, 'run', '--server', 'js', '--node-ip', '10.240.0.4', '--rules', 'none', '--kubelet-client-cert', '/x.crt'], { encoding: 'utf8' });
  assert.equal(r.status, 2);
  assert.equal(r.stderr, 'nmi run: --kubelet-client-cert: cannot read /x.crt: ENOENT\n');
});

test('nmi run re-executes itself with its server flags under the same pid, keeping node options it was given', async () => {
  const js = await cmdlineOf('js', ['--stack-size=900']);
  assert.deepEqual(js.slice(1, 2 + NODE_FLAGS.js.length), ['--stack-size=900', ...NODE_FLAGS.js]);
  assert.ok(!js.includes('--optimize-for-size'));
  const native = await cmdlineOf('native', [...NODE_FLAGS.js]);
  assert.deepEqual(native.slice(1, 1 + NODE_FLAGS.native.length), [...NODE_FLAGS.native]);
  assert.equal(native.filter((arg) => arg === '--v8-pool-size=2').length, 1);
});
