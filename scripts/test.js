#!/usr/bin/env node
// `npm test`: builds, then runs every test file with node's test runner, on the
// runtime nmi ships (scripts/runtime.sh), not whichever node started this script, so
// the tests that spawn nmi (process.execPath) run it as the package does. The
// namespace tests need root; each makes its own namespaces, so files run in
// parallel. Leftover namespaces of a crashed run are removed at the end.
import { execFileSync, spawnSync } from 'node:child_process';
import { readdirSync, rmSync, statSync } from 'node:fs';
import path from 'node:path';

if (process.getuid?.() !== 0) {
  console.error('npm test: the tests build network namespaces and rules; run as root');
  process.exit(2);
}

const root = path.resolve(import.meta.dirname ?? path.dirname(new URL(import.meta.url).pathname), '..');
execFileSync('npx', ['tsc', '-p', root], { stdio: 'inherit', cwd: root });

function files(dir) {
  return readdirSync(dir).flatMap((name) => {
    const full = path.join(dir, name);
    if (statSync(full).isDirectory()) return files(full);
    return name.endsWith('.test.js') ? [full] : [];
  });
}

const runtime = path.join(execFileSync('bash', [path.join(root, 'scripts', 'runtime.sh')], { encoding: 'utf8' }).trim(), 'bin', 'node');
const filter = process.argv.slice(2);
const all = files(path.join(root, 'dist', 'test')).filter((f) => filter.length === 0 || filter.some((x) => f.includes(x)));
// NMI_TEST_RUN: the files of this run share one Debian package (test/harness/runtime.ts), removed at the end.
const result = spawnSync(runtime, ['--test', '--test-concurrency=4', '--test-timeout=300000', ...all], {
  stdio: 'inherit',
  cwd: root,
  env: { ...process.env, NMI_TEST_RUN: String(process.pid) },
});
rmSync(`/tmp/nmi-pkg-${process.pid}`, { recursive: true, force: true });

// Only namespaces of test processes that are gone: another run may be going on.
const alive = (pid) => { try { process.kill(pid, 0); return true; } catch { return false; } };
const leftovers = spawnSync('ip', ['netns', 'list'], { encoding: 'utf8' }).stdout.split('\n').map((l) => l.split(' ')[0])
  .filter((n) => /^nmi-t\d+-/.test(n ?? '') && !alive(Number(/^nmi-t(\d+)-/.exec(n)[1])));
for (const ns of leftovers) spawnSync('ip', ['netns', 'del', ns]);
process.exit(result.status ?? 1);
