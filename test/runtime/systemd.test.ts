// The Debian package under real systemd: installed with dpkg -i on a minimal
// Debian 12 root (no Node.js, no compiler, no network), booted with
// systemd-nspawn as PID 1 in the test's node namespace, beside a stand-in
// kubelet (mTLS, with the AKS Engine certificate paths /etc/default/nmi ships)
// and IMDS. Boot, restart, crash, watchdog, stop with NMI_ON_EXIT keep and
// remove, and purge, each seen from the node's rules and a pod's token request.
// Not here: --rules ebpf. Under nspawn the container's cgroup tree is a
// delegated subtree of a host with no systemd, and the unit's eBPF drop-in needs
// the host's bpffs and kubepods cgroup; test/e2e/ebpf.test.ts covers that
// backend with nmi run directly.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { createCluster, crd, TOKEN_URL, type Cluster } from '../harness/cluster.js';
import { comparableRules, type PodAgent } from '../harness/netns.js';
import { steadyAcross } from '../harness/restarts.js';
import { waitFor } from '../harness/wait-for.js';
import { boot, configure, inContainer, overlayRoot, type BootedNode } from '../harness/nspawn.js';
import { nmiPackage } from '../harness/runtime.js';
import { decodeStandinToken } from '../standins/imds.js';

const idA = { client: '11111111-1111-1111-1111-111111111111', res: '/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a' };
const tokenUrl = `${TOKEN_URL}?api-version=2018-02-01&resource=${encodeURIComponent('https://management.azure.com/')}`;
const JUMP = '-A PREROUTING -j aad-metadata';

let cluster: Cluster;
let node: BootedNode;
let agent: PodAgent;
let installOutput = '';

const nat = () => cluster.node.exec('iptables-save', ['-t', 'nat']);
const jumps = () => nat().split('\n').filter((l) => l === JUMP).length;
const mainPid = async () => Number(await node.show('MainPID'));

/** Signals nmi's main process; `kill 0` would signal the test's own process group, which nsenter keeps. */
async function signalNmi(signal: string): Promise<number> {
  const pid = await mainPid();
  assert.ok(pid > 1, `nmi has no main process:\n${await node.describe()}`);
  await node.exec('kill', [`-${signal}`, String(pid)]);
  return pid;
}

async function activeWithNewPid(old: number, timeoutMs: number): Promise<number> {
  return waitFor(
    `nmi active with a new main pid (was ${old})`,
    async () => {
      const pid = await mainPid();
      return (await node.show('ActiveState')) === 'active' && pid !== 0 && pid !== old ? pid : undefined;
    },
    timeoutMs,
  ).catch(async (err: Error) => assert.fail(`${err.message}\n${await node.describe()}`));
}

/** What the newest nmi's first install found: "unchanged" when it adopted rules a predecessor left. */
async function lastInstall(): Promise<string | undefined> {
  const installs = [...(await node.journal()).matchAll(/"result":"(\w+)"[^\n]*"msg":"rules installed"/g)];
  return installs.at(-1)?.[1];
}

async function assertToken(): Promise<void> {
  const r = await waitFor('a 200 for the pod', async () => {
    const res = await agent.http(tokenUrl, { headers: { Metadata: 'true' } });
    return res.status === 200 ? res : undefined;
  });
  const body = JSON.parse(r.body) as { access_token: string; client_id: string };
  assert.equal(body.client_id, idA.client);
  assert.equal(decodeStandinToken(body.access_token).appid, idA.client);
}

before(async () => {
  cluster = await createCluster();
  // A node at boot: the kubelet starts after nmi (Before=kubelet.service).
  await cluster.kubelet.stop();
  const pod = cluster.addPod({ name: 'pod-a', labels: { aadpodidbinding: 'a' } });
  cluster.writeBindings([crd.userAssigned('id-a', idA.client, idA.res), crd.binding('bind-a', 'id-a', 'a')]);
  agent = await pod.ns.agent();

  const deb = nmiPackage();
  const overlay = overlayRoot();
  installOutput = inContainer(overlay.root, ['dpkg', '-i', '/var/tmp/nmi.deb'], [{ host: deb, at: '/var/tmp/nmi.deb' }]);
  // The shipped /etc/default/nmi, pointed at the stand-ins; its AKS Engine certificate paths stay and are bound below.
  configure(overlay.root, {
    NMI_NODE_NAME: 'node1',
    NMI_KUBELET_URL: cluster.kubelet.url.href,
    NMI_BINDINGS: '/etc/nmi/bindings',
    NMI_KUBECONFIG: undefined,
    NMI_UPSTREAM_IMDS: cluster.imds.url,
    NMI_SYNC_INTERVAL: '1s',
  });
  node = await boot(overlay, cluster.node.name, [
    { host: cluster.kubelet.caFile, at: '/etc/kubernetes/certs/ca.crt' },
    { host: cluster.kubelet.client.cert, at: '/etc/kubernetes/certs/client.crt' },
    { host: cluster.kubelet.client.key, at: '/etc/kubernetes/certs/client.key' },
    { host: cluster.bindingsDir, at: '/etc/nmi/bindings' },
  ]);
});

after(async () => {
  await agent?.close();
  await node?.close();
  await cluster?.close();
});

test('dpkg -i on a minimal Debian 12 enables nmi; at boot it is active with no kubelet yet, the rules in place', async (t) => {
  assert.match(installOutput, /Setting up nmi /);
  assert.match(installOutput, /multi-user\.target\.wants\/nmi\.service/);
  assert.equal((await node.exec('sh', ['-c', 'command -v node gcc cc python3 npm || echo none'])).trim(), 'none', 'a node without Node.js or a compiler');
  assert.equal((await node.systemctl('is-enabled', 'nmi')).trim(), 'enabled');
  assert.equal(await node.show('ActiveState'), 'active', await node.describe());
  assert.equal(await node.show('NRestarts'), '0', await node.journal());
  assert.equal(await node.show('StatusText'), 'serving');
  assert.match(await node.journal(), /kubelet not listening yet/);
  assert.equal(jumps(), 1, nat());
  assert.match(nat(), /-A aad-metadata -d 169\.254\.169\.254\/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10\.240\.0\.4:2579/);
  const online = Number(await node.exec('systemctl', ['show', '-p', 'ActiveEnterTimestampMonotonic', '--value', 'network-online.target']));
  const active = Number(await node.show('ActiveEnterTimestampMonotonic'));
  t.diagnostic(`nmi active ${((active - online) / 1e6).toFixed(2)} s after network-online.target`);
});

test('once the kubelet answers, a pod gets its token through the unit', async () => {
  await cluster.kubelet.start();
  await assertToken();
});

test('no core file: the unit says LimitCORE=0 and the running nmi has RLIMIT_CORE 0', async () => {
  assert.equal(await node.show('LimitCORE'), '0');
  const limits = await node.exec('cat', [`/proc/${await mainPid()}/limits`]);
  assert.match(limits, /^Max core file size\s+0\s+0\s+bytes\s*$/m, limits);
});

test('systemctl restart: the listeners wait in the fd store, so a pod asking all along sees no failure; the rules are never rewritten', async (t) => {
  assert.equal(await node.show('NFileDescriptorStore'), '2', 'token and probe stored');
  const rules = nat();
  const old = await mainPid();
  const { counts, longestMs, samples: jumpsSeen } = await steadyAcross(agent, jumps, async () => {
    try {
      await node.systemctl('restart', 'nmi');
    } catch (err) {
      assert.fail(`${(err as Error).message}\n${await node.describe()}`);
    }
    await activeWithNewPid(old, 30_000);
  }, 8_000);
  t.diagnostic(`${JSON.stringify(counts)}; longest wait ${longestMs} ms`);
  assert.deepEqual(Object.keys(counts), ['200'], JSON.stringify(counts));
  assert.deepEqual(jumpsSeen, [1], 'one jump throughout');
  assert.equal(await lastInstall(), 'unchanged');
  assert.equal(comparableRules(nat()), comparableRules(rules));
  assert.match(await node.journal(), /listening socket taken over from the previous nmi/);
  assert.equal(await node.show('NFileDescriptorStore'), '2', 'stored once, not again');
});

test('a crash (SIGKILL): the rules stay, connections wait in the stored listener until systemd has restarted nmi: none refused', async (t) => {
  const restarts = Number(await node.show('NRestarts'));
  const rules = nat();
  let old = 0;
  const { counts, longestMs, samples: jumpsSeen } = await steadyAcross(agent, jumps, async () => {
    old = await signalNmi('KILL');
    await activeWithNewPid(old, 30_000);
  }, 8_000);
  t.diagnostic(`${JSON.stringify(counts)}; longest wait ${longestMs} ms`);
  assert.equal(Number(await node.show('NRestarts')), restarts + 1);
  assert.equal(counts['error:ECONNREFUSED'], undefined, JSON.stringify(counts));
  // At most the one request whose connection the killed process had accepted is lost.
  assert.ok((counts['200'] ?? 0) > 0 && Object.values(counts).reduce((a, b) => a + b) - (counts['200'] ?? 0) <= 1, JSON.stringify(counts));
  assert.ok(longestMs >= 2_000, 'a request waited through RestartSec=2s');
  assert.deepEqual(jumpsSeen, [1]);
  // ExecStopPost saw SERVICE_RESULT=signal and left them: the restart found them in place.
  assert.equal(await lastInstall(), 'unchanged');
  assert.equal(comparableRules(nat()), comparableRules(rules));
  await assertToken();
});

test('watchdog: a stopped process (SIGSTOP) is killed after WatchdogSec=30s and restarted', async () => {
  const old = await signalNmi('STOP');
  await activeWithNewPid(old, 75_000);
  assert.match(await node.journal(), /[Ww]atchdog timeout/);
  assert.equal(await lastInstall(), 'unchanged');
  assert.equal(jumps(), 1, nat());
  await assertToken();
});

test('systemctl stop keeps the rules with NMI_ON_EXIT=keep, start adopts them; with remove they go, and no legacy table is left', async () => {
  // Read when nmi starts, as any setting: an operator restarts after editing /etc/default/nmi.
  configure(node.root, { NMI_ON_EXIT: 'keep' });
  await node.systemctl('restart', 'nmi');
  await node.systemctl('stop', 'nmi');
  assert.equal(await node.show('ActiveState'), 'inactive');
  assert.equal(jumps(), 1, 'kept');
  assert.deepEqual(await agent.connect('169.254.169.254', 80), { error: 'ECONNREFUSED' }, 'fail closed');
  const old = await mainPid();
  await node.systemctl('start', 'nmi');
  await activeWithNewPid(old, 30_000);
  assert.equal(await lastInstall(), 'unchanged');
  assert.equal(jumps(), 1, nat());
  await assertToken();

  configure(node.root, { NMI_ON_EXIT: 'remove' });
  await node.systemctl('restart', 'nmi');
  await node.systemctl('stop', 'nmi');
  assert.doesNotMatch(nat(), /aad-metadata/);
  // The restart kept them (a restart job was running); the stop's ExecStopPost removed them, iptables-legacy untouched.
  assert.match(await node.journal(), /^removed .*aad-metadata/m);
  assert.doesNotMatch(cluster.node.exec('cat', ['/proc/net/ip_tables_names']), /^nat$/m);
  assert.doesNotMatch(cluster.node.exec('iptables-nft-save', []), /legacy tables present/);
});

test('a kubelet certificate that cannot be read: exit 2, one line naming the flag, and no restart loop', async () => {
  configure(node.root, { NMI_KUBELET_CA: '/etc/kubernetes/certs/missing.crt' });
  const restarts = await node.show('NRestarts');
  await assert.rejects(node.systemctl('start', 'nmi'));
  await sleep(5_000); // past RestartSec=2s: RestartPreventExitStatus=2 keeps it down
  assert.equal(await node.show('ActiveState'), 'failed');
  assert.equal(await node.show('ExecMainStatus'), '2');
  assert.equal(await node.show('NRestarts'), restarts);
  assert.match(await node.journal(), /^nmi run: --kubelet-ca: cannot read \/etc\/kubernetes\/certs\/missing\.crt: ENOENT$/m);
  configure(node.root, { NMI_KUBELET_CA: '/etc/kubernetes/certs/ca.crt' });
  await node.systemctl('reset-failed', 'nmi');
});

test("NMI_AUDIT_LOG under /var/log/nmi: the unit's own log folder, root's alone, holds the records though the rest of the system is read-only", async () => {
  configure(node.root, { NMI_AUDIT_LOG: '/var/log/nmi/audit.jsonl' });
  await node.systemctl('restart', 'nmi');
  await assertToken();
  const served = (await node.exec('cat', ['/var/log/nmi/audit.jsonl'])).split('\n').filter(Boolean).map((l) => JSON.parse(l) as { kind: string; identity: { clientId: string } });
  assert.ok(served.some((r) => r.kind === 'served' && r.identity.clientId === idA.client), JSON.stringify(served));
  assert.equal((await node.exec('stat', ['-c', '%a %U', '/var/log/nmi'])).trim(), '700 root');
});

test('dpkg --purge: stops nmi, removes rules NMI_ON_EXIT=keep left, its files, its configuration and its logs', async () => {
  configure(node.root, { NMI_ON_EXIT: 'keep' });
  await node.systemctl('restart', 'nmi');
  await assertToken();
  await node.exec('dpkg', ['--purge', 'nmi']);
  assert.doesNotMatch(nat(), /aad-metadata/);
  assert.doesNotMatch(cluster.node.exec('cat', ['/proc/net/ip_tables_names']), /^nat$/m);
  assert.equal(await node.exec('sh', ['-c', 'ls -d /usr/lib/nmi /usr/bin/nmi /etc/default/nmi /lib/systemd/system/nmi.service /etc/systemd/system/multi-user.target.wants/nmi.service /var/log/nmi 2>/dev/null || true']), '');
  assert.equal(await node.show('LoadState'), 'not-found');
});
