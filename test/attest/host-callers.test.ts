// The verdicts of --host-token-address's attestation where the kernel or the
// tree cannot say who called (the cases a real node rarely shows; the e2e test
// has the real ones), and the --host-token-allow grammar.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { HostCallers } from '../../src/attest/host-callers.js';
import { hostCallerRules } from '../../src/config/values.js';
import type { Pod } from '../../src/kubelet/pod.js';
import type { SocketOwner } from '../../src/native/addon.js';
import { captureLogs } from '../harness/log-capture.js';

const UID = '0f3c6a4e-1b2d-4c5e-8f90-a1b2c3d4e5f6';
const csi: Pod = { uid: UID, namespace: 'kube-system', name: 'csi-1', labels: { app: 'csi' }, ips: ['10.0.0.4'], hostNetwork: true, phase: 'Running', nodeName: 'n1' };
const ends = { remoteAddress: '::ffff:127.0.0.1', remotePort: 40000, localAddress: '::ffff:127.0.0.1', localPort: 2579 };

function callers(owner: () => SocketOwner | null, cgroups: Map<bigint, string | null>) {
  const logs = captureLogs();
  const rules = hostCallerRules('kube-system/app=csi, host-root', 'host-token-allow');
  const seen: unknown[] = [];
  const hc = new HostCallers({ uidOf: async (id) => cgroups.get(id) }, { lookupUid: async (uid) => (uid === UID ? csi : undefined) }, rules, logs.log, (e) => {
    seen.push(e);
    return owner();
  });
  return { hc, logs, seen };
}

test('the lookup is of the peer socket, unmapped; a pod, a root host process, and everything unknown', async () => {
  const cgroups = new Map<bigint, string | null>([[7n, UID], [8n, null]]);
  let owner: SocketOwner | null = { uid: 0, inode: 1, cgroupId: 7n };
  const { hc, seen } = callers(() => owner, cgroups);
  assert.deepEqual(await hc.admit(ends), { allowed: true, caller: 'pod kube-system/csi-1' });
  assert.deepEqual(seen[0], { src: '127.0.0.1', srcPort: 40000, dst: '127.0.0.1', dstPort: 2579 }, 'the peer socket is looked up: its own end is our remote one, unmapped');
  owner = { uid: 0, inode: 1, cgroupId: 8n };
  assert.deepEqual(await hc.admit(ends), { allowed: true, caller: 'host uid 0' });
  owner = { uid: 1000, inode: 1, cgroupId: 8n };
  assert.equal((await hc.admit(ends)).allowed, false);
  owner = { uid: 0, inode: 1, cgroupId: null };
  assert.deepEqual(await hc.admit(ends), { allowed: false, reason: 'unattested', caller: '127.0.0.1:40000' }, 'a kernel that names no cgroup');
  owner = { uid: 0, inode: 1, cgroupId: 9n };
  assert.deepEqual(await hc.admit(ends), { allowed: false, reason: 'unattested', caller: '127.0.0.1:40000 cgroup 9' }, 'a cgroup no walk found is not taken for a host process');
  owner = null;
  assert.equal((await hc.admit(ends)).allowed, false);
  assert.deepEqual(await hc.admit({ remoteAddress: '127.0.0.1' }), { allowed: false, reason: 'unattested', caller: 'unknown' }, 'a socket already gone');
  assert.deepEqual(hc.refused, { unattested: 4, 'unknown-pod': 0, 'not-allowed': 1 });
});

test('a failing lookup refuses and is logged; it never rejects', async () => {
  const { hc, logs } = callers(() => {
    throw new Error('socketOwner: sock_diag: Operation not permitted');
  }, new Map());
  assert.deepEqual(await hc.admit(ends), { allowed: false, reason: 'unattested', caller: 'unknown' });
  assert.ok(logs.lines().some((l) => /caller lookup failed/.test(String(l.msg)) && /Operation not permitted/.test(String(l.err))));
});

test('--host-token-allow: entries, spaces and empty ones', () => {
  assert.deepEqual(hostCallerRules('', 'f'), []);
  assert.deepEqual(hostCallerRules(' host-root ,, kube-system/app.kubernetes.io/name=csi-secrets-store-provider-azure', 'f'), [
    { kind: 'host-root' },
    { kind: 'pods', namespace: 'kube-system', label: 'app.kubernetes.io/name', value: 'csi-secrets-store-provider-azure' },
  ]);
  assert.deepEqual(hostCallerRules('ns/app=', 'f'), [{ kind: 'pods', namespace: 'ns', label: 'app', value: '' }], 'an empty value is a value');
  assert.throws(() => hostCallerRules('host-root,ns/app', 'f'), /--f: "ns\/app" is not host-root or namespace\/label=value/);
  assert.throws(() => hostCallerRules('ns/UPPER.example.com/x=1', 'f'), /is not a label key/);
});
