// Operators' mistakes: exit 2 and one line naming the flag, before anything on the host changes.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { chmodSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { nmi } from '../harness/nmi-process.js';

const base = ['run', '--node-ip', '10.240.0.4'];

function oneLine(args: string[], flag: RegExp, env: NodeJS.ProcessEnv = process.env) {
  const r = nmi(args, env);
  assert.equal(r.code, 2, `exit 2 for ${args.join(' ')}: ${r.stderr}`);
  const lines = r.stderr.trim().split('\n');
  assert.equal(lines.length, 1, `one line: ${r.stderr}`);
  assert.match(lines[0]!, flag);
  assert.equal(r.stdout, '');
}

test('bad values name their flag', () => {
  oneLine([...base, '--rules', 'ipfw'], /--rules: "ipfw" is not one of auto, iptables, nftables, ebpf, none/);
  oneLine(['run', '--node-ip', '10.0.0'], /--node-ip: "10\.0\.0" is not an IPv4 address/);
  oneLine(['run', '--node-ip', 'fe80::1'], /--node-ip: .* is not an IPv4 address/);
  oneLine([...base, '--port', '65536'], /--port: "65536" is not a port/);
  oneLine([...base, '--port', '0'], /--port: "0" is not a port/);
  oneLine([...base, '--metadata-port', '-1'], /--metadata-port/);
  oneLine([...base, '--sync-interval', 'soon'], /--sync-interval: "soon" is not a positive duration/);
  oneLine([...base, '--imds-max-concurrent', '0'], /--imds-max-concurrent: "0" is not a positive whole number/);
  oneLine([...base, '--imds-max-concurrent', '2.5'], /--imds-max-concurrent: "2\.5" is not a positive whole number/);
  oneLine([...base, '--imds-max-rate', '20/h'], /--imds-max-rate: "20\/h" is not a positive rate/);
  oneLine([...base, '--imds-max-rate', '0/s'], /--imds-max-rate: "0\/s" is not a positive rate/);
  oneLine([...base, '--aad-max-rate', 'fast'], /--aad-max-rate: "fast" is not a positive rate/);
  oneLine([...base, '--imds-metadata-max-rate', '-5/s'], /--imds-metadata-max-rate/);
  oneLine([...base, '--max-tokens-per-pod', 'many'], /--max-tokens-per-pod: "many" is not a positive whole number/);
  oneLine(['run', '--node-ip', '10.240.0.4'], /--max-pending-per-pod: "0"/, { ...process.env, NMI_MAX_PENDING_PER_POD: '0' });
  oneLine([...base, '--upstream-imds', 'ftp://x'], /--upstream-imds: .* must be an http or https URL/);
  oneLine([...base, '--probe-address', 'localhost'], /--probe-address: "localhost" is not ADDRESS:PORT/);
  oneLine([...base, '--force-namespaced=maybe'], /--force-namespaced: "maybe" is not true or false/);
  oneLine([...base, '--host-token-socket', 'relative.sock'], /--host-token-socket: .* must be an absolute path or off/);
  oneLine([...base, '--host-token-address', '127.0.0.1'], /^nmi run: --host-token-address: "127\.0\.0\.1" is not ADDRESS:PORT$/);
  oneLine([...base, '--host-token-allow', 'kube-system/app'], /^nmi run: --host-token-allow: "kube-system\/app" is not host-root or namespace\/label=value$/);
  oneLine([...base, '--host-token-allow', 'Kube_System/app=x'], /^nmi run: --host-token-allow: "Kube_System" in "Kube_System\/app=x" is not a namespace name$/);
  oneLine([...base, '--host-token-allow', 'kube-system/-app=x'], /--host-token-allow: "-app" in .* is not a label key/);
  oneLine([...base, '--host-token-allow', 'kube-system/app=a b'], /--host-token-allow: "a b" in .* is not a label value/);
  oneLine([...base, '--rules', 'none', '--host-token-allow', 'host-root'], /^nmi run: --host-token-allow: needs --host-token-address$/);
  oneLine([...base, '--rules', 'none', '--host-token-address', '127.0.0.1:2579'], /^nmi run: --host-token-address: needs --host-token-allow \(no caller would be let in\)$/);
  oneLine([...base, '--multiple-identities', 'any'], /^nmi run: --multiple-identities: "any" is not one of first, refuse$/);
  oneLine([...base], /^nmi run: --multiple-identities: "" is not one of first, refuse$/, { ...process.env, NMI_MULTIPLE_IDENTITIES: '' });
  oneLine([...base, '--start-taint', 'nmi-not-ready'], /^nmi run: --start-taint: "nmi-not-ready" is not KEY\[=VALUE\]:EFFECT$/);
  oneLine([...base, '--start-taint', 'nmi-not-ready=true:NoRun'], /^nmi run: --start-taint: effect "NoRun" is not one of NoSchedule, PreferNoSchedule, NoExecute$/);
  oneLine([...base, '--start-taint', 'Nmi.io/not-ready:NoSchedule'], /^nmi run: --start-taint: "Nmi\.io\/not-ready" in .* is not a taint key/);
  const { NODE_NAME: _node, KUBERNETES_SERVICE_HOST: _host, KUBERNETES_SERVICE_PORT: _port, ...noCluster } = process.env;
  oneLine([...base, '--rules', 'none', '--bindings', tmpdir(), '--start-taint', 'nmi-not-ready:NoSchedule'], /^nmi run: --start-taint: needs --node-name \(or \$NODE_NAME\), the Node to take the taint off$/, noCluster);
  oneLine(
    [...base, '--rules', 'none', '--bindings', tmpdir(), '--node-name', 'node1', '--start-taint', 'nmi-not-ready:NoSchedule'],
    /^nmi run: --start-taint: no --kubeconfig and not in a cluster \(KUBERNETES_SERVICE_HOST\/PORT unset\)$/,
    noCluster,
  );
  oneLine([...base, '--rules', 'none', '--take-over', '--handoff-socket', 'off'], /^nmi run: --take-over: needs --handoff-socket$/);
  oneLine([...base, '--handoff-socket', 'run/nmi.sock'], /^nmi run: --handoff-socket: "run\/nmi\.sock" must be an absolute path or off$/);
  oneLine([...base, '--take-over=perhaps'], /^nmi run: --take-over: "perhaps" is not true or false$/);
  oneLine([...base, '--audit-log', 'audit.jsonl'], /^nmi run: --audit-log: "audit\.jsonl" must be an absolute path, - \(standard output\) or off$/);
  oneLine([...base, '--audit-interval', '0s'], /^nmi run: --audit-interval: "0s" is not a positive duration/);
  oneLine([...base, '--audit-max-size', '100MB'], /^nmi run: --audit-max-size: "100MB" is not a size \(like 100M, 512K, 1G\)$/);
  oneLine([...base, '--audit-max-size', '0'], /^nmi run: --audit-max-size: "0" is not a size/);
  oneLine([...base, '--audit-max-files', '0'], /^nmi run: --audit-max-files: "0" is not a positive whole number$/);
  oneLine([...base, '--no-such-flag'], /Unknown option '--no-such-flag'/);
  oneLine([...base, '--kubelet-client-cert', process.execPath, '--rules', 'none'], /--kubelet-client-key: required with --kubelet-client-cert/);
  oneLine([...base, '--rules', 'ebpf', '--cgroup-root', '/nonexistent/kubepods.slice'], /--cgroup-root: \/nonexistent\/kubepods\.slice: ENOENT/);
  oneLine([...base, '--rules', 'ebpf', '--cgroup-root', tmpdir()], /--cgroup-root: .* is not a folder of a cgroup v2 hierarchy/);
  const unknown = nmi(['frobnicate']);
  assert.equal(unknown.code, 2);
  assert.match(unknown.stderr.split('\n')[0]!, /^nmi: unknown command "frobnicate"$/);
});

test('a configured file that cannot be read exits 2 naming its flag, so systemd does not restart in a loop', () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'nmi-files-'));
  try {
    const locked = path.join(dir, 'client.key');
    writeFileSync(locked, 'key');
    chmodSync(locked, 0o000);
    oneLine([...base, '--kubelet-ca', path.join(dir, 'ca.crt')], new RegExp(`--kubelet-ca: cannot read ${dir}/ca\\.crt: ENOENT`));
    oneLine([...base, '--kubelet-client-cert', dir, '--kubelet-client-key', locked], new RegExp(`--kubelet-client-cert: ${dir} is not a file`));
    oneLine([...base, '--kubelet-token-file', path.join(dir, 'token')], /--kubelet-token-file: cannot read .*: ENOENT/);
    oneLine([...base, '--kubeconfig', path.join(dir, 'kubeconfig')], /--kubeconfig: cannot read .*: ENOENT/);
    oneLine([...base], /--kubelet-client-key: cannot read .*: ENOENT/, { ...process.env, NMI_KUBELET_CLIENT_KEY: path.join(dir, 'nope.key') });
    // The unit's root holds no CAP_DAC_OVERRIDE: a mode-000 key is unreadable there, as open(2) finds and access(2) would not.
    const r = nmi([...base, '--kubelet-client-cert', process.execPath, '--kubelet-client-key', locked], process.env, ['setpriv', '--bounding-set', '-dac_override,-dac_read_search', '--']);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr.trim(), new RegExp(`^nmi run: --kubelet-client-key: cannot read ${locked}: EACCES$`));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a flag beats its NMI_ variable, and a bad variable names the flag', () => {
  oneLine(['run', '--node-ip', '10.240.0.4'], /--port: "99999"/, { ...process.env, NMI_PORT: '99999' });
  oneLine(['run', '--node-ip', '10.240.0.4', '--port', '99998'], /--port: "99998"/, { ...process.env, NMI_PORT: '2579' });
  oneLine(['run'], /--node-ip: "nope"/, { ...process.env, NMI_NODE_IP: 'nope' });
});

test('--rules iptables without the iptables tools is a usage error', () => {
  // A PATH with node but no iptables-restore.
  const dir = mkdtempSync(path.join(tmpdir(), 'nmi-nopath-'));
  symlinkSync(process.execPath, path.join(dir, 'node'));
  try {
    oneLine([...base, '--rules', 'iptables'], /--rules: iptables requested but iptables-restore\/iptables-save are not in PATH/, { ...process.env, PATH: dir });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('--help on every command, exit 0', () => {
  for (const command of ['run', 'cleanup', 'status', 'demo']) {
    const r = nmi([command, '--help']);
    assert.equal(r.code, 0);
    assert.match(r.stdout, new RegExp(`^Usage: nmi ${command} \\[flags\\]`));
  }
  const run = nmi(['run', '--help']).stdout;
  for (const flag of ['--node-ip', '--rules', '--on-exit', '--kubelet-server-name', '--retry-after', '--multiple-identities', '--aad-authority-host', '--audit-log', '--audit-interval', '--audit-max-size', '--audit-max-files', '--log-format']) {
    assert.ok(run.includes(flag), `run --help lists ${flag}`);
  }
  assert.match(run, /NMI_NODE_IP/);
  // Defaults as an operator types them; an empty list reads "none", never "[]".
  assert.match(run, /^  --on-exit VALUE \[remove\]$/m);
  assert.match(run, /^  --host-token-allow VALUE \[none\]$/m);
  assert.doesNotMatch(run, /\[\]/);
});
