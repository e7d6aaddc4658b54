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
import { CgroupPods, podUidFromPath } from '../../src/attest/cgroup-pods.js';
import { PodIndex } from '../../src/kubelet/pod-index.js';
import type { Pod } from '../../src/kubelet/pod.js';
import { configBytes } from '../../src/rules/ebpf.js';

const UID_A = '0f3c6a4e-1b2d-4c5e-8f90-a1b2c3d4e5f6';
const UID_B = '9e8d7c6b-5a49-4838-a726-150493827160';
const UID_H = '11112222-3333-4444-5555-666677778888';

test('pod UIDs from cgroup paths of both kubelet cgroup drivers', () => {
  assert.equal(podUidFromPath(`kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod${UID_A.replaceAll('-', '_')}.slice/cri-containerd-abc.scope`), UID_A);
  assert.equal(podUidFromPath(`kubepods.slice/kubepods-pod${UID_A.replaceAll('-', '_')}.slice`), UID_A);
  assert.equal(podUidFromPath(`kubepods/besteffort/pod${UID_B}/4f1e2d`), UID_B);
  assert.equal(podUidFromPath(`kubepods/pod${UID_B.toUpperCase()}/x`), UID_B);
  for (const none of ['', 'kubepods.slice', 'kubepods.slice/kubepods-besteffort.slice', 'system.slice/podman.service', 'kubepods/burstable/pod1234/x', `kubepods/podx${UID_A}`])
    assert.equal(podUidFromPath(none), undefined, none);
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
    assert.deepEqual([...pods.idsOf(UID_A)].sort(), [t.ids.aPod!, t.ids.a!, t.ids.a2!].sort(), 'the pod cgroup and its containers');
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
