// The probe address as a kubelet or an operator sees it: liveness that fails on a
// stalled event loop (and only then), readiness by named conditions, metrics.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import type { AddressInfo } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { request } from 'undici';
import { createRegistry } from '../../src/metrics/registry.js';
import { startProbeServer } from '../../src/probe/probe-server.js';
import { Readiness } from '../../src/probe/readiness.js';

const readiness = new Readiness();
readiness.require('pods');
readiness.require('rules');
const server = await startProbeServer({ host: '127.0.0.1', port: 0 }, readiness, createRegistry());
const base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
after(() => server.close());

async function get(path: string, method: 'GET' | 'POST' = 'GET'): Promise<{ status: number; body: string }> {
  const res = await request(`${base}${path}`, { method });
  return { status: res.statusCode, body: await res.body.text() };
}

test('/readyz names what is still pending, and is 200 once every condition holds', async () => {
  assert.deepEqual(await get('/readyz'), { status: 503, body: 'not ready: pods, rules\n' });
  readiness.set('pods', true);
  assert.deepEqual(await get('/readyz'), { status: 503, body: 'not ready: rules\n' });
  readiness.set('rules', true);
  assert.deepEqual(await get('/readyz'), { status: 200, body: 'ok\n' });
});

test('/metrics is Prometheus text with the process metrics; other paths 404, other methods 405', async () => {
  const metrics = await get('/metrics');
  assert.equal(metrics.status, 200);
  assert.match(metrics.body, /^# HELP nmi_process_cpu_seconds_total/m);
  assert.match(metrics.body, /^nmi_nodejs_eventloop_lag_p99_seconds \d/m);
  assert.equal((await get('/nope')).status, 404);
  assert.equal((await get('/healthz', 'POST')).status, 405);
});

test('/healthz is 200 while the event loop runs, 503 once after a stall over 5 s, then 200 again', async () => {
  assert.deepEqual(await get('/healthz'), { status: 200, body: 'ok\n' });
  // The monitor's first period passes uncounted: a daemon's stall comes long after it started.
  await sleep(600);
  // Hold the event loop past the liveness limit, as a runaway synchronous loop would.
  const until = Date.now() + 5_300;
  while (Date.now() < until);
  // The stall is recorded on the loop's next turn; a kubelet's next probe comes seconds later.
  await sleep(50);
  const stalled = await get('/healthz');
  assert.equal(stalled.status, 503);
  assert.match(stalled.body, /^event loop stalled \d+ms\n$/);
  assert.deepEqual(await get('/healthz'), { status: 200, body: 'ok\n' });
});
