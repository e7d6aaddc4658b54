// Where clang or libbpf are missing at build time the addon still builds,
// without eBPF, and `--rules ebpf` is refused with a clear one-line reason.
// Built in a scratch copy (NMI_BUILD_BPF=0 stands for the missing tools), so
// the project's own build is left alone.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { cpSync, mkdtempSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { projectRoot } from '../harness/netns.js';

test('without eBPF at build time: the addon builds, links no libbpf, and --rules ebpf exits 2 saying why', () => {
  const work = mkdtempSync(path.join(tmpdir(), 'nmi-nobpf-'));
  try {
    for (const entry of ['bin', 'dist', 'native', 'binding.gyp', 'package.json']) cpSync(path.join(projectRoot, entry), path.join(work, entry), { recursive: true });
    symlinkSync(path.join(projectRoot, 'node_modules'), path.join(work, 'node_modules'));
    execFileSync('npx', ['node-gyp', 'rebuild'], { cwd: work, env: { ...process.env, NMI_BUILD_BPF: '0' }, stdio: 'pipe', timeout: 240_000 });
    assert.doesNotMatch(execFileSync('ldd', [path.join(work, 'build/Release/nmi.node')], { encoding: 'utf8' }), /libbpf/);
    const nmi = (args: string[]) => spawnSync(process.execPath, [path.join(work, 'bin/nmi.js'), ...args], { encoding: 'utf8', timeout: 30_000 });
    const run = nmi(['run', '--node-ip', '10.240.0.4', '--rules', 'ebpf']);
    assert.equal(run.status, 2, run.stderr);
    assert.deepEqual(run.stderr.trim().split('\n'), [
      'nmi run: --rules: ebpf is not available: this nmi was built without eBPF support (clang and libbpf-dev were missing at build time; install them and rebuild)',
    ]);
    // Looking at what is installed skips the backend that is not there (read-only: this is the host's namespace).
    const status = nmi(['status', '--json', '--probe-address', '127.0.0.1:1']);
    assert.equal(status.status, 0, status.stderr);
    assert.ok(!(JSON.parse(status.stdout) as { backends: { backend: string }[] }).backends.some((b) => b.backend === 'ebpf'));
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
});
