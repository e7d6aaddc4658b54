// The Debian packages as dpkg sees them, the machine's and the arm64 one cross-built
// here: control fields, files, conffile and maintainer scripts, the runtime
// package-lock.json pins, and whether their ELF files can load on Ubuntu 22.04
// (glibc 2.35, libstdc++ of GCC 12), which cannot be booted here: no Ubuntu
// archive is reachable, so the symbol versions they ask for are checked instead.
// The arm64 package also runs, under qemu (binfmt_misc): installed with dpkg on an
// arm64 Debian 12 root, and its native server answering a pod through real rules.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, readlinkSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createCluster, crd, TOKEN_URL } from '../harness/cluster.js';
import { projectRoot } from '../harness/netns.js';
import { waitFor } from '../harness/wait-for.js';
import { inContainer, overlayRoot } from '../harness/nspawn.js';
import { hostArch, nmiPackage } from '../harness/runtime.js';
import { decodeStandinToken } from '../standins/imds.js';

/** What Ubuntu 22.04 provides: glibc 2.35, GLIBCXX_3.4.30 (libstdc++6 12.x). */
const JAMMY = { GLIBC: [2, 35], GLIBCXX: [3, 4, 30] } as const;

let deb: string;
let tree: string;

before(() => {
  deb = nmiPackage();
  tree = mkdtempSync(path.join(tmpdir(), 'nmi-deb-'));
  execFileSync('dpkg-deb', ['-R', deb, tree]);
});
after(() => rmSync(tree, { recursive: true, force: true }));

const { version } = JSON.parse(readFileSync(path.join(projectRoot, 'package.json'), 'utf8')) as { version: string };
const lock = JSON.parse(readFileSync(path.join(projectRoot, 'package-lock.json'), 'utf8')) as { packages: Record<string, { version: string }> };
/** The runtime version package-lock.json pins for a Debian architecture. */
const pinned = (arch: string) => lock.packages[`node_modules/node-linux-${arch === 'amd64' ? 'x64' : arch}`]!.version;

/** Both packages: named for their architecture, with Depends that only name what a stock Debian 12 or Ubuntu 22.04 has. */
function checkControl(debFile: string, arch: string): void {
  const fields = (name: string) => new RegExp(`^${name}: (.*)$`, 'm').exec(execFileSync('dpkg-deb', ['-f', debFile], { encoding: 'utf8' }))?.[1];
  assert.equal(path.basename(debFile), `nmi_${version}_${arch}.deb`);
  assert.equal(fields('Package'), 'nmi');
  assert.equal(fields('Version'), version);
  assert.equal(fields('Architecture'), arch);
  // Never Node.js or libbpf1; libatomic1 is the runtime's (Node.js 26 links it).
  const depends = (fields('Depends') ?? '').split(', ').map((d) => d.split(' ')[0]);
  assert.deepEqual([...depends].sort(), ['init-system-helpers', 'libatomic1', 'libc6', 'libelf1', 'libgcc-s1', 'libstdc++6', 'zlib1g']);
  assert.match(fields('Depends') ?? '', /libc6 \(>= 2\.(2\d|3[0-5])\)/, 'a libc6 Ubuntu 22.04 has');
  assert.equal(fields('Recommends'), 'iptables | nftables, conntrack');
}

test('named nmi_<version>_<arch>.deb for the machine; Depends names only what a stock Debian 12 or Ubuntu 22.04 has', () => {
  checkControl(deb, hostArch);
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

/** readelf's name for each architecture's machine. */
const MACHINE: Record<string, string> = { amd64: 'Advanced Micro Devices X86-64', arm64: 'AArch64' };

/** Every ELF file of an unpacked package is for `arch` and asks for no glibc or libstdc++ symbol version newer than Ubuntu 22.04 has. */
function checkElves(root: string, arch: string): void {
  const elves = ['usr/lib/nmi/bin/node', 'usr/lib/nmi/build/Release/nmi.node', 'usr/lib/nmi/build/Release/libbpf.so.1'];
  for (const elf of elves) {
    const file = path.join(root, elf);
    assert.match(execFileSync('readelf', ['-h', file], { encoding: 'utf8' }), new RegExp(`Machine:\\s+${MACHINE[arch]}\n`), `${elf} is for ${arch}`);
    // readelf, unlike objdump, reads every architecture's version needs.
    const needs = execFileSync('readelf', ['-V', '-W', file], { encoding: 'utf8', maxBuffer: 64 << 20 });
    const wanted = [...new Set(needs.match(/\bGLIBC(XX)?_[0-9.]+/g) ?? [])];
    assert.ok(wanted.length > 0, `${elf} names symbol versions`);
    const tooNew = wanted.filter((v) => newer(versionOf(v), v.startsWith('GLIBCXX_') ? JAMMY.GLIBCXX : JAMMY.GLIBC));
    assert.deepEqual(tooNew, [], elf);
  }
  // The addon finds the libbpf shipped beside it first.
  assert.match(execFileSync('readelf', ['-d', path.join(root, 'usr/lib/nmi/build/Release/nmi.node')], { encoding: 'utf8' }), /RUNPATH.*\[\$ORIGIN\]/);
}

test('no ELF file asks for a glibc or libstdc++ symbol newer than Ubuntu 22.04 has', () => {
  checkElves(tree, hostArch);
});

test('the check above can fail: a symbol version past Ubuntu 22.04 is caught', () => {
  assert.ok(newer(versionOf('GLIBC_2.36'), JAMMY.GLIBC));
  assert.ok(newer(versionOf('GLIBCXX_3.4.31'), JAMMY.GLIBCXX));
  assert.ok(!newer(versionOf('GLIBC_2.34'), JAMMY.GLIBC));
  assert.ok(!newer(versionOf('GLIBCXX_3.4'), JAMMY.GLIBCXX));
});

test('the packaged runtime is the one package-lock.json pins, and nmi --version names it', () => {
  const node = path.join(tree, 'usr/lib/nmi/bin/node');
  assert.equal(execFileSync(node, ['--version'], { encoding: 'utf8' }).trim(), `v${pinned(hostArch)}`);
  const line = execFileSync(node, [path.join(tree, 'usr/lib/nmi/bin/nmi.js'), '--version'], { encoding: 'utf8', env: { PATH: '' } });
  assert.equal(line, `nmi ${version} (Node.js v${pinned(hostArch)}, linux-${process.arch}, N-API ${process.versions.napi})\n`);
});

test('the packaged nmi runs from its own runtime with an empty PATH (no Node.js needed)', () => {
  const out = execFileSync(path.join(tree, 'usr/lib/nmi/bin/node'), [path.join(tree, 'usr/lib/nmi/bin/nmi.js'), 'cleanup', '--help'], { encoding: 'utf8', env: { PATH: '' } });
  assert.match(out, /Usage: nmi cleanup/);
  const addon = execFileSync(path.join(tree, 'usr/lib/nmi/bin/node'), ['-e', `require(${JSON.stringify(path.join(tree, 'usr/lib/nmi/build/Release/nmi.node'))}); console.log('loaded')`], { encoding: 'utf8', env: { PATH: '' } });
  assert.equal(addon.trim(), 'loaded');
});

describe('the arm64 package, cross-built here, run under qemu', () => {
  let deb64: string;
  let tree64: string;
  let overlay: ReturnType<typeof overlayRoot>;
  before(() => {
    deb64 = nmiPackage('arm64');
    tree64 = mkdtempSync(path.join(tmpdir(), 'nmi-deb-arm64-'));
    execFileSync('dpkg-deb', ['-R', deb64, tree64]);
    overlay = overlayRoot('arm64');
  });
  after(() => {
    overlay?.remove();
    rmSync(tree64, { recursive: true, force: true });
  });
  /** A command in the arm64 root, every arm64 program of it emulated. */
  const inArm64 = (args: string[]) => inContainer(overlay.root, args);

  test('named nmi_<version>_arm64.deb, with the same Depends', () => {
    checkControl(deb64, 'arm64');
  });

  test('its ELF files are aarch64 and ask for no glibc or libstdc++ symbol newer than Ubuntu 22.04 has', () => {
    checkElves(tree64, 'arm64');
  });

  test('dpkg -i installs it on an arm64 Debian 12; nmi --version names the pinned runtime; the addon loads', () => {
    const install = inContainer(overlay.root, ['dpkg', '-i', '/var/tmp/nmi.deb'], [{ host: deb64, at: '/var/tmp/nmi.deb' }]);
    assert.match(install, /Setting up nmi \(/);
    // trim: nspawn gives the command a terminal's \r\n.
    assert.equal(inArm64(['nmi', '--version']).trim(), `nmi ${version} (Node.js v${pinned('arm64')}, linux-arm64, N-API ${process.versions.napi})`);
    assert.equal(inArm64(['/usr/lib/nmi/bin/node', '-p', "typeof require('/usr/lib/nmi/build/Release/nmi.node').serverStart"]).trim(), 'function');
  });

  test("its native server answers a pod's token through real rules, then from the C++ cache", async () => {
    const cluster = await createCluster();
    try {
      const pod = cluster.addPod({ name: 'pod-a', labels: { aadpodidbinding: 'a' } });
      const client = '11111111-1111-1111-1111-111111111111';
      cluster.writeBindings([crd.userAssigned('id-a', client, '/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a'), crd.binding('bind-a', 'id-a', 'a')]);
      // The installed tree, run from the host's side: qemu takes its loader and libraries from the arm64
      // root (QEMU_LD_PREFIX) and, for a path not in it, the host's file, so the rules tools nmi runs are the host's.
      const lib = path.join(overlay.root, 'usr/lib/nmi');
      const nmi = await cluster.startNmi(['--server', 'native'], {
        command: [path.join(lib, 'bin/node'), path.join(lib, 'bin/nmi.js')],
        env: { ...process.env, QEMU_LD_PREFIX: overlay.root },
        readyTimeoutMs: 120_000,
      });
      const agent = await pod.ns.agent();
      try {
        const url = `${TOKEN_URL}?api-version=2018-02-01&resource=${encodeURIComponent('https://management.azure.com/')}`;
        const token = async () => {
          const r = await agent.http(url, { headers: { Metadata: 'true' } });
          assert.equal(r.status, 200, r.body);
          assert.equal(decodeStandinToken((JSON.parse(r.body) as { access_token: string }).access_token).appid, client);
        };
        await token();
        // The token reaches the C++ cache a moment after JS answered (slower under emulation): ask until a hit is counted.
        const hits = () => nmi.metric('nmi_native_requests_total\\{result="hit"\\}');
        await waitFor(`a hit from C++\n${nmi.output()}`, async () => (await token(), ((await hits()) ?? 0) >= 1 || undefined), 60_000);
        // What answered was the arm64 runtime, emulated (binfmt_misc runs qemu as the process).
        assert.match(readlinkSync(`/proc/${nmi.child.pid}/exe`), /qemu-aarch64/);
      } finally {
        await agent.close();
      }
    } finally {
      await cluster.close();
    }
  });
});
