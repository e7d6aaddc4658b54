// PodIndex over a real KubeletClient and the stand-in kubelet: which pods are
// callers, coalescing and rate limiting of refreshes, ambiguity, and outages.
import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import { after, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { Registry } from 'prom-client';
import { codes, isNmiError } from '../../src/errors/errors.js';
import { KubeletClient } from '../../src/kubelet/kubelet-client.js';
import { registerKubeletMetrics } from '../../src/kubelet/metrics.js';
import { PodIndex, type PodIndexOptions } from '../../src/kubelet/pod-index.js';
import type { Pod } from '../../src/kubelet/pod.js';
import { createLogger } from '../../src/log/logger.js';
import { createPki } from '../standins/pki.js';
import { makePodJson, startKubelet, type Kubelet } from '../standins/kubelet.js';

const pki = createPki('pod-index');
const cleanups: (() => unknown)[] = [];

after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup();
  pki.remove();
});

interface Setup {
  kubelet: Kubelet;
  index: PodIndex;
  logs: Record<string, unknown>[];
}

async function setup(pods: object[], options: Partial<PodIndexOptions> = {}): Promise<Setup> {
  const kubelet = await startKubelet({ pki, pods });
  const client = new KubeletClient({ url: kubelet.url, ca: kubelet.caFile, clientCert: kubelet.client.cert, clientKey: kubelet.client.key, timeoutMs: 2_000 });
  const logs: Record<string, unknown>[] = [];
  const destination = new Writable({
    write(chunk, _enc, done) {
      logs.push(JSON.parse(String(chunk)));
      done();
    },
  });
  const log = createLogger({ level: 'debug', format: 'json', destination });
  const index = new PodIndex({ fetchPods: () => client.fetchPods(), refreshIntervalMs: 60_000, minRefreshGapMs: 0, log, ...options });
  cleanups.push(() => kubelet.close(), () => client.close(), () => index.stop());
  return { kubelet, index, logs };
}

const web = makePodJson({ name: 'web', namespace: 'shop', ip: '10.244.0.5', labels: { aadpodidbinding: 'web' } });

test('start: one sync, then known callers are answered from the index without a kubelet call', async () => {
  const { kubelet, index } = await setup([
    web,
    makePodJson({ name: 'dual', ip: '10.244.0.6', ips: ['10.244.0.6', 'fd00::6'] }),
    makePodJson({ name: 'starting', ip: '10.244.0.7', phase: 'Pending' }),
    makePodJson({ name: 'no-ip-yet', phase: 'Pending' }),
  ]);
  assert.equal(index.ready, false);
  await index.start();
  assert.equal(index.ready, true);
  assert.equal(index.size, 3);
  assert.equal(index.pods().length, 4);
  assert.equal(kubelet.calls, 1);

  assert.equal((await index.lookup('10.244.0.5'))?.name, 'web');
  assert.equal((await index.lookup('10.244.0.6'))?.name, 'dual');
  assert.equal((await index.lookup('fd00::6'))?.name, 'dual');
  assert.equal((await index.lookup('::ffff:10.244.0.7'))?.name, 'starting');
  assert.equal(kubelet.calls, 1);
  assert.deepEqual(index.refreshes, { start: 1, interval: 0, 'unknown-caller': 0 });
});

test('hostNetwork, Succeeded and Failed pods are listed but are never callers', async () => {
  const { kubelet, index } = await setup([
    makePodJson({ name: 'host', ip: '10.240.0.4', hostNetwork: true }),
    makePodJson({ name: 'done', ip: '10.244.0.8', phase: 'Succeeded' }),
    makePodJson({ name: 'crashed', ip: '10.244.0.9', phase: 'Failed' }),
    makePodJson({ name: 'unknown-phase', ip: '10.244.0.10', phase: 'Unknown' }),
  ]);
  await index.start();
  assert.equal(index.size, 0);
  assert.equal(index.pods().length, 4);
  for (const ip of ['10.240.0.4', '10.244.0.8', '10.244.0.9', '10.244.0.10']) assert.equal(await index.lookup(ip), undefined, ip);
  // Each unknown address asked the kubelet once more (the gap is 0 here).
  assert.equal(kubelet.calls, 5);
});

test('a pod added after start is found on its first lookup', async () => {
  const { kubelet, index } = await setup([web]);
  await index.start();
  kubelet.pods.push(makePodJson({ name: 'late', namespace: 'shop', ip: '10.244.3.3' }));
  const pod = await index.lookup('10.244.3.3');
  assert.equal(pod?.name, 'late');
  assert.equal(index.refreshes['unknown-caller'], 1);
  assert.equal(kubelet.calls, 2);
});

const DELETING = '2024-01-01T01:00:00Z';

test('a terminating pod\'s address freed and given to a new pod: answered as the new pod after one refresh, never the old', async () => {
  const a = makePodJson({ name: 'a', namespace: 'shop', uid: 'uid-a', ip: '10.244.5.5', deletionTimestamp: DELETING });
  const { kubelet, index } = await setup([a]);
  await index.start();
  assert.equal(index.known('10.244.5.5'), undefined, 'not served from the index');
  assert.equal(index.size, 1);
  // A is gone, B has its address; the index still lists A as it was.
  kubelet.pods.splice(0, 1, makePodJson({ name: 'b', namespace: 'shop', uid: 'uid-b', ip: '10.244.5.5' }));
  const pod = await index.lookup('10.244.5.5');
  assert.equal(pod?.uid, 'uid-b');
  assert.equal(kubelet.calls, 2);
  assert.equal(index.refreshes['unknown-caller'], 1);
});

test('a terminating pod still listed after the re-check is served as itself, each time after a fresh list', async () => {
  const { kubelet, index } = await setup([makePodJson({ name: 'a', uid: 'uid-a', ip: '10.244.5.6', deletionTimestamp: DELETING })]);
  await index.start();
  assert.equal((await index.lookup('10.244.5.6'))?.uid, 'uid-a');
  assert.equal(kubelet.calls, 2);
  assert.equal((await index.lookup('10.244.5.6'))?.uid, 'uid-a');
  assert.equal(kubelet.calls, 3);
});

test('a terminating pod and a new one listed on one address: the new one, at once', async () => {
  const { kubelet, index } = await setup([
    makePodJson({ name: 'a', uid: 'uid-a', ip: '10.244.5.7', deletionTimestamp: DELETING }),
    makePodJson({ name: 'b', uid: 'uid-b', ip: '10.244.5.7' }),
  ]);
  await index.start();
  assert.equal((await index.lookup('10.244.5.7'))?.uid, 'uid-b');
  assert.equal(kubelet.calls, 1);
});

test('an address that changed pods between two lists is re-checked once, then answered from the index', async () => {
  const { kubelet, index } = await setup([makePodJson({ name: 'a', uid: 'uid-a', ip: '10.244.5.8' })]);
  await index.start();
  kubelet.pods.splice(0, 1, makePodJson({ name: 'b', uid: 'uid-b', ip: '10.244.5.8' }));
  await index.refresh('interval');
  assert.equal(index.known('10.244.5.8'), undefined);
  assert.equal((await index.lookup('10.244.5.8'))?.uid, 'uid-b');
  assert.equal(kubelet.calls, 3);
  assert.equal(index.known('10.244.5.8')?.uid, 'uid-b');
  assert.equal((await index.lookup('10.244.5.8'))?.uid, 'uid-b');
  assert.equal(kubelet.calls, 3);
});

test('a terminating pod while the kubelet is down: not served (the index cannot say the address is still its own)', async () => {
  const { kubelet, index } = await setup([makePodJson({ name: 'a', uid: 'uid-a', ip: '10.244.5.9', deletionTimestamp: DELETING })]);
  await index.start();
  kubelet.failWith(500);
  assert.equal(await index.lookup('10.244.5.9'), undefined);
  kubelet.failWith(null);
  assert.equal((await index.lookup('10.244.5.9'))?.uid, 'uid-a');
});

test('1000 concurrent lookups of unknown addresses make exactly one kubelet call', async () => {
  const { kubelet, index } = await setup([web]);
  await index.start();
  kubelet.pods.push(makePodJson({ name: 'burst', ip: '10.244.9.9' }));
  const answers = await Promise.all(Array.from({ length: 1000 }, (_, i) => index.lookup(i % 2 === 0 ? '10.244.9.9' : `10.99.${i >> 8}.${i & 255}`)));
  assert.equal(kubelet.calls, 2);
  assert.equal(index.refreshes['unknown-caller'], 1);
  assert.equal(answers.filter((p) => p?.name === 'burst').length, 500);
  assert.equal(answers.filter((p) => p === undefined).length, 500);
});

test('lookups during a refresh in flight join it rather than making another call', async () => {
  const { kubelet, index } = await setup([web]);
  await index.start();
  kubelet.pods.push(makePodJson({ name: 'joined', ip: '10.244.4.4' }));
  const interval = index.refresh('interval');
  const answer = index.lookup('10.244.4.4');
  await interval;
  assert.equal((await answer)?.name, 'joined');
  assert.equal(kubelet.calls, 2);
  assert.deepEqual(index.refreshes, { start: 1, interval: 1, 'unknown-caller': 0 });
});

test('rate limit: within minRefreshGapMs unknown addresses wait for one shared refresh after the gap', async () => {
  const { kubelet, index } = await setup([web], { minRefreshGapMs: 300 });
  await index.start();
  assert.equal(await index.lookup('10.244.5.1'), undefined);
  assert.equal(kubelet.calls, 2);
  kubelet.pods.push(makePodJson({ name: 'too-soon', ip: '10.244.5.2' }));
  // Inside the gap: every caller waits, and the one refresh after it answers them all.
  const answers = await Promise.all(Array.from({ length: 100 }, () => index.lookup('10.244.5.2')));
  assert.deepEqual([...new Set(answers.map((p) => p?.name))], ['too-soon']);
  assert.equal(kubelet.calls, 3);
  assert.equal(index.refreshes['unknown-caller'], 2);
  // Known callers never wait for the kubelet.
  assert.equal((await index.lookup('10.244.0.5'))?.name, 'web');
  assert.equal(kubelet.calls, 3);
});

test('rate limit: after the gap an unknown address triggers a refresh again', async () => {
  const { kubelet, index } = await setup([web], { minRefreshGapMs: 100 });
  await index.start();
  assert.equal(await index.lookup('10.244.6.1'), undefined);
  assert.equal(kubelet.calls, 2);
  await sleep(150);
  kubelet.pods.push(makePodJson({ name: 'later', ip: '10.244.6.2' }));
  assert.equal((await index.lookup('10.244.6.2'))?.name, 'later');
  assert.equal(kubelet.calls, 3);
});

test('two live pods claiming one address: that address answers nobody, warned once per change', async () => {
  const a = makePodJson({ name: 'a', namespace: 'x', ip: '10.244.7.7' });
  const b = makePodJson({ name: 'b', namespace: 'y', ip: '10.244.7.7' });
  const { kubelet, index, logs } = await setup([a, b, web]);
  await index.start();
  assert.equal(await index.lookup('10.244.7.7'), undefined);
  assert.equal((await index.lookup('10.244.0.5'))?.name, 'web');
  assert.equal(index.size, 1);
  await index.refresh('interval');

  const warnings = logs.filter((l) => l.level === 40);
  assert.equal(warnings.length, 1);
  assert.deepEqual(warnings[0]?.conflicts, ['10.244.7.7: x/a, y/b']);

  // Once one of them finishes, the address belongs to the other.
  (a.status as { phase: string }).phase = 'Succeeded';
  assert.equal((await index.lookup('10.244.7.7'))?.name, 'b');
  assert.ok(logs.some((l) => l.msg === 'pod address conflicts resolved'));
  assert.equal(logs.filter((l) => l.level === 40).length, 1);
  assert.ok(kubelet.calls >= 3);
});

test('kubelet down: the last index is kept and the failure counted; it recovers when the kubelet returns', async () => {
  const { kubelet, index, logs } = await setup([web]);
  await index.start();
  await kubelet.stop();

  await assert.rejects(index.refresh('interval'), (e: unknown) => isNmiError(e, codes.KUBELET));
  assert.equal((await index.lookup('10.244.0.5'))?.name, 'web');
  assert.equal(await index.lookup('10.244.8.8'), undefined);
  assert.equal(index.failures, 2);
  assert.equal(index.ready, true);
  assert.equal(index.size, 1);
  // One error line for the outage, however many calls failed.
  assert.equal(logs.filter((l) => l.level === 50).length, 1);

  await kubelet.start();
  kubelet.pods.push(makePodJson({ name: 'back', ip: '10.244.8.8' }));
  assert.equal((await index.lookup('10.244.8.8'))?.name, 'back');
  assert.ok(logs.some((l) => l.msg === 'kubelet pod refresh recovered'));
});

test('a failing kubelet (500) and a hung one also keep the last index', async () => {
  const { kubelet, index } = await setup([web]);
  await index.start();
  kubelet.failWith(500);
  assert.equal(await index.lookup('10.244.10.1'), undefined);
  kubelet.failWith('hang');
  await assert.rejects(index.refresh('interval'), (e: unknown) => isNmiError(e, codes.KUBELET));
  assert.equal((await index.lookup('10.244.0.5'))?.name, 'web');
  assert.equal(index.failures, 2);
});

test('start fails with the kubelet error when the first sync fails, and is not ready', async () => {
  const { kubelet, index } = await setup([web]);
  kubelet.failWith(403);
  await assert.rejects(index.start(), (e: unknown) => isNmiError(e, codes.KUBELET) && /403/.test((e as Error).message));
  assert.equal(index.ready, false);
  assert.equal(index.failures, 1);
});

test('the background poll refreshes every refreshIntervalMs', async () => {
  const { kubelet, index } = await setup([web], { refreshIntervalMs: 20 });
  await index.start();
  kubelet.pods.push(makePodJson({ name: 'polled', ip: '10.244.11.1' }));
  while (index.pods().length < 2 || index.refreshes.interval < 2) await sleep(10);
  index.stop();
  const polls = index.refreshes.interval;
  await sleep(60);
  assert.equal(index.refreshes.interval, polls, 'no poll after stop()');
  assert.ok(kubelet.calls >= 3);
});

test('onChange: called with every listed pod on the first sync and on changes only', async () => {
  const seen: Pod[][] = [];
  const { kubelet, index } = await setup([web], { onChange: (pods) => seen.push(pods) });
  await index.start();
  await index.refresh('interval');
  assert.equal(seen.length, 1);
  kubelet.pods.push(makePodJson({ name: 'host', ip: '10.240.0.4', hostNetwork: true }));
  await index.refresh('interval');
  assert.equal(seen.length, 2);
  assert.deepEqual(seen[1]?.map((p) => p.name), ['web', 'host']);
});

test('metrics: pods indexed, refreshes by reason and errors', async () => {
  const { kubelet, index } = await setup([web]);
  const registry = new Registry();
  registerKubeletMetrics(registry, index);
  await index.start();
  await index.lookup('10.244.12.1');
  kubelet.failWith(500);
  await index.refresh('interval').catch(() => {});
  const first = await registry.metrics();
  assert.match(first, /^nmi_pods_indexed 1$/m);
  assert.match(first, /^nmi_kubelet_refreshes_total\{reason="start"\} 1$/m);
  assert.match(first, /^nmi_kubelet_refreshes_total\{reason="unknown-caller"\} 1$/m);
  assert.match(first, /^nmi_kubelet_refreshes_total\{reason="interval"\} 1$/m);
  assert.match(first, /^nmi_kubelet_errors_total 1$/m);
  assert.doesNotMatch(first, /^nmi_kubelet_last_sync_timestamp_seconds 0$/m);

  // A second scrape reports totals, not increments since the first.
  await index.refresh('interval').catch(() => {});
  const second = await registry.metrics();
  assert.match(second, /^nmi_kubelet_refreshes_total\{reason="interval"\} 2$/m);
  assert.match(second, /^nmi_kubelet_errors_total 2$/m);
});
