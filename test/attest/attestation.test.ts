// cgroup → pod UID naming, the tree walk, and the attestation verdicts (the
// kubelet side is a real PodIndex fed a pod list; the peers map is a table).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { CgroupAttestation } from '../../src/attest/attestation.js';
import { connectionCgroup, peerKey, type PeerRecords } from '../../src/attest/peers.js';
import { CgroupPods, kubeletCgroupRoot, podUidFromPath, podUidOf } from '../../src/attest/cgroup-pods.js';
import { PodIndex } from '../../src/kubelet/pod-index.js';
import type { Pod } from '../../src/kubelet/pod.js';
import { configBytes } from '../../src/rules/ebpf.js';

const UID_A = '0f3c6a4e-1b2d-4c5e-8f90-a1b2c3d4e5f6';
const UID_B = '9e8d7c6b-5a49-4838-a726-150493827160';
const UID_H = '11112222-3333-4444-5555-666677778888';

test("pod UIDs only at the kubelet's place for them, with either cgroup driver and each QoS class", () => {
  const a = UID_A.replaceAll('-', '_');
  const pods: Record<string, string> = {
    // systemd driver: Guaranteed directly under kubepods.slice, the others under their QoS slice
    [`kubepods.slice/kubepods-pod${a}.slice`]: UID_A,
    [`kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod${a}.slice/cri-containerd-abc.scope`]: UID_A,
    [`kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod${a}.slice`]: UID_A,
    // cgroupfs driver
    [`kubepods/pod${UID_B}/4f1e2d`]: UID_B,
    [`kubepods/burstable/pod${UID_B}`]: UID_B,
    [`kubepods/besteffort/pod${UID_B}/4f1e2d`]: UID_B,
    // Anything below the pod folder is the pod's, whatever it is named: a nested cgroup cannot name another pod.
    [`kubepods.slice/kubepods-pod${a}.slice/cri-containerd-abc.scope/kubepods-pod${UID_B.replaceAll('-', '_')}.slice`]: UID_A,
    [`kubepods/burstable/pod${UID_A}/c1/pod${UID_B}`]: UID_A,
    [`kubepods/burstable/pod${UID_A}/pod${UID_B}`]: UID_A,
  };
  for (const [folder, uid] of Object.entries(pods)) assert.equal(podUidFromPath(folder), uid, folder);
  const decoys = [
    '',
    'kubepods.slice',
    'kubepods.slice/kubepods-besteffort.slice',
    'kubepods/burstable',
    'system.slice/podman.service',
    // a local user's delegated cgroup, and the same under the kubelet's folders' names one level too deep
    `user.slice/user-1000.slice/user@1000.service/app.slice/pod${UID_A}`,
    `user.slice/user-1000.slice/user@1000.service/app.slice/kubepods-pod${a}.slice`,
    `user.slice/kubepods/pod${UID_A}`,
    `system.slice/kubepods.slice/kubepods-pod${a}.slice`,
    // the QoS a pod slice names must be its folder's; each driver's own spelling of the UID
    `kubepods.slice/kubepods-besteffort.slice/kubepods-burstable-pod${a}.slice`,
    `kubepods.slice/kubepods-burstable-pod${a}.slice`,
    `kubepods.slice/kubepods-burstable.slice/kubepods-pod${a}.slice`,
    `kubepods.slice/kubepods-pod${UID_A}.slice`,
    `kubepods/pod${a}`,
    `kubepods/guaranteed/pod${UID_A}`,
    // a pod folder only below a container of no pod, or below an unknown QoS folder
    `kubepods/burstable/x/pod${UID_A}`,
    `kubepods.slice/kubepods-besteffort.slice/other.slice/kubepods-besteffort-pod${a}.slice`,
    'kubepods/burstable/pod1234/x',
    `kubepods/podx${UID_A}`,
  ];
  for (const none of decoys) assert.equal(podUidFromPath(none), undefined, none);
});

test('the kubelet cgroup root of a --cgroup-root, and folders outside it', () => {
  assert.equal(kubeletCgroupRoot('/sys/fs/cgroup/kubepods.slice'), '/sys/fs/cgroup');
  assert.equal(kubeletCgroupRoot('/sys/fs/cgroup/kubepods/'), '/sys/fs/cgroup');
  assert.equal(kubeletCgroupRoot('/sys/fs/cgroup/nodes.slice'), '/sys/fs/cgroup/nodes.slice', 'a folder holding kubepods.slice');
  const folder = `/sys/fs/cgroup/kubepods/pod${UID_B}`;
  assert.equal(podUidOf('/sys/fs/cgroup', folder), UID_B);
  assert.equal(podUidOf('/sys/fs/cgroup/user.slice', `/sys/fs/cgroup/user.slice/kubepods/pod${UID_B}`), UID_B);
  assert.equal(podUidOf('/sys/fs/cgroup/nodes.slice', folder), undefined, 'not under the kubelet root');
  assert.equal(podUidOf('/sys/fs/cgroup/kube', `/sys/fs/cgroup/kubepods/pod${UID_B}`), undefined);
});

function tree(): { root: string; ids: Record<string, bigint>; remove(): void } {
  const root = mkdtempSync(path.join(tmpdir(), 'nmi-cgroups-'));
  const dirs = {
    aPod: `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod${UID_A.replaceAll('-', '_')}.slice`,
    a: `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod${UID_A.replaceAll('-', '_')}.slice/cri-containerd-1.scope`,
    a2: `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod${UID_A.replaceAll('-', '_')}.slice/cri-containerd-2.scope`,
    b: `kubepods/burstable/pod${UID_B}/c1`,
    h: `kubepods.slice/kubepods-pod${UID_H.replaceAll('-', '_')}.slice/cri-containerd-h.scope`,
    plain: 'system.slice/agent.service',
    // A local user's delegated cgroup named after pod A, and a nested cgroup in A's container named after B.
    userDecoy: `user.slice/user-1000.slice/user@1000.service/app.slice/pod${UID_A}`,
    nested: `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod${UID_A.replaceAll('-', '_')}.slice/cri-containerd-1.scope/kubepods-pod${UID_B.replaceAll('-', '_')}.slice`,
  };
  const ids: Record<string, bigint> = {};
  for (const [k, d] of Object.entries(dirs)) {
    mkdirSync(path.join(root, d), { recursive: true });
    ids[k] = statSync(path.join(root, d), { bigint: true }).ino;
  }
  return { root, ids, remove: () => rmSync(root, { recursive: true }) };
}

test('the walk maps every cgroup under the root to its pod, and a new cgroup waits for one coalesced walk', async () => {
  const t = tree();
  try {
    let walked = 0;
    const pods = new CgroupPods(t.root, { minWalkGapMs: 100, onWalk: () => walked++ });
    assert.equal(await pods.uidOf(t.ids.a!), UID_A);
    assert.equal(pods.known(t.ids.a2!), UID_A);
    assert.equal(pods.known(t.ids.b!), UID_B);
    assert.equal(pods.known(t.ids.plain!), null);
    assert.equal(pods.known(t.ids.userDecoy!), null, "a user's folder named pod<uid> is no pod's");
    assert.equal(pods.known(t.ids.nested!), UID_A, "a nested cgroup named after B is A's");
    assert.deepEqual([...pods.idsOf(UID_A)].sort(), [t.ids.aPod!, t.ids.a!, t.ids.a2!, t.ids.nested!].sort(), 'the pod cgroup, its containers and what they nest');
    assert.equal(walked, 1);
    // A container started after the walk: everyone asking within the gap shares one walk at its end.
    const dir = path.join(t.root, `kubepods/burstable/pod${UID_B}/c2`);
    mkdirSync(dir);
    const id = statSync(dir, { bigint: true }).ino;
    const answers = await Promise.all(Array.from({ length: 20 }, () => pods.uidOf(id)));
    assert.deepEqual(new Set(answers), new Set([UID_B]));
    assert.equal(walked, 2);
    assert.equal(await pods.uidOf(123456789n), undefined, 'an id found nowhere is no pod, and said apart from a cgroup that is no pod\'s');
    assert.equal(pods.walks, 3);
  } finally {
    t.remove();
  }
});

test('walked from the whole hierarchy (host callers) or from the kubepods folder (the default --cgroup-root), pods are where the kubelet puts them', async () => {
  const t = tree();
  try {
    const host = new CgroupPods(t.root, { cgroupRoot: path.join(t.root, 'kubepods.slice') });
    await host.walk();
    assert.equal(host.known(t.ids.a!), UID_A);
    assert.equal(host.known(t.ids.b!), UID_B, "kubepods beside kubepods.slice: the kubelet's root is the same folder");
    assert.equal(host.known(t.ids.userDecoy!), null);
    assert.equal(host.known(t.ids.nested!), UID_A);
    const kubepods = new CgroupPods(path.join(t.root, 'kubepods.slice'));
    await kubepods.walk();
    assert.equal(kubepods.known(t.ids.a!), UID_A);
    assert.equal(kubepods.known(t.ids.plain!), undefined, 'not walked');
    // The kubelet's root elsewhere: nothing under this one is a pod.
    const elsewhere = new CgroupPods(t.root, { cgroupRoot: path.join(t.root, 'system.slice') });
    await elsewhere.walk();
    assert.equal(elsewhere.known(t.ids.a!), null);
    assert.deepEqual(elsewhere.idsOf(UID_A), []);
  } finally {
    t.remove();
  }
});

function pod(uid: string, name: string, ip: string, extra: Partial<Pod> = {}): Pod {
  return { uid, namespace: 'default', name, labels: {}, ips: [ip], hostNetwork: false, phase: 'Running', nodeName: 'node1', ...extra };
}

test('verdicts: own address → the pod; another pod\'s address → spoof; no record or no pod cgroup → unattested; hostNetwork by cgroup', async () => {
  const t = tree();
  const log = pino({ level: 'silent' });
  try {
    const index = new PodIndex({
      fetchPods: async () => [pod(UID_A, 'a', '10.244.1.2'), pod(UID_B, 'b', '10.244.2.2'), pod(UID_H, 'h', '10.240.0.4', { hostNetwork: true })],
      refreshIntervalMs: 60_000,
      minRefreshGapMs: 0,
      log,
    });
    await index.start();
    index.stop();
    const records = new Map<string, bigint>();
    const peers: PeerRecords = { peerCgroup: (s, sp, d, dp) => records.get(`${s}:${sp}>${d}:${dp}`) ?? null };
    const attest = new CgroupAttestation(new CgroupPods(t.root, { minWalkGapMs: 0 }), index, log);

    records.set('10.244.1.2:40000>10.240.0.4:2579', t.ids.a!);
    const a = connectionCgroup(peers, { remoteAddress: '::ffff:10.244.1.2', remotePort: 40000, localAddress: '10.240.0.4', localPort: 2579 });
    assert.equal(a, t.ids.a);
    assert.equal(attest.resolveNow('10.244.1.2', a), undefined, 'nothing walked yet: the slow path decides');
    assert.equal(((await attest.resolve('10.244.1.2', a)) as Pod).name, 'a');
    assert.equal(attest.resolveNow('10.244.1.2', a)?.name, 'a', 'now known: the hit path may answer');

    assert.equal(await attest.resolve('10.244.1.2', t.ids.b!), 'spoof', "B's socket with A's address");
    assert.equal(attest.resolveNow('10.244.1.2', t.ids.b!), undefined);
    assert.equal(await attest.resolve('10.244.9.9', t.ids.b!), 'spoof', 'an address nobody owns');
    assert.equal(await attest.resolve('10.244.1.2', null), 'unattested');
    assert.equal(await attest.resolve('10.244.1.2', t.ids.plain!), 'unattested');
    assert.equal(connectionCgroup(peers, { remoteAddress: '10.244.1.2', remotePort: 1, localAddress: '10.240.0.4', localPort: 2579 }), null);
    assert.equal(connectionCgroup(peers, { remoteAddress: 'fe80::1', remotePort: 1, localAddress: 'fe80::2', localPort: 2579 }), null);

    assert.equal(((await attest.resolve('10.240.0.4', t.ids.h!)) as Pod).name, 'h', 'hostNetwork: by cgroup');
    assert.equal(await attest.resolve('10.244.2.2', t.ids.h!), 'spoof', "a hostNetwork pod wearing B's address");
    assert.deepEqual(attest.refused, { spoof: 3, unattested: 2 });
  } finally {
    t.remove();
  }
});

test('the byte layouts shared with nmi.bpf.c', () => {
  assert.equal(
    configBytes({ metadataIp: '169.254.169.254', metadataPort: 80, targetIp: '10.240.0.4', targetPort: 2579 }, 0x0102030405060708n).toString('hex'),
    'a9fea9fe' + '0af00004' + '0050' + '0a13' + '00000000' + '0807060504030201',
  );
  assert.equal(peerKey('10.244.1.2', 40000, '10.240.0.4', 2579).toString('hex'), '0af40102' + '0af00004' + '9c40' + '0a13');
});
