// The upstream budget alone, on real time (a fake clock where a wait is too long to sleep): its limits, its turn order, its refusals.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as wait } from 'node:timers/promises';
import { BudgetError, UpstreamBudget, type Release, type TicketRequest } from '../../src/budget/budget.js';
import { limits } from '../../src/config/limits.js';

const first = (pod: string, extra: Partial<TicketRequest> = {}): TicketRequest => ({ kind: 'first', pods: [pod], ...extra });

/** Grants in order, each released after holdMs. */
async function run(budget: UpstreamBudget, requests: Array<{ label: string; request: TicketRequest }>, holdMs: number): Promise<{ order: string[]; starts: number[]; peak: number }> {
  const order: string[] = [];
  const starts: number[] = [];
  let inFlight = 0;
  let peak = 0;
  await Promise.all(
    requests.map(async ({ label, request }) => {
      const release = await budget.request(request).granted;
      order.push(label);
      starts.push(Date.now());
      peak = Math.max(peak, ++inFlight);
      await wait(holdMs);
      inFlight--;
      release();
    }),
  );
  return { order, starts, peak };
}

test('never more calls in flight than allowed, nor more started in any second than the rate', async () => {
  const budget = new UpstreamBudget('test', { maxConcurrent: 3, ratePerSec: 20 });
  const { starts, peak } = await run(budget, Array.from({ length: 30 }, (_, i) => ({ label: String(i), request: first(`pod-${i % 4}`) })), 20);
  assert.equal(peak, 3);
  for (let i = 20; i < starts.length; i++) assert.ok(starts[i]! - starts[i - 20]! >= 1000, `call ${i} started ${starts[i]! - starts[i - 20]!} ms after call ${i - 20}`);
  // Paced after the burst: within the first second, no two starts back to back beyond the first three.
  const gaps = starts.slice(4, 20).map((at, i) => at - starts[i + 3]!);
  assert.ok(Math.min(...gaps) >= 40, `gaps ${gaps.join(',')}`);
  assert.equal(budget.stats().granted, 30);
});

test("pods are served in turn: one pod's backlog does not hold another's first call", async () => {
  const budget = new UpstreamBudget('test', { maxConcurrent: 1, ratePerSec: 1000 });
  const requests = Array.from({ length: 6 }, (_, i) => ({ label: `a${i}`, request: first('a') }));
  requests.push({ label: 'b0', request: first('b') }, { label: 'b1', request: first('b') });
  const { order } = await run(budget, requests, 5);
  assert.deepEqual(order, ['a0', 'b0', 'a1', 'b1', 'a2', 'a3', 'a4', 'a5']);
});

test('a refresh waits behind first tokens until it is urgent, then goes before them', async () => {
  const budget = new UpstreamBudget('test', { maxConcurrent: 1, ratePerSec: 1000 });
  const now = Date.now();
  const { order } = await run(
    budget,
    [
      { label: 'a0', request: first('a') },
      { label: 'a1', request: first('a') },
      { label: 'later', request: { kind: 'refresh', pods: [], urgentAtMs: now + 60_000 } },
      { label: 'urgent', request: { kind: 'refresh', pods: [], urgentAtMs: now } },
      { label: 'a2', request: first('a') },
    ],
    5,
  );
  assert.deepEqual(order, ['a0', 'urgent', 'a1', 'a2', 'later']);
});

test('a retry goes to the front of its pod\'s queue', async () => {
  const budget = new UpstreamBudget('test', { maxConcurrent: 1, ratePerSec: 1000 });
  const { order } = await run(
    budget,
    [
      { label: 'a0', request: first('a') },
      { label: 'a1', request: first('a') },
      { label: 'retry', request: first('a', { retry: true }) },
    ],
    5,
  );
  assert.deepEqual(order, ['a0', 'retry', 'a1']);
});

test('an pod with its maximum under way or queued is refused, for a new call and for joining one; others are not', async () => {
  const budget = new UpstreamBudget('test', { maxConcurrent: 1, ratePerSec: 1000 }, { maxQueuedPerPod: 2 });
  const releases: Promise<Release>[] = [];
  budget.admit('a');
  releases.push(budget.request(first('a')).granted); // in flight at once, and counted
  budget.admit('a');
  releases.push(budget.request(first('a')).granted);
  assert.throws(() => budget.admit('a'), (err) => err instanceof BudgetError && err.reason === 'pod-pending' && err.retryAfterS >= 1);
  budget.admit('b');
  const shared = budget.request(first('b'));
  budget.admit('c');
  shared.join('c');
  assert.equal(budget.stats().queued.first, 2);
  assert.throws(() => shared.join('a'), BudgetError);
  await Promise.all([...releases, shared.granted].map(async (granted) => (await granted)()));
});

test('a first call that gets no turn in time is refused; one whose signal aborts leaves the queue', async () => {
  const budget = new UpstreamBudget('test', { maxConcurrent: 1, ratePerSec: 1000 }, { maxWaitMs: 50 });
  const hold = await budget.request(first('a')).granted;
  const waiting = budget.request(first('b')).granted;
  await assert.rejects(waiting, (err) => err instanceof BudgetError && err.reason === 'queue-timeout');
  const dropped = new AbortController();
  const cancelled = budget.request({ kind: 'refresh', pods: [], signal: dropped.signal }).granted;
  dropped.abort(new Error('dropped'));
  await assert.rejects(cancelled, /dropped/);
  assert.deepEqual(budget.stats().queued, { first: 0, refresh: 0 });
  hold();
  (await budget.request(first('c')).granted)();
});

test('an upstream 429 pauses every call for its Retry-After', async () => {
  const budget = new UpstreamBudget('test', { maxConcurrent: 2, ratePerSec: 1000 });
  const throttled = await budget.request(first('a')).granted;
  const next = budget.request(first('b')).granted;
  (await next)();
  const released = Date.now();
  throttled({ throttledMs: 300 });
  const after = await budget.request(first('c')).granted;
  assert.ok(Date.now() - released >= 290, `started ${Date.now() - released} ms after the 429`);
  after();
  assert.equal(budget.stats().throttled, 1);
});

test("an upstream's Retry-After of a day pauses calls for limits.maxRetryAfterMs, not a day", async () => {
  let now = Date.now();
  const budget = new UpstreamBudget('test', { maxConcurrent: 2, ratePerSec: 1000 }, { now: () => now });
  (await budget.request(first('a')).granted)({ throttledMs: 86_400_000 });
  now += limits.maxRetryAfterMs - 1;
  let granted: Release | undefined;
  void budget.request(first('b')).granted.then((release) => (granted = release));
  const next = () => granted;
  await wait(20);
  assert.equal(next(), undefined, 'paused until the cap');
  now += 1;
  for (let i = 0; i < 100 && !next(); i++) await wait(5);
  const release = next();
  assert.ok(release, 'a minute after a Retry-After of a day, calls go again');
  release();
});

test('limits are checked', () => {
  assert.throws(() => new UpstreamBudget('x', { maxConcurrent: 0, ratePerSec: 1 }), RangeError);
  assert.throws(() => new UpstreamBudget('x', { maxConcurrent: 1, ratePerSec: 0 }), RangeError);
});
