// `nmi run --host-token-socket`: the daemon serves a pod's token to root on the
// host through the unix socket, and removes the socket when it stops.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { request, Agent } from 'undici';
import { createCluster, crd, type Cluster } from '../harness/cluster.js';

let cluster: Cluster;
const socketPath = `/run/nmi-test-${process.pid}/host-token.sock`;

before(async () => {
  cluster = await createCluster();
  cluster.writeBindings([crd.userAssigned('id-a', '11111111-1111-1111-1111-111111111111', '/subscriptions/s/x/a'), crd.binding('bind-a', 'id-a', 'a')]);
  cluster.addPod({ name: 'web', namespace: 'default', labels: { aadpodidbinding: 'a' } });
});

after(() => cluster?.close());

test('a root host process gets a pod\'s token on the socket; the socket is 0600 and gone after stop', async () => {
  const nmi = await cluster.startNmi(['--server', 'js', '--host-token-socket', socketPath]);
  assert.equal(statSync(socketPath).mode & 0o777, 0o600);
  const dispatcher = new Agent({ connect: { socketPath } });
  const res = await request('http://localhost/host/token/?resource=https%3A%2F%2Fvault.azure.net', { dispatcher, headers: { podns: 'default', podname: 'web' } });
  const body = (await res.body.json()) as Record<string, string>;
  assert.equal(res.statusCode, 200, JSON.stringify(body));
  assert.equal(body.client_id, '11111111-1111-1111-1111-111111111111');
  const missing = await request('http://localhost/host/token/?resource=x', { dispatcher, headers: { podns: 'default', podname: 'nobody' } });
  assert.equal(missing.statusCode, 404);
  await missing.body.dump();
  await dispatcher.close();
  assert.equal(await nmi.stop('SIGTERM'), 0);
  assert.equal(existsSync(socketPath), false);
});

test("--audit-log: a pod's token given to a host process is recorded as served to that pod", async () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'nmi-host-audit-'));
  const auditFile = path.join(dir, 'audit.jsonl');
  const nmi = await cluster.startNmi(['--server', 'js', '--host-token-socket', socketPath, '--audit-log', auditFile, '--audit-interval', '1h']);
  const dispatcher = new Agent({ connect: { socketPath } });
  try {
    const res = await request('http://localhost/host/token/?resource=https%3A%2F%2Fvault.azure.net', { dispatcher, headers: { podns: 'default', podname: 'web' } });
    assert.equal(res.statusCode, 200);
    await res.body.dump();
    const served = readFileSync(auditFile, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l) as Record<string, any>).filter((r) => r.kind === 'served');
    assert.deepEqual(served.map((r) => [r.pod.name, r.identity.clientId, r.resource]), [['web', '11111111-1111-1111-1111-111111111111', 'https://vault.azure.net']]);
  } finally {
    await dispatcher.close();
    assert.equal(await nmi.stop('SIGTERM'), 0);
    rmSync(dir, { recursive: true, force: true });
  }
});
