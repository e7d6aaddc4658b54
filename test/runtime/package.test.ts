// The Debian package as dpkg sees it: its control fields, files, conffile and
// maintainer scripts, and whether its ELF files can load on Ubuntu 22.04
// (glibc 2.35, libstdc++ of GCC 12), which cannot be booted here: no Ubuntu
// archive is reachable, so the symbol versions they ask for are checked instead.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, readlinkSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { projectRoot } from '../harness/netns.js';
import { nmiPackage } from '../harness/runtime.js';

/** What Ubuntu 22.04 provides: glibc 2.35, GLIBCXX_3.4.30 (libstdc++6 12.x). */
const JAMMY = { GLIBC: [2, 35], GLIBCXX: [3, 4, 30] } as const;

let deb: string;
let tree: string;
const control = () => execFileSync('dpkg-deb', ['-f', deb], { encoding: 'utf8' });
const field = (name: string) => new RegExp(`^${name}: (.*)$`, 'm').exec(control())?.[1];

before(() => {
  deb = nmiPackage();
  tree = mkdtempSync(path.join(tmpdir(), 'nmi-deb-'));
  execFileSync('dpkg-deb', ['-R', deb, tree]);
});
after(() => rmSync(tree, { recursive: true, force: true }));

test('named nmi_<version>_<arch>.deb, with the version of package.json and the machine architecture', () => {
  const { version } = JSON.parse(readFileSync(path.join(projectRoot, 'package.json'), 'utf8')) as { version: string };
  const arch = execFileSync('dpkg', ['--print-architecture'], { encoding: 'utf8' }).trim();
  assert.equal(path.basename(deb), `nmi_${version}_${arch}.deb`);
  assert.equal(field('Package'), 'nmi');
  assert.equal(field('Version'), version);
  assert.equal(field('Architecture'), arch);
});

test('Depends names only what a stock Debian 12 or Ubuntu 22.04 has; never Node.js or libbpf1', () => {
  const depends = (field('Depends') ?? '').split(', ').map((d) => d.split(' ')[0]);
  assert.deepEqual([...depends].sort(), ['init-system-helpers', 'libc6', 'libelf1', 'libgcc-s1', 'libstdc++6', 'zlib1g']);
  assert.match(field('Depends') ?? '', /libc6 \(>= 2\.(2\d|3[0-5])\)/, 'a libc6 Ubuntu 22.04 has');
  assert.equal(field('Recommends'), 'iptables | nftables, conntrack');
});

test('the runtime, the app, the link on the PATH, the unit and the conffile are where the unit and README say', () => {
  for (const file of ['usr/lib/nmi/bin/node', 'usr/lib/nmi/bin/nmi.js', 'usr/lib/nmi/dist/src/cli/main.js', 'usr/lib/nmi/build/Release/nmi.node', 'usr/lib/nmi/node_modules/@azure/msal-node/package.json', 'lib/systemd/system/nmi.service', 'etc/default/nmi', 'usr/share/doc/nmi/copyright']) {
    assert.ok(readFileSync(path.join(tree, file)).length > 0, file);
  }
  assert.equal(readlinkSync(path.join(tree, 'usr/bin/nmi')), '../lib/nmi/bin/nmi.js');
  assert.equal(readFileSync(path.join(tree, 'usr/lib/nmi/bin/nmi.js'), 'utf8').split('\n')[0], '#!/usr/lib/nmi/bin/node');
  assert.match(readFileSync(path.join(tree, 'lib/systemd/system/nmi.service'), 'utf8'), /^ExecStart=\/usr\/bin\/nmi run --on-exit keep$/m);
  assert.equal(readFileSync(path.join(tree, 'DEBIAN/conffiles'), 'utf8'), '/etc/default/nmi\n');
  // Development dependencies and the tests stay out.
  for (const absent of ['usr/lib/nmi/node_modules/typescript', 'usr/lib/nmi/node_modules/node-gyp', 'usr/lib/nmi/dist/test']) {
    assert.throws(() => readFileSync(path.join(tree, absent, 'package.json')), absent);
  }
});

function versionOf(symbolVersion: string): number[] {
  return symbolVersion.split('_')[1]!.split('.').map(Number);
}

function newer(a: readonly number[], b: readonly number[]): boolean {
  for (let i = 0; i < Math.max(a.length, b.length); i++) if ((a[i] ?? 0) !== (b[i] ?? 0)) return (a[i] ?? 0) > (b[i] ?? 0);
  return false;
}

test('no ELF file asks for a glibc or libstdc++ symbol newer than Ubuntu 22.04 has', () => {
  const elves = ['usr/lib/nmi/bin/node', 'usr/lib/nmi/build/Release/nmi.node', 'usr/lib/nmi/build/Release/libbpf.so.1'];
  for (const elf of elves) {
    const symbols = execFileSync('objdump', ['-T', path.join(tree, elf)], { encoding: 'utf8', maxBuffer: 64 << 20 });
    const wanted = [...new Set(symbols.match(/\bGLIBC(XX)?_[0-9.]+/g) ?? [])];
    assert.ok(wanted.length > 0, `${elf} names symbol versions`);
    const tooNew = wanted.filter((v) => newer(versionOf(v), v.startsWith('GLIBCXX_') ? JAMMY.GLIBCXX : JAMMY.GLIBC));
    assert.deepEqual(tooNew, [], elf);
  }
  // The addon finds the libbpf shipped beside it first.
  assert.match(execFileSync('readelf', ['-d', path.join(tree, 'usr/lib/nmi/build/Release/nmi.node')], { encoding: 'utf8' }), /RUNPATH.*\[\$ORIGIN\]/);
});

test('the check above can fail: a symbol version past Ubuntu 22.04 is caught', () => {
  assert.ok(newer(versionOf('GLIBC_2.36'), JAMMY.GLIBC));
  assert.ok(newer(versionOf('GLIBCXX_3.4.31'), JAMMY.GLIBCXX));
  assert.ok(!newer(versionOf('GLIBC_2.34'), JAMMY.GLIBC));
  assert.ok(!newer(versionOf('GLIBCXX_3.4'), JAMMY.GLIBCXX));
});

test('the packaged nmi runs from its own runtime with an empty PATH (no Node.js needed)', () => {
  const out = execFileSync(path.join(tree, 'usr/lib/nmi/bin/node'), [path.join(tree, 'usr/lib/nmi/bin/nmi.js'), 'cleanup', '--help'], { encoding: 'utf8', env: { PATH: '' } });
  assert.match(out, /Usage: nmi cleanup/);
  const addon = execFileSync(path.join(tree, 'usr/lib/nmi/bin/node'), ['-e', `require(${JSON.stringify(path.join(tree, 'usr/lib/nmi/build/Release/nmi.node'))}); console.log('loaded')`], { encoding: 'utf8', env: { PATH: '' } });
  assert.equal(addon.trim(), 'loaded');
});
