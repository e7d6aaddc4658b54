// systemd/nmi.service and systemd/nmi.env: the unit passes `systemd-analyze verify`
// and scores "OK" (<= 4.0) in `systemd-analyze security`; its ExecStopPost clean-up
// runs exactly when it should; the example env file names only real flags.
import { execFileSync, spawnSync } from 'node:child_process';
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { runFlags } from '../../src/config/commands.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const unitText = readFileSync(path.join(root, 'systemd', 'nmi.service'), 'utf8');
const envText = readFileSync(path.join(root, 'systemd', 'nmi.env'), 'utf8');
const INSTALLED_BIN = '/usr/bin/nmi';
const MAX_EXPOSURE = 4.0;

const dir = mkdtempSync(path.join(tmpdir(), 'nmi-unit-'));
after(() => rmSync(dir, { recursive: true, force: true }));

const analyze = spawnSync('systemd-analyze', ['--version'], { encoding: 'utf8' });
const skipAnalyze = analyze.error ? `systemd-analyze is not installed (${analyze.error.message})` : false;

/** Every value of a directive, in file order. */
function directive(name: string, text = unitText): string[] {
  return [...text.matchAll(new RegExp(`^${name}=(.*)$`, 'gm'))].map((m) => m[1]!);
}

/** A copy of the unit whose nmi binary exists (verify checks that executables do): a stub script. */
function unitCopy(name: string, edit: (text: string) => string = (t) => t): string {
  const sub = mkdtempSync(path.join(dir, `${name}-`));
  const bin = path.join(sub, 'nmi');
  writeFileSync(bin, '#!/bin/sh\n');
  chmodSync(bin, 0o755);
  const file = path.join(sub, 'nmi.service');
  writeFileSync(file, edit(unitText.replaceAll(INSTALLED_BIN, bin)));
  return file;
}

test('the unit is Type=notify with a watchdog, main-pid notifications and the installed binary', () => {
  assert.deepEqual(directive('Type'), ['notify']);
  assert.deepEqual(directive('NotifyAccess'), ['main']);
  // The rules are ExecStopPost's to remove (after a stop, not a restart): nmi itself keeps them.
  assert.deepEqual(directive('ExecStart'), [`${INSTALLED_BIN} run --on-exit keep`]);
  // Token port, probe address and host-token address outlive the process in systemd's store.
  assert.deepEqual(directive('FileDescriptorStoreMax'), ['4']);
  assert.deepEqual(directive('EnvironmentFile'), ['-/etc/default/nmi']);
  assert.deepEqual(directive('WatchdogSec'), ['30s']);
  assert.deepEqual(directive('Restart'), ['on-failure']);
  // A watchdog abort must not write tokens and Secrets to a core file (nmi also sets RLIMIT_CORE 0 itself).
  assert.deepEqual(directive('LimitCORE'), ['0']);
  assert.deepEqual(directive('WantedBy'), ['multi-user.target']);
  // Rules before any pod: nmi becomes READY while the kubelet is down (test/systemd/run-notify.test.ts).
  assert.deepEqual(directive('Before'), ['kubelet.service']);
  assert.deepEqual(directive('After'), ['network-online.target']);
  assert.deepEqual(directive('Wants'), ['network-online.target']);
  // The drain (10 s of in-flight requests) plus rule removal must fit in the stop timeout.
  const stop = /^(\d+)s$/.exec(directive('TimeoutStopSec')[0] ?? '');
  assert.ok(stop && Number(stop[1]) >= 20, `TimeoutStopSec ${directive('TimeoutStopSec')}`);
});

test('systemd-analyze verify: no warnings about the unit', { skip: skipAnalyze }, () => {
  const file = unitCopy('verify');
  const r = spawnSync('systemd-analyze', ['verify', file], { encoding: 'utf8' });
  const about = `${r.stdout}${r.stderr}`.split('\n').filter((l) => l.includes('nmi.service') || l.includes(path.dirname(file)));
  assert.deepEqual(about, [], `${r.stdout}${r.stderr}`);
  assert.equal(r.status, 0, r.stderr);
});

test('systemd-analyze verify catches a broken copy (the check can fail)', { skip: skipAnalyze }, () => {
  const file = unitCopy('broken', (t) => t.replace('WatchdogSec=', 'WatchdogSecs=').replace(/^ExecStart=.*$/m, 'ExecStart=/nonexistent/nmi run'));
  const r = spawnSync('systemd-analyze', ['verify', file], { encoding: 'utf8' });
  assert.match(r.stderr, /WatchdogSecs/);
  assert.match(r.stderr, /\/nonexistent\/nmi/);
  assert.notEqual(r.status, 0);
});

test(`systemd-analyze security: exposure <= ${MAX_EXPOSURE} ("OK")`, { skip: skipAnalyze }, () => {
  const file = unitCopy('security');
  // --offline (systemd 250+) analyzes the file itself, without a running manager.
  const r = spawnSync('systemd-analyze', ['security', '--offline=yes', '--no-pager', file], { encoding: 'utf8' });
  const m = /Overall exposure level for nmi\.service: (\d+(?:\.\d+)?) (\S+)/.exec(r.stdout);
  assert.ok(m, `no overall exposure in:\n${r.stdout}\n${r.stderr}`);
  const exposure = Number(m[1]);
  assert.ok(exposure <= MAX_EXPOSURE, `exposure ${exposure} > ${MAX_EXPOSURE}:\n${r.stdout}`);
  assert.equal(m[2], 'OK');
});

test('systemd-analyze security scores a bare unit as exposed (the parse sees real numbers)', { skip: skipAnalyze }, () => {
  const file = path.join(mkdtempSync(path.join(dir, 'bare-')), 'nmi.service');
  writeFileSync(file, '[Service]\nExecStart=/bin/true\n');
  const r = spawnSync('systemd-analyze', ['security', '--offline=yes', '--no-pager', file], { encoding: 'utf8' });
  const m = /Overall exposure level for nmi\.service: (\d+(?:\.\d+)?)/.exec(r.stdout);
  assert.ok(m && Number(m[1]) > MAX_EXPOSURE, r.stdout);
});

test('the capability bounding set is exactly what iptables, nft and conntrack need', () => {
  assert.deepEqual(directive('CapabilityBoundingSet'), ['CAP_NET_ADMIN CAP_NET_RAW']);
  assert.deepEqual(directive('NoNewPrivileges'), ['yes']);
  assert.deepEqual(directive('ProtectSystem'), ['strict']);
  // "-": the file does not exist yet when systemd sets up ExecStartPre's namespace (test/runtime/systemd.test.ts boots it).
  assert.deepEqual(directive('ReadWritePaths'), ['-/run/xtables.lock']);
  assert.deepEqual(directive('RestrictAddressFamilies'), ['AF_UNIX AF_INET AF_INET6 AF_NETLINK']);
  // V8 cannot run under it.
  assert.deepEqual(directive('MemoryDenyWriteExecute'), ['no']);
});

/** ExecStopPost's shell script as systemd hands it to sh ($$ → $), with the stub binary. */
function stopPostScript(bin: string): string {
  const [line] = directive('ExecStopPost');
  assert.ok(line, 'an ExecStopPost');
  const m = /^\/bin\/sh -c '(.*)'$/.exec(line);
  assert.ok(m, `ExecStopPost is a /bin/sh -c '...' line: ${line}`);
  return m[1]!.replaceAll('$$', '$').replaceAll(INSTALLED_BIN, bin);
}

test('ExecStopPost runs `nmi cleanup` unless --on-exit keep or nmi died on its own (a restart follows)', () => {
  const sub = mkdtempSync(path.join(dir, 'stoppost-'));
  const bin = path.join(sub, 'nmi');
  const calls = `${bin}.calls`;
  writeFileSync(bin, `#!/bin/sh\necho "$@" >>"${calls}"\n`);
  chmodSync(bin, 0o755);
  const script = stopPostScript(bin);
  const cases: [string | undefined, string, boolean][] = [
    ['remove', 'success', true], // systemctl stop: nmi removed them itself; cleanup is the safety net
    [undefined, 'success', true],
    ['remove', 'timeout', true], // killed at TimeoutStopSec mid-drain
    ['keep', 'success', false],
    ['keep', 'timeout', false],
    ['remove', 'exit-code', false],
    ['remove', 'signal', false],
    ['remove', 'core-dump', false],
    ['remove', 'watchdog', false],
  ];
  for (const [onExit, result, cleans] of cases) {
    rmSync(calls, { force: true });
    const env: NodeJS.ProcessEnv = { PATH: process.env.PATH, SERVICE_RESULT: result, ...(onExit ? { NMI_ON_EXIT: onExit } : {}) };
    execFileSync('/bin/sh', ['-c', script], { env });
    const ran = existsSync(calls) ? readFileSync(calls, 'utf8') : '';
    assert.equal(ran, cleans ? 'cleanup\n' : '', `NMI_ON_EXIT=${onExit} SERVICE_RESULT=${result}`);
  }
});

test('nmi.env: every NMI_ variable, set or commented, is a real `nmi run` flag', () => {
  const names = [...envText.matchAll(/^#?(NMI_[A-Z0-9_]+)=/gm)].map((m) => m[1]!);
  assert.ok(names.length >= 8, names.join());
  const flagVars = new Set(Object.keys(runFlags).map((f) => `NMI_${f.toUpperCase().replaceAll('-', '_')}`));
  assert.deepEqual(names.filter((n) => !flagVars.has(n)), []);
  const set = Object.fromEntries([...envText.matchAll(/^(NMI_[A-Z0-9_]+)=(.*)$/gm)].map((m) => [m[1]!, m[2]!]));
  assert.equal(set.NMI_KUBELET_CA, '/etc/kubernetes/certs/ca.crt');
  assert.equal(set.NMI_KUBELET_CLIENT_CERT, '/etc/kubernetes/certs/client.crt');
  assert.equal(set.NMI_KUBELET_CLIENT_KEY, '/etc/kubernetes/certs/client.key');
  assert.equal(set.NMI_KUBECONFIG, '/var/lib/kubelet/kubeconfig');
  assert.equal(set.NMI_BINDINGS, 'kubernetes');
  assert.equal(set.NMI_ON_EXIT, 'remove');
});
