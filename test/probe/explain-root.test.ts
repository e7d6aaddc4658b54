// /explain tells which pods exist, their identities and why they were refused: it
// answers root (or nmi's own uid) only, by the kernel's owner of the connecting
// socket, while /healthz, /readyz and /metrics stay open to every local user. As
// another user, `nmi explain` says plainly that it needs root. The other uid is
// nobody, through setpriv: those tests need root and are skipped without it.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import type { AddressInfo } from 'node:net';
import { request } from 'undici';
import { createRegistry } from '../../src/metrics/registry.js';
import { explainRefusal, startProbeServer } from '../../src/probe/probe-server.js';
import { Readiness } from '../../src/probe/readiness.js';
import { nmiBin } from '../harness/netns.js';
import { asUser } from '../harness/users.js';

const asRoot = process.getuid?.() === 0;
const needsRoot = !asRoot && 'needs root to connect as another uid (setpriv)';
const asNobody = asUser();

const readiness = new Readiness();
const asked: string[] = [];
const server = await startProbeServer({ host: '127.0.0.1', port: 0 }, readiness, createRegistry(), undefined, {
  explain: async (target) => {
    asked.push(target);
    return { status: 200, body: { asked: target } };
  },
});
const port = (server.address() as AddressInfo).port;
const base = `http://127.0.0.1:${port}`;
after(() => server.close());

/** The status and body of each path, fetched by nobody in its own process. */
async function getAsNobody(paths: string[]): Promise<{ status: number; body: string }[]> {
  const script = `const out = []; for (const p of JSON.parse(process.argv[1])) { const r = await fetch(${JSON.stringify(base)} + p); out.push({ status: r.status, body: await r.text() }); } console.log(JSON.stringify(out));`;
  const child = spawn(asNobody[0]!, [...asNobody.slice(1), process.execPath, '--input-type=module', '-e', script, JSON.stringify(paths)], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
  await once(child, 'exit');
  return JSON.parse(out) as { status: number; body: string }[];
}

test('/explain answers the daemon\'s own uid (root in production)', async () => {
  const res = await request(`${base}/explain?pod=default/web`);
  assert.equal(res.statusCode, 200);
  assert.deepEqual(await res.body.json(), { asked: 'default/web' });
});

test('another local user gets 403 with a one-line reason from /explain, and the probes as before', { skip: needsRoot }, async () => {
  asked.length = 0;
  const [explain, healthz, readyz, metrics] = await getAsNobody(['/explain?pod=default/web', '/healthz', '/readyz', '/metrics']);
  assert.equal(explain!.status, 403);
  assert.deepEqual(JSON.parse(explain!.body), { error: "explain answers root only, and this connection is uid 65534's: run nmi explain as root", reason: 'not-root' });
  assert.deepEqual(asked, [], 'nothing was explained');
  assert.equal(healthz!.status, 200);
  assert.equal(readyz!.status, 200);
  assert.equal(metrics!.status, 200);
  assert.match(metrics!.body, /^# HELP nmi_process_cpu_seconds_total/m);
});

test('nmi explain run as another user says it needs root, exit 1', { skip: needsRoot }, async () => {
  const child = spawn(asNobody[0]!, [...asNobody.slice(1), process.execPath, nmiBin, 'explain', 'default/web', '--probe-address', `127.0.0.1:${port}`], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const [code] = (await once(child, 'exit')) as [number];
  assert.equal(code, 1);
  assert.equal(stderr, "nmi explain: the daemon answered 403: explain answers root only, and this connection is uid 65534's: run nmi explain as root\n");
});

test('the rule: root or our own uid; a socket the kernel cannot name is refused', () => {
  const ends = { remoteAddress: '127.0.0.1', remotePort: 40000, localAddress: '127.0.0.1', localPort: 8085 };
  const owned = (uid: number) => () => ({ uid, inode: 1, cgroupId: null });
  assert.equal(explainRefusal(ends, owned(0), 1000), undefined);
  assert.equal(explainRefusal(ends, owned(1000), 1000), undefined);
  assert.match(explainRefusal(ends, owned(1001), 1000)!, /uid 1001's: run nmi explain as root/);
  assert.match(explainRefusal(ends, () => null, 1000)!, /could not name the caller/);
  assert.match(explainRefusal(ends, () => { throw new Error('sock_diag: EPERM'); }, 1000)!, /could not name the caller \(sock_diag: EPERM\)/);
  assert.match(explainRefusal({}, owned(0), 0)!, /could not name the caller/);
});
