#!/usr/bin/env node
// `npm test [-- filter...]`: builds, then runs every test file (every tier, test/README.md) with
// node's test runner, on the runtime nmi ships (scripts/runtime.sh), not whichever node started
// this script, so the tests that spawn nmi (process.execPath) run it as the package does.
// `npm run test:<tier> [-- filter...]` (node scripts/test.js --tier <tier>) runs one tier; unit
// and layout need no root. The other tiers build network namespaces and rules: each file makes
// its own namespaces, so files run in parallel. Leftover namespaces of a crashed run are removed at the end.
import { execFileSync, spawnSync } from 'node:child_process';
import { readdirSync, rmSync, statSync } from 'node:fs';
import path from 'node:path';

// Each test file's tier, by its folder under test/ or by the file itself (a file's entry wins over
// its folder's). Written down rather than guessed from what a file does, so that test:unit never
// runs one that needs root; a folder listed nowhere fails the run until it is.
const TIERS = {
  // Pure: no root, no network namespaces, no network (stand-ins on 127.0.0.1, nmi without rules).
  unit: {
    root: false,
    paths: ['attest/', 'audit/', 'bindings/', 'budget/', 'cli/', 'deploy/', 'errors/', 'events/', 'kube/', 'kubelet/', 'lifecycle/', 'metrics/',
      'net/', 'probe/', 'server/', 'standins/', 'systemd/', 'tokens/'],
  },
  // The source's own structure: imports between folders, metric names, shell scripts.
  layout: { root: false, paths: ['layout/'] },
  // One part against the real system, as root.
  integration: {
    root: true,
    paths: [
      'demo/', // nmi demo: its node and pod namespaces
      'native/', // rebuilds the addon (node-gyp, with the headers npm ci cached for root)
      'server/host-token.test.js', // the socket's root ownership; a caller that is not root (setuid)
      'systemd/run-notify.test.js', // nmi run in a node namespace, its kubelet there
    ],
  },
  // A whole node: namespaces, rules (iptables, nftables, eBPF), stand-ins, nmi.
  e2e: { root: true, paths: ['e2e/'] },
  // The .deb, systemd-nspawn on debootstrap's Debian 12, podman, arm64 under qemu.
  runtime: { root: true, paths: ['runtime/'] },
};

function tierOf(relative) {
  let best;
  for (const [tier, { paths }] of Object.entries(TIERS)) {
    for (const p of paths) if (relative.startsWith(p) && (!best || p.length > best.path.length)) best = { tier, path: p };
  }
  return best?.tier;
}

const args = process.argv.slice(2);
const tierAt = args.indexOf('--tier');
const tier = tierAt >= 0 ? args.splice(tierAt, 2)[1] : 'all';
if (tier !== 'all' && !(tier in TIERS)) {
  console.error(`npm test: no tier ${tier}; the tiers are ${Object.keys(TIERS).join(', ')} (test/README.md)`);
  process.exit(2);
}
const tiers = tier === 'all' ? Object.keys(TIERS) : [tier];
const root = process.getuid?.() === 0;
if (!root && tiers.some((t) => TIERS[t].root)) {
  console.error(`npm test: the ${tier === 'all' ? 'integration, e2e and runtime tiers need' : `${tier} tier needs`} root (network namespaces, rules, containers); run as root, or npm run test:unit / test:layout, which need none`);
  process.exit(2);
}

const projectRoot = path.resolve(import.meta.dirname ?? path.dirname(new URL(import.meta.url).pathname), '..');
execFileSync('npx', ['tsc', '-p', projectRoot], { stdio: 'inherit', cwd: projectRoot });

function files(dir) {
  return readdirSync(dir).flatMap((name) => {
    const full = path.join(dir, name);
    if (statSync(full).isDirectory()) return files(full);
    return name.endsWith('.test.js') ? [full] : [];
  });
}

const testDir = path.join(projectRoot, 'dist', 'test');
const unlisted = [];
const chosen = files(testDir).filter((f) => {
  const t = tierOf(path.relative(testDir, f));
  if (!t) unlisted.push(path.relative(testDir, f));
  return t !== undefined && tiers.includes(t);
});
if (unlisted.length > 0) {
  console.error(`npm test: no tier for ${unlisted.join(', ')}: list its folder or file in scripts/test.js (TIERS)`);
  process.exit(2);
}
const runtime = path.join(execFileSync('bash', [path.join(projectRoot, 'scripts', 'runtime.sh')], { encoding: 'utf8' }).trim(), 'bin', 'node');
const all = chosen.filter((f) => args.length === 0 || args.some((x) => f.includes(x)));
// With no file, node's runner would look for tests all over the checkout.
if (all.length === 0) {
  console.error(`npm test: no test file of the ${tiers.join(', ')} tier${tiers.length > 1 ? 's' : ''} matches ${args.join(' ')}`);
  process.exit(2);
}
// NMI_TEST_RUN: the files of this run share one Debian package (test/harness/runtime.ts), removed at the end.
const result = spawnSync(runtime, ['--test', '--test-concurrency=4', '--test-timeout=300000', ...all], {
  stdio: 'inherit',
  cwd: projectRoot,
  env: { ...process.env, NMI_TEST_RUN: String(process.pid) },
});
rmSync(`/tmp/nmi-pkg-${process.pid}`, { recursive: true, force: true });

if (root) {
  // Only namespaces of test processes that are gone: another run may be going on.
  const alive = (pid) => { try { process.kill(pid, 0); return true; } catch { return false; } };
  const leftovers = spawnSync('ip', ['netns', 'list'], { encoding: 'utf8' }).stdout.split('\n').map((l) => l.split(' ')[0])
    .filter((n) => /^nmi-t\d+-/.test(n ?? '') && !alive(Number(/^nmi-t(\d+)-/.exec(n)[1])));
  for (const ns of leftovers) spawnSync('ip', ['netns', 'del', ns]);
}
process.exit(result.status ?? 1);
