// The audit's records from what the token core and the native server tell it:
// one served record per token a pod is first given, usage and refusals counted per
// interval, every map within its bound and what a bound keeps out counted.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Audit, auditLimits } from '../../src/audit/audit.js';
import { AuditStream } from '../../src/audit/stream.js';
import { IdentityType, identityKey, type AzureIdentity } from '../../src/bindings/model.js';
import type { Pod } from '../../src/kubelet/pod.js';
import { podScoped, tokenKey } from '../../src/server/tables.js';
import type { Token } from '../../src/tokens/token.js';
import { issueStandinToken } from '../standins/imds.js';
import { captureLogs } from '../harness/log-capture.js';

const pod = (name: string): Pod => ({ uid: `uid-${name}`, namespace: 'apps', name, labels: {}, ips: ['10.0.0.1'], hostNetwork: false, phase: 'Running', nodeName: 'node1' });
const identity: AzureIdentity = { name: 'web-id', namespace: 'apps', type: IdentityType.ServicePrincipal, clientID: 'c1', resourceID: '', tenantID: 't', namespaced: false, version: '1' };
const token = (uti: string): Token => ({
  accessToken: issueStandinToken({ aud: 'r', appid: 'c1', identity: 'sp', serial: 1, uti, oid: 'o1', iat: 0, nbf: 0, exp: 2_000_000_000 }),
  clientId: 'c1',
  expiresOn: 2_000_000_000,
  extExpiresIn: 0,
  notBefore: 0,
  resource: 'r',
  tokenType: 'Bearer',
});

function setup(t: { after(fn: () => void): void }) {
  const dir = mkdtempSync(path.join(tmpdir(), 'nmi-audit-'));
  const file = path.join(dir, 'audit.jsonl');
  const stream = new AuditStream({ path: file, maxBytes: 1 << 30, keep: 1, log: captureLogs().log });
  let now = Date.parse('2026-01-01T00:00:00Z');
  const audit = new Audit({ stream, node: 'node1', intervalMs: 3_600_000, now: () => now });
  t.after(() => {
    audit.stop();
    rmSync(dir, { recursive: true, force: true });
  });
  const records = () =>
    (existsSync(file) ? readFileSync(file, 'utf8') : '')
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l) as Record<string, any>);
  return { audit, stream, records, tick: (ms: number) => (now += ms) };
}

test('a token is recorded the first time a pod is served it, and again only when it is a new one', (t) => {
  const { audit, records } = setup(t);
  const first = token('uti-1');
  audit.served(identity, 'r', first, pod('a'));
  audit.served(identity, 'r', first, pod('a'));
  audit.served(identity, 'r', token('uti-1'), pod('a')); // the same token, another object
  audit.served(identity, 'r', first, pod('b'));
  audit.served(identity, 'r', token('uti-2'), pod('a'));
  const served = records().filter((r) => r.kind === 'served');
  assert.deepEqual(served.map((r) => [r.pod.name, r.tokenId]), [['a', 'uti-1'], ['b', 'uti-1'], ['a', 'uti-2']]);
  assert.deepEqual(served[0], {
    kind: 'served',
    time: '2026-01-01T00:00:00.000Z',
    node: 'node1',
    pod: { namespace: 'apps', name: 'a', uid: 'uid-a', serviceAccount: 'default' },
    identity: { clientId: 'c1', namespace: 'apps', name: 'web-id', type: 1 },
    resource: 'r',
    source: 'entra',
    tokenId: 'uti-1',
    objectId: 'o1',
    expiresOn: new Date(2_000_000_000_000).toISOString(),
  });
  assert.deepEqual(audit.servedTo('uid-a').map((s) => s.tokenId), ['uti-2']);
  audit.stop();
  const usage = records().filter((r) => r.kind === 'usage');
  assert.deepEqual(usage.map((r) => [r.pod.name, r.count]), [['a', 4], ['b', 1]]);
});

test("usage: the native server's counts join the core's, per interval; an interval with none writes none", (t) => {
  const { audit, records, tick } = setup(t);
  const key = tokenKey({ identityKey: podScoped('uid-a', identityKey(identity)), resource: 'r' });
  let native: [string, number][] = [[key, 1000]];
  audit.countNative(() => {
    const taken = native;
    native = [];
    return taken;
  });
  audit.served(identity, 'r', token('uti-1'), pod('a'));
  tick(60_000);
  audit.flush();
  tick(60_000);
  audit.flush();
  const usage = records().filter((r) => r.kind === 'usage');
  assert.deepEqual(usage, [
    { kind: 'usage', from: '2026-01-01T00:00:00.000Z', to: '2026-01-01T00:01:00.000Z', pod: { namespace: 'apps', name: 'a', uid: 'uid-a', serviceAccount: 'default' }, identity: { clientId: 'c1' }, resource: 'r', count: 1001 },
  ]);
});

test('answers of an entry the audit has no served record for are counted as dropped, not lost silently', (t) => {
  const { audit, stream, records } = setup(t);
  audit.countNative(() => [['someone/else\nr', 7]]);
  audit.flush();
  assert.equal(records().length, 0);
  assert.equal(stream.counts.dropped, 7);
});

test('refusals: one record per pod or address and kind per interval, with its count; past the bound, dropped', (t) => {
  const { audit, stream, records } = setup(t);
  const detail = { status: 400, error: 'invalid_request', error_description: 'Identity not found' };
  for (let i = 0; i < 3; i++) audit.refused(pod('a'), 'no-identity', detail);
  audit.refused(pod('a'), 'budget', { ...detail, status: 429 });
  audit.unknownCaller('10.0.0.9');
  audit.flush();
  const refused = records().filter((r) => r.kind === 'refused');
  assert.deepEqual(
    refused.map(({ pod: p, caller, reason, status, count }) => [p?.name ?? caller, reason, status, count]),
    [['a', 'no-identity', 400, 3], ['a', 'budget', 429, 1], ['10.0.0.9', 'unknown-caller', 404, 1]],
  );
  for (let i = 0; i <= auditLimits.refused; i++) audit.unknownCaller(`10.1.${i >> 8}.${i & 255}`);
  assert.equal(stream.counts.dropped, 1);
});

test('the served records kept for usage and nmi explain stay within their bound, the least recently served going first', (t) => {
  const { audit } = setup(t);
  const one = token('uti-1');
  for (let i = 0; i <= auditLimits.served; i++) audit.served(identity, `r${i}`, one, pod('a'));
  const kept = audit.servedTo('uid-a');
  assert.equal(kept.length, auditLimits.served);
  assert.equal(kept.at(-1)?.resource, 'r1');
  assert.equal(kept[0]?.resource, `r${auditLimits.served}`);
});

test('a token a pod keeps asking for stays: the bound evicts what no pod asked for lately', (t) => {
  const { audit } = setup(t);
  const one = token('uti-1');
  audit.served(identity, 'kept', one, pod('a'));
  for (let i = 1; i < auditLimits.served; i++) {
    audit.served(identity, `r${i}`, one, pod('a'));
    if (i % 1000 === 0) audit.served(identity, 'kept', one, pod('a'));
  }
  audit.served(identity, 'one-more', one, pod('a'));
  const kept = audit.servedTo('uid-a').map((s) => s.resource);
  assert.ok(kept.includes('kept'));
  assert.ok(!kept.includes('r1'));
});
