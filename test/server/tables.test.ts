// The tables per pod (--audit-log): a pod's identities and tokens keyed by its uid, so
// a server answers a pod only what the core served that pod, and the rows are bounded.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setImmediate as turn } from 'node:timers/promises';
import { IdentityType, type AzureIdentity } from '../../src/bindings/model.js';
import { limits } from '../../src/config/limits.js';
import type { Pod } from '../../src/kubelet/pod.js';
import { attachTables, packCallers, type CallerEntry, type TableToken, type TokenServedListener } from '../../src/server/tables.js';
import type { Token } from '../../src/tokens/token.js';

const identity: AzureIdentity = { name: 'id', namespace: 'default', type: IdentityType.UserAssignedMSI, clientID: 'c', resourceID: '', tenantID: '', namespaced: false, version: '1' };
const pod = (uid: string, ip: string): Pod => ({ uid, namespace: 'default', name: uid, labels: {}, ips: [ip], hostNetwork: false, phase: 'Running', nodeName: 'n1' });
const bound = { identities: [identity], exception: false };
const token: Token = { accessToken: 'a.b.c', clientId: 'c', expiresOn: Math.floor(Date.now() / 1000) + 3600, extExpiresIn: 3600, notBefore: 0, resource: 'r', tokenType: 'Bearer' };

function world(perPod: boolean) {
  const pods = [pod('uid-a', '10.0.0.1'), pod('uid-b', '10.0.0.2')];
  let callers: CallerEntry[] = [];
  const upserts: TableToken[] = [];
  let tell: TokenServedListener = () => {};
  const tables = attachTables(
    {
      setCallers: (c) => (callers = c),
      updateTokens: (u) => upserts.push(...u),
      onTokenServed: (listener) => (tell = listener),
    },
    // One array for pods bound alike, as the bindings give it.
    { pods: () => pods, identitiesFor: () => bound, perPod },
  );
  return { pods, callers: () => callers, upserts, tell: (...args: Parameters<TokenServedListener>) => tell(...args), stop: () => tables.stop() };
}

test('per pod, each caller names its identities by its pod, and a token enters the table for the pod it was served to only', async () => {
  const w = world(true);
  const { lists, rows } = packCallers(w.callers(), (_identity, key) => key);
  assert.deepEqual(rows, [['10.0.0.1', false, 0], ['10.0.0.2', false, 1]]);
  assert.deepEqual(lists, [['uid-a/default/id'], ['uid-b/default/id']]);
  w.tell(identity, 'r', token, w.pods[0]);
  w.tell(identity, 'r', token); // not a pod's answer: no row
  await turn();
  assert.deepEqual(w.upserts.map((t) => [t.identityKey, t.identity, t.resource]), [['uid-a/default/id', 'default/id', 'r']]);
  w.stop();
});

test('shared, pods bound alike share one list and one token row', async () => {
  const w = world(false);
  const { lists, rows } = packCallers(w.callers(), (_identity, key) => key);
  assert.deepEqual(rows, [['10.0.0.1', false, 0], ['10.0.0.2', false, 0]]);
  assert.deepEqual(lists, [['default/id']]);
  w.tell(identity, 'r', token, w.pods[0]);
  w.tell(identity, 'r', token, w.pods[1]);
  await turn();
  assert.deepEqual(w.upserts.map((t) => t.identityKey), ['default/id']);
  w.stop();
});

test('per pod, the rows stop at limits.auditRows: past it the core answers', async () => {
  const w = world(true);
  for (let i = 0; i <= limits.auditRows; i++) w.tell(identity, `r${i}`, token, w.pods[0]);
  await turn();
  assert.equal(w.upserts.length, limits.auditRows);
  w.stop();
});
