// The API server client against the stand-in (real TLS): a bounded pool of
// kept-alive connections, and answers read only up to their bound.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { KubeClient, TooLargeError } from '../../src/kube/client.js';
import { loadKubeConfig } from '../../src/kube/kubeconfig.js';
import { startApiServer, type ApiServer } from '../standins/apiserver.js';

const dir = mkdtempSync(path.join(tmpdir(), 'nmi-kube-client-'));
let api: ApiServer;
before(async () => {
  api = await startApiServer();
  api.put({ apiVersion: 'v1', kind: 'Secret', metadata: { name: 'small', namespace: 'app' }, data: { clientSecret: 'eA==' } });
  api.put({ apiVersion: 'v1', kind: 'Secret', metadata: { name: 'big', namespace: 'app' }, data: { clientSecret: 'eA=='.repeat(50_000) } });
});
after(async () => {
  await api.close();
  rmSync(dir, { recursive: true, force: true });
});

const client = (): KubeClient => new KubeClient(loadKubeConfig({ kubeconfig: api.writeKubeconfig(dir) }), 'nmi-test');
const signal = new AbortController().signal;

test('30 requests at once share at most 8 connections, which stay open across a pause longer than undici\'s default 4 s', async () => {
  const c = client();
  try {
    const accepted = api.connections.accepted;
    let inFlight = 0;
    let most = 0;
    for (let i = 0; i < 30; i++) {
      api.beforeNext('GET', '/api/v1/namespaces/app/secrets/small', async () => {
        most = Math.max(most, ++inFlight);
        await sleep(30);
        inFlight--;
      });
    }
    await Promise.all(Array.from({ length: 30 }, () => c.getJson('/api/v1/namespaces/app/secrets/small', signal)));
    const opened = api.connections.accepted - accepted;
    assert.ok(opened <= 8 && most <= 8, `${opened} connections opened, ${most} requests in flight at once`);
    await sleep(4_500);
    await Promise.all(Array.from({ length: 8 }, () => c.getJson('/api/v1/namespaces/app/secrets/small', signal)));
    assert.equal(api.connections.accepted - accepted, opened, 'idle connections were closed and opened again');
  } finally {
    await c.close();
  }
});

test('an answer over its bound is cut off and refused, not read whole; one within it is parsed', async () => {
  const c = client();
  try {
    await assert.rejects(c.getJson('/api/v1/namespaces/app/secrets/big', signal, 64 * 1024), (err: unknown) => err instanceof TooLargeError && /over 65536 bytes/.test(err.message));
    const small = (await c.getJson('/api/v1/namespaces/app/secrets/small', signal, 64 * 1024)) as { metadata: { name: string } };
    assert.equal(small.metadata.name, 'small');
  } finally {
    await c.close();
  }
});
