// --rules ebpf end to end: pods in cgroups of a test cgroup root, the real
// eBPF programs attached there, no NAT rule anywhere (the backstop only drops).
// nmi itself runs in a pod cgroup under the same root (as a DaemonSet would)
// and the IMDS stand-in listens on the real metadata address, so a redirect of
// nmi's own upstream calls would loop back to itself, and a pod's raw packets
// to it show whether the backstop holds.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import { createBpfMountNamespace, createCgroupTree, callFrom, type CallResult, type CgroupTree, type MountNamespace } from '../harness/cgroups.js';
import { createCluster, crd, TOKEN_URL, viaV4Mapped, type Cluster, type ClusterPod } from '../harness/cluster.js';
import { nmi, nmiAsync, type NmiProcess } from '../harness/nmi-process.js';
import { rawTcp } from '../harness/raw-tcp.js';
import { waitFor } from '../harness/wait-for.js';
import { iptablesBackstop } from '../../src/rules/backstop.js';
import { installedTools, IptablesBackend } from '../../src/rules/iptables.js';
import { makePodJson } from '../standins/kubelet.js';
import { decodeStandinToken } from '../standins/imds.js';

const query = `${TOKEN_URL}?api-version=2018-02-01&resource=${encodeURIComponent('https://vault.azure.net')}`;
const uid = { a: 'aaaaaaaa-0000-4000-8000-00000000000a', b: 'bbbbbbbb-0000-4000-8000-00000000000b', host: 'cccccccc-0000-4000-8000-00000000000c', nmi: 'dddddddd-0000-4000-8000-00000000000d' };
const client = { a: '11111111-1111-1111-1111-111111111111', host: '33333333-3333-3333-3333-333333333333' };

let cluster: Cluster;
let cgroups: CgroupTree;
let mnt: MountNamespace;
let podA: ClusterPod;
let podB: ClusterPod;
const cg = { a: '', b: '', host: '', nmi: '', plain: '' };

function identityOf(r: CallResult): string {
  assert.equal(r.status, 200, JSON.stringify(r));
  return decodeStandinToken((JSON.parse(r.body!) as { access_token: string }).access_token).identity;
}

function errorOf(r: CallResult): { status?: number; error?: string; error_description?: string } {
  return { status: r.status, ...(JSON.parse(r.body ?? '{}') as { error?: string }) };
}

async function startNmi(rules: 'ebpf' | 'iptables', server: 'native' | 'js' = 'native'): Promise<NmiProcess> {
  const proc = await cluster.startNmi(['--rules', rules, '--cgroup-root', cgroups.root, '--server', server], { prefix: mnt.prefix, waitReady: false });
  // Where a DaemonSet's nmi lives: in a pod cgroup under the root the programs are attached to.
  writeFileSync(`${cg.nmi}/cgroup.procs`, String(proc.child.pid));
  await waitFor(`nmi ready\n${proc.output()}`, async () => {
    if (proc.child.exitCode !== null) throw new Error(`nmi exited ${proc.child.exitCode}: ${proc.output()}`);
    return (await proc.metric('nmi_rules_installed\\{backend="' + rules + '"\\}')) === 1 ? true : undefined;
  });
  return proc;
}

const fromA = () => callFrom({ cgroup: cg.a, netns: podA.ns.name }, query);
const pinned = () => mnt.exec('sh', ['-c', 'ls /sys/fs/bpf/nmi 2>/dev/null || true']).trim();
const nmiPrograms = () => mnt.exec('bpftool', ['prog', 'show']).split('\n').filter((l) => / name nmi_/.test(l));
const attachedAtRoot = () => mnt.exec('bpftool', ['cgroup', 'show', cgroups.root]).split('\n').filter((l) => /nmi_/.test(l));

before(async () => {
  cluster = await createCluster({ imds: { host: '169.254.169.254', port: 80 } });
  cgroups = createCgroupTree();
  mnt = await createBpfMountNamespace();
  cg.a = cgroups.podCgroup(uid.a, 'systemd');
  cg.b = cgroups.podCgroup(uid.b, 'cgroupfs');
  cg.host = cgroups.podCgroup(uid.host, 'systemd', 'h0st');
  cg.nmi = cgroups.podCgroup(uid.nmi, 'systemd', 'nm1');
  cg.plain = cgroups.plainCgroup('system.slice/some-daemon.service');
  podA = cluster.addPod({ name: 'pod-a', listed: false });
  podB = cluster.addPod({ name: 'pod-b', listed: false });
  cluster.kubelet.pods.push(
    makePodJson({ name: 'pod-a', uid: uid.a, ip: podA.ns.ip, labels: { aadpodidbinding: 'a' } }),
    makePodJson({ name: 'pod-b', uid: uid.b, ip: podB.ns.ip, labels: { app: 'b' } }),
    makePodJson({ name: 'host-agent', uid: uid.host, ip: cluster.node.nodeIp, hostNetwork: true, labels: { aadpodidbinding: 'host' } }),
  );
  cluster.writeBindings([
    crd.userAssigned('id-a', client.a, '/subscriptions/s/rg/a'),
    crd.userAssigned('id-host', client.host, '/subscriptions/s/rg/host'),
    crd.binding('bind-a', 'id-a', 'a'),
    crd.binding('bind-host', 'id-host', 'host'),
  ]);
});

after(async () => {
  await cluster?.close();
  // Leave nothing attached even when a test failed half-way.
  if (mnt) nmi(['cleanup'], process.env, mnt.prefix);
  mnt?.close();
  cgroups?.remove();
});

for (const server of ['native', 'js'] as const) {
  test(`ebpf (${server}): a pod gets its token through the cgroup redirect, with no NAT rule, and sees 169.254.169.254`, async () => {
    const proc = await startNmi('ebpf', server);
    try {
      const r = await fromA();
      assert.equal(identityOf(r), `client_id:${client.a}`);
      assert.equal(r.peer, '169.254.169.254:80', 'getpeername shows the address the pod asked for');
      assert.ok(cluster.imds.calls >= 1, "nmi's own call reached the real IMDS address, not itself");
      assert.doesNotMatch(cluster.node.exec('iptables-save', []), /aad-metadata/);
      assert.doesNotMatch(cluster.node.exec('sh', ['-c', 'nft list ruleset 2>/dev/null || true']), /table ip aad-metadata \{|dnat/, 'the backstop only');
      assert.equal(attachedAtRoot().length, 5, 'connect4, connect6, getpeername4, getpeername6 and sockops at the cgroup root');
      // A dual-stack IPv6 socket (Java's default) reaches the metadata address as ::ffff:169.254.169.254, past connect4.
      const mapped = await callFrom({ cgroup: cg.a, netns: podA.ns.name }, viaV4Mapped(query));
      assert.equal(identityOf(mapped), `client_id:${client.a}`);
      assert.equal(mapped.peer, '::ffff:169.254.169.254:80', 'getpeername shows the v4-mapped address the pod asked for');
      assert.ok(!cluster.imds.requests.some((r) => String(r.headers.host).includes('ffff')), 'the pod never reached the real IMDS itself');
      if (server === 'native') {
        for (let i = 0; i < 3; i++) assert.equal(identityOf(await fromA()), `client_id:${client.a}`);
        assert.ok(((await proc.metric('nmi_native_requests_total\\{result="hit"\\}')) ?? 0) >= 1, 'attested hits are answered in C++');
      }
    } finally {
      assert.equal(await proc.stop(), 0);
    }
  });
}

test('spoofing: a pod wearing another pod\'s address gets its token with iptables, is refused with ebpf', async () => {
  // What ARP spoofing on a kubenet bridge achieves, in this routed test network:
  // B holds A's address and the node's replies to that address reach B.
  podB.ns.exec('ip', ['addr', 'add', `${podA.ns.ip}/32`, 'dev', 'eth0']);
  cluster.node.exec('ip', ['route', 'add', `${podA.ns.ip}/32`, 'dev', 'veth2']);
  const fromBAsA = () => callFrom({ cgroup: cg.b, netns: podB.ns.name, localAddress: podA.ns.ip }, query);
  try {
    const iptables = await startNmi('iptables');
    try {
      assert.equal(identityOf(await fromBAsA()), `client_id:${client.a}`, "the weakness of every address-based agent: B gets A's token");
    } finally {
      assert.equal(await iptables.stop(), 0);
    }
    for (const server of ['native', 'js'] as const) {
      const ebpf = await startNmi('ebpf', server);
      try {
        assert.deepEqual(errorOf(await fromBAsA()), {
          status: 403,
          error: 'access_denied',
          error_description: 'The calling socket does not belong to the pod that owns the source address',
        });
        assert.ok(((await ebpf.metric('nmi_caller_refusals_total\\{reason="spoof"\\}')) ?? 0) >= 1);
        assert.match(ebpf.output(), /spoof attempt/);
        // `nmi explain` names the pod whose socket it was, and whose address it wore.
        const why = await nmiAsync(['explain', `${podB.namespace}/${podB.name}`, '--json']);
        const spoof = (JSON.parse(why.stdout) as { refusals: Array<{ kind: string; cause?: string; status: number }> }).refusals.find((r) => r.kind === 'spoof');
        assert.equal(spoof?.status, 403, why.stdout);
        assert.equal(spoof?.cause, `${podA.ns.ip} is pod ${podA.namespace}/${podA.name}'s`);
      } finally {
        assert.equal(await ebpf.stop(), 0);
      }
    }
  } finally {
    cluster.node.exec('ip', ['route', 'del', `${podA.ns.ip}/32`, 'dev', 'veth2']);
    podB.ns.exec('ip', ['addr', 'del', `${podA.ns.ip}/32`, 'dev', 'eth0']);
  }
  const ebpf = await startNmi('ebpf');
  try {
    assert.equal(identityOf(await fromA()), `client_id:${client.a}`, 'A still gets its own token');
  } finally {
    await ebpf.stop();
  }
});

test("ebpf: a cgroup nested in pod A's container and named after pod B is A's", async () => {
  // A container may make cgroups of its own (a delegated cgroup, or systemd inside it) and name them at will.
  const nested = cgroups.plainCgroup(`${path.relative(cgroups.root, cg.a)}/kubepods-besteffort-pod${uid.b.replaceAll('-', '_')}.slice`);
  const ebpf = await startNmi('ebpf');
  try {
    assert.equal(identityOf(await callFrom({ cgroup: nested, netns: podA.ns.name }, query)), `client_id:${client.a}`, "A's own token, not a spoof of B");
    assert.equal((await ebpf.metric('nmi_caller_refusals_total\\{reason="spoof"\\}')) ?? 0, 0);
  } finally {
    await ebpf.stop();
  }
});

test('a hostNetwork-style caller (node namespace, pod cgroup) is resolved by cgroup with ebpf, refused by address with iptables', async () => {
  const direct = `http://${cluster.node.nodeIp}:2579/metadata/identity/oauth2/token?api-version=2018-02-01&resource=x`;
  const iptables = await startNmi('iptables');
  try {
    assert.equal(errorOf(await callFrom({ cgroup: cg.host }, direct)).status, 404);
  } finally {
    await iptables.stop();
  }
  const ebpf = await startNmi('ebpf');
  try {
    assert.equal(identityOf(await callFrom({ cgroup: cg.host }, query)), `client_id:${client.host}`);
    // A process in no pod's cgroup under the root, and one outside the root entirely, are not attested.
    const unattested = { status: 403, error: 'access_denied', error_description: 'The calling socket could not be attested to a pod of this node' };
    assert.deepEqual(errorOf(await callFrom({ cgroup: cg.plain, netns: podA.ns.name }, query)), unattested);
    assert.deepEqual(errorOf(await callFrom({ cgroup: cgroups.root.replace(/\/[^/]+$/, ''), netns: podA.ns.name }, direct)), unattested);
    assert.ok(((await ebpf.metric('nmi_caller_refusals_total\\{reason="unattested"\\}')) ?? 0) >= 2);
  } finally {
    await ebpf.stop();
  }
});

const METADATA = '169.254.169.254';
/** A token request, written by hand onto a raw socket's handshake. */
const RAW_REQUEST = `GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net HTTP/1.1\r\nHost: ${METADATA}\r\nMetadata: true\r\nUser-Agent: raw-socket\r\n\r\n`;
const rawFromA = () => rawTcp({ cgroup: cg.a, netns: podA.ns.name }, { src: podA.ns.ip, dst: METADATA, port: 80, request: RAW_REQUEST });
/** What the stand-in at the real metadata address received from the raw socket. */
const rawReached = () => cluster.imds.requests.filter((r) => r.headers['user-agent'] === 'raw-socket').length;
const backstopTable = () => cluster.node.exec('sh', ['-c', 'nft list table ip aad-metadata-backstop 2>/dev/null || true']);
/** The pod's own kernel resets a handshake it did not make; dropping its resets lets a raw request through when nothing else stops it. */
const podResets = (op: '-A' | '-D') => podA.ns.exec('iptables', [op, 'OUTPUT', '-p', 'tcp', '--tcp-flags', 'RST', 'RST', '-d', METADATA, '-j', 'DROP']);

test('ebpf backstop: a raw-socket SYN to the metadata address goes nowhere while connects get their token; without it the real IMDS answers it', async (t) => {
  podResets('-A');
  try {
    const proc = await startNmi('ebpf');
    t.after(() => proc.stop('SIGKILL'));
    assert.deepEqual(await rawFromA(), { synAck: false }, 'no SYN-ACK');
    assert.equal(identityOf(await fromA()), `client_id:${client.a}`, 'a connect() is redirected before the backstop sees it');
    assert.equal(rawReached(), 0);
    assert.match(backstopTable(), /type filter hook prerouting priority raw; policy accept;[\s\S]*iifname != "lo" ip daddr 169\.254\.169\.254 tcp dport 80 counter packets [1-9]\d* bytes \d+ drop/);
    assert.doesNotMatch(cluster.node.exec('iptables-save', []), /aad-metadata/, 'nft is here: nothing in iptables');
    const status = JSON.parse(nmi(['status', '--json', '--probe-address', proc.probe], process.env, mnt.prefix).stdout) as {
      backends: { backend: string; installed: boolean; rules: { text: string; packets: number }[] }[];
    };
    const shown = status.backends.find((b) => b.backend === 'ebpf backstop (nftables)');
    assert.equal(shown?.installed, true, JSON.stringify(status.backends));
    assert.equal(shown.rules[0]?.text, 'table ip aad-metadata-backstop chain prerouting: iifname != lo ip daddr 169.254.169.254 tcp dport 80 counter drop');
    assert.ok((shown.rules[0]?.packets ?? 0) >= 1, 'the raw SYN was counted');

    // Removed by hand as the README says: repaired like the programs.
    cluster.node.exec('nft', ['delete', 'table', 'ip', 'aad-metadata-backstop']);
    await waitFor('the backstop repaired', async () => ((await proc.metric('nmi_rule_repairs_total')) ?? 0) >= 1 || undefined);
    assert.deepEqual(await rawFromA(), { synAck: false });

    // A crash leaves it with the programs: pods fail closed either way.
    await proc.stop('SIGKILL');
    assert.deepEqual(await rawFromA(), { synAck: false });
    // The programs alone, as --rules ebpf was before the backstop: the raw request reaches the real IMDS and a token comes back.
    cluster.node.exec('nft', ['delete', 'table', 'ip', 'aad-metadata-backstop']);
    assert.equal(attachedAtRoot().length, 5);
    assert.deepEqual(await rawFromA(), { synAck: true, statusLine: 'HTTP/1.1 200 OK' });
    assert.equal(rawReached(), 1);
    assert.equal(nmi(['cleanup'], process.env, mnt.prefix).code, 0);
  } finally {
    podResets('-D');
  }
});

test('ebpf backstop with iptables (where nft is absent): raw table, repaired, removed, with either flavour', async () => {
  const redirect = { metadataIp: METADATA, metadataPort: 80, targetIp: cluster.node.nodeIp, targetPort: 2579 };
  const spec = 'aad-metadata-backstop -d 169.254.169.254/32 ! -i lo -p tcp -m tcp --dport 80 -j DROP';
  const saveRaw = (save: string) => cluster.node.exec(save, ['-t', 'raw']).split('\n').filter((l) => l.startsWith('-A')).join('\n');
  for (const tools of installedTools()) {
    const backstop = new IptablesBackend(tools, iptablesBackstop);
    try {
      assert.equal(await backstop.ensure(redirect), 'installed');
      assert.equal(
        saveRaw(tools.save),
        ['-A PREROUTING -j aad-metadata-backstop', `-A ${spec}`].join('\n'),
        tools.label,
      );
      assert.deepEqual(await rawTcp({ cgroup: cg.a, netns: podA.ns.name }, { src: podA.ns.ip, dst: METADATA, port: 80 }), { synAck: false }, tools.label);
      assert.equal(await backstop.ensure(redirect), 'unchanged');
      const status = await backstop.status();
      assert.equal(status.backend, `ebpf backstop (${tools.label})`);
      assert.ok(status.rules.some((r) => r.text === `-t raw -A ${spec}` && r.packets >= 1), JSON.stringify(status.rules));
      cluster.node.exec(tools.save.replace('-save', ''), ['-t', 'raw', '-I', 'PREROUTING', '1', '-j', 'ACCEPT']);
      assert.equal(await backstop.ensure(redirect), 'repaired', 'the jump no longer first');
      const cleanup = nmi(['cleanup'], process.env, mnt.prefix);
      assert.equal(cleanup.code, 0, cleanup.stderr);
      assert.match(cleanup.stdout, new RegExp(`removed ebpf backstop \\(${tools.label}\\): raw chain aad-metadata-backstop \\(1 rules\\)`));
      assert.equal(saveRaw(tools.save), '-A PREROUTING -j ACCEPT');
      assert.deepEqual(await rawTcp({ cgroup: cg.a, netns: podA.ns.name }, { src: podA.ns.ip, dst: METADATA, port: 80 }), { synAck: true }, 'the raw SYN reaches without it');
    } finally {
      await backstop.remove();
      cluster.node.exec(tools.save.replace('-save', ''), ['-t', 'raw', '-F', 'PREROUTING']);
    }
  }
});

test('ebpf: a removed pin is repaired; SIGTERM removes everything; after SIGKILL pods fail closed and nmi cleanup removes it all', async () => {
  const proc = await startNmi('ebpf');
  mnt.exec('rm', ['/sys/fs/bpf/nmi/connect4']);
  await waitFor('the repair', async () => ((await proc.metric('nmi_rule_repairs_total')) ?? 0) >= 1);
  assert.equal(identityOf(await fromA()), `client_id:${client.a}`);
  const status = nmi(['status', '--probe-address', proc.probe], process.env, mnt.prefix);
  assert.match(status.stdout, /^ebpf: installed$/m);
  assert.match(status.stdout, /^ebpf backstop \(nftables\): installed$/m);
  assert.equal(await proc.stop('SIGTERM'), 0);
  assert.equal(backstopTable(), '', 'the backstop goes with the programs');
  assert.equal(pinned(), '');
  assert.deepEqual(attachedAtRoot(), []);
  await waitFor('programs freed', () => nmiPrograms().length === 0 || undefined);

  const killed = await startNmi('ebpf');
  await killed.stop('SIGKILL');
  assert.equal(attachedAtRoot().length, 5, 'a crash leaves the redirect in place');
  assert.equal((await fromA()).error, 'ECONNREFUSED', 'so pods fail closed, never reaching the real IMDS');
  const cleanup = nmi(['cleanup'], process.env, mnt.prefix);
  assert.equal(cleanup.code, 0, cleanup.stderr);
  assert.match(cleanup.stdout, /removed ebpf cgroup\/connect4 link/);
  assert.match(cleanup.stdout, /removed ebpf cgroup\/connect6 link/);
  assert.match(cleanup.stdout, /removed ebpf map \/sys\/fs\/bpf\/nmi\/nmi_peers/);
  assert.match(cleanup.stdout, /removed ebpf backstop \(nftables\): table ip aad-metadata-backstop \(1 rules\)/);
  assert.equal(backstopTable(), '');
  assert.equal(nmi(['cleanup'], process.env, mnt.prefix).stdout.trim(), 'nothing to remove');
  assert.equal(pinned(), '');
  assert.deepEqual(attachedAtRoot(), []);
  await waitFor('programs and maps freed', () => {
    const maps = mnt.exec('bpftool', ['map', 'show']).split('\n').filter((l) => / name nmi_/.test(l));
    return (nmiPrograms().length === 0 && maps.length === 0) || undefined;
  });
});
