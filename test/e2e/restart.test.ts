// Restarts no pod notices: this test plays systemd's part with the file
// descriptor store (it holds the listening sockets and hands them to each nmi
// it starts as LISTEN_FDS), while a pod asks for its token every 5 ms, each
// time on a new connection, through the real rules. The same restart without
// the stored sockets is run too, to show what the pod saw before.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import http from 'node:http';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { addon } from '../../src/native/addon.js';
import { createCluster, crd, type Cluster } from '../harness/cluster.js';
import { comparableRules, type PodAgent } from '../harness/netns.js';
import { failures, HeldSockets, STEADY_URL, steadyAcross } from '../harness/restarts.js';
import { request } from 'undici';
import { nmi, type NmiProcess, type StartOptions } from '../harness/nmi-process.js';
import { waitFor } from '../harness/wait-for.js';

const JUMP = '-A PREROUTING -j aad-metadata';

let cluster: Cluster;
let agent: PodAgent;
const held = new HeldSockets();

const nat = () => cluster.node.exec('iptables-save', ['-t', 'nat']);
const jumps = () => nat().split('\n').filter((l) => l === JUMP).length;
const start = (options: StartOptions = {}, extra: string[] = []) => cluster.startNmi(['--on-exit', 'keep', ...extra], options);
/** What systemd's store holds once the first nmi has stored its listeners (made after the test that runs without). */
const store = () => held.get(cluster.node.nodeIp);
const across = (act: () => Promise<void>) => steadyAcross(agent, jumps, act);

before(async () => {
  cluster = await createCluster();
  cluster.writeBindings([crd.userAssigned('id-a', '11111111-1111-1111-1111-111111111111', '/subscriptions/s/x/a'), crd.binding('bind-a', 'id-a', 'a')]);
  agent = await cluster.addPod({ name: 'app', labels: { aadpodidbinding: 'a' } }).ns.agent();
});

after(async () => {
  await agent?.close();
  held.drop();
  await cluster?.close();
});

test('without stored sockets (before): a restart in turn refuses the pod', async (t) => {
  let nmi = await start();
  const { counts, longestMs } = await across(async () => {
    assert.equal(await nmi.stop('SIGTERM'), 0, nmi.output());
    nmi = await start();
  });
  t.diagnostic(`${JSON.stringify(counts)}; longest wait ${longestMs} ms`);
  assert.ok((counts['error:ECONNREFUSED'] ?? 0) > 0, `refused while no nmi listened: ${JSON.stringify(counts)}`);
  await nmi.stop('SIGTERM');
});

test('(a) restart in turn with the stored listeners: no request fails, the rules are never rewritten, one jump throughout', async (t) => {
  let nmi: NmiProcess = await start({ listenFds: store() });
  const rules = nat();
  const { counts, longestMs, samples: jumpsSeen } = await across(async () => {
    assert.equal(await nmi.stop('SIGTERM'), 0, nmi.output());
    nmi = await start({ listenFds: store() });
  });
  t.diagnostic(`${JSON.stringify(counts)}; longest wait ${longestMs} ms`);
  assert.equal(failures(counts), 0, JSON.stringify(counts));
  assert.ok((counts['200'] ?? 0) > 100, JSON.stringify(counts));
  assert.deepEqual(jumpsSeen, [1]);
  assert.equal(comparableRules(nat()), comparableRules(rules));
  assert.match(nmi.output(), /listening socket taken over from the previous nmi/);
  assert.match(nmi.output(), /"result":"unchanged"[^\n]*"msg":"rules installed"/);
  assert.equal(await nmi.stop('SIGTERM'), 0);
});

test('(a) the host token socket too: a host process asking it all along across a restart in turn gets every answer', async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'nmi-host-'));
  const socketPath = path.join(dir, 'host.sock');
  const fds = [...store(), { name: 'host-token', fd: addon().listenUnix(socketPath, 0o600, 511) }];
  const flags = ['--host-token-socket', socketPath];
  let nmi: NmiProcess = await start({ listenFds: fds }, flags);
  const counts: Record<string, number> = {};
  let asking = true;
  const asker = (async () => {
    while (asking) {
      const status = await new Promise<string>((resolve) => {
        const req = http.get({ socketPath, agent: false, path: '/host/token?resource=https%3A%2F%2Fvault.azure.net', headers: { podns: 'default', podname: 'app' } }, (res) => {
          res.resume();
          res.on('end', () => resolve(String(res.statusCode)));
        });
        req.on('error', (err: NodeJS.ErrnoException) => resolve(`error:${err.code}`));
      });
      counts[status] = (counts[status] ?? 0) + 1;
      await sleep(5);
    }
  })();
  try {
    await sleep(500);
    assert.equal(await nmi.stop('SIGTERM'), 0, nmi.output());
    nmi = await start({ listenFds: fds }, flags);
    await sleep(500);
  } finally {
    asking = false;
    await asker;
    addon().closeFd(fds[2]!.fd);
    await nmi.stop('SIGTERM');
    rmSync(dir, { recursive: true, force: true });
  }
  t.diagnostic(JSON.stringify(counts));
  assert.deepEqual(Object.keys(counts), ['200'], JSON.stringify(counts));
});

test('(c) SIGKILL, then a restart with the stored listeners a second later: no connection refused', async (t) => {
  let nmi: NmiProcess = await start({ listenFds: store() });
  const rules = nat();
  const { counts, longestMs, samples: jumpsSeen } = await across(async () => {
    t.diagnostic(`killing ${nmi.child.pid}`);
    t.diagnostic(`killed: ${await nmi.stop('SIGKILL')}`);
    await sleep(1_000); // systemd's RestartSec
    nmi = await start({ listenFds: store() });
  });
  t.diagnostic(`${JSON.stringify(counts)}; longest wait ${longestMs} ms`);
  assert.equal(counts['error:ECONNREFUSED'], undefined, JSON.stringify(counts));
  // At most the request on a connection the killed process had accepted is lost.
  assert.ok(failures(counts) <= 1, JSON.stringify(counts));
  assert.ok(longestMs >= 1_000, `a request waited through the gap: ${longestMs} ms`);
  assert.deepEqual(jumpsSeen, [1]);
  assert.equal(comparableRules(nat()), comparableRules(rules));
  assert.equal(await nmi.stop('SIGTERM'), 0);
});

test('(b) overlapping handoff (--take-over): both serve from one queue, the probe is the new one\'s at once, the old one leaves the rules; no request fails', async (t) => {
  held.drop();
  const socket = `${cluster.bindingsDir}-handoff.sock`;
  const old = await start({}, ['--handoff-socket', socket]);
  const rules = nat();
  const probes: { status: number; pid: number }[] = [];
  let fresh: NmiProcess | undefined;
  const { counts, longestMs, samples: jumpsSeen } = await across(async () => {
    const starting = start({ waitReady: false }, ['--handoff-socket', socket, '--take-over']);
    fresh = await starting;
    // Every answer on the probe address once the new one has taken it: whose, and what it says.
    await waitFor('the new nmi ready', async () => {
      const res = await request(`http://${fresh!.probe}/readyz`, { headersTimeout: 2_000, bodyTimeout: 2_000 }).catch(() => undefined);
      if (!res) return undefined;
      await res.body.dump();
      probes.push({ status: res.statusCode, pid: Number(res.headers['x-nmi-pid']) });
      return res.statusCode === 200 && Number(res.headers['x-nmi-pid']) === fresh!.child.pid ? true : undefined;
    });
    assert.equal(await old.stop('SIGTERM'), 0, old.output());
  });
  t.diagnostic(`${JSON.stringify(counts)}; longest wait ${longestMs} ms; probes ${JSON.stringify(probes.slice(0, 3))}…`);
  assert.equal(failures(counts), 0, JSON.stringify(counts));
  assert.deepEqual(jumpsSeen, [1]);
  assert.equal(comparableRules(nat()), comparableRules(rules));
  // Readiness stays truthful: once the new one has answered the probe address, only it answers there
  // (the kubelet's probes of both pods reach it), and it says 200 only once it is ready itself.
  const taken = probes.findIndex((p) => p.pid === fresh!.child.pid);
  assert.ok(taken >= 0 && probes.slice(taken).every((p) => p.pid === fresh!.child.pid), JSON.stringify(probes));
  assert.match(old.output(), /a new nmi took the listening sockets/);
  assert.match(old.output(), /rules left to the nmi taking over/);
  assert.match(old.output(), /leaving the rules and the listening sockets to the nmi that took over/);
  assert.match(fresh!.output(), /"result":"unchanged"[^\n]*"msg":"rules installed"/);
  assert.doesNotMatch(fresh!.output(), /did not release the rules/);
  assert.equal((await agent.http(STEADY_URL, { headers: { Metadata: 'true' } })).status, 200);
  assert.equal(await fresh!.stop('SIGTERM'), 0);
});

test('a second nmi run started by mistake beside a running one says so and exits 1, touching nothing', async () => {
  held.drop();
  const running = await start();
  const rules = nat();
  try {
    // Run to its end (the probe address answers 200 all along: the running one's).
    const second = nmi(['run', ...cluster.nmiFlags(), '--on-exit', 'keep']);
    assert.equal(second.code, 1, second.stderr);
    assert.match(second.stderr, new RegExp(`another nmi \\(pid ${running.child.pid}\\) already runs on this node: its probe answers on 127\\.0\\.0\\.1:8085; stop it first`));
    assert.equal(comparableRules(nat()), comparableRules(rules));
    assert.equal((await agent.http(STEADY_URL, { headers: { Metadata: 'true' } })).status, 200);
  } finally {
    await running.stop('SIGTERM');
  }
});

test('a listener handed over for another address (the flags changed) is dropped and the right one bound', async () => {
  // A store from another configuration: the token port elsewhere, and a name nmi does not use.
  held.drop();
  const native = addon();
  const elsewhere = native.listenTcp('127.0.0.1', 0, 16);
  const probe = native.listenTcp('127.0.0.1', 8085, 16);
  const stray = native.listenTcp('127.0.0.1', 0, 16);
  try {
    const nmi = await start({ listenFds: [{ name: 'token', fd: elsewhere }, { name: 'probe', fd: probe }, { name: 'stray', fd: stray }] });
    assert.match(nmi.output(), /"listener":"token","was":"127\.0\.0\.1:\d+","msg":"dropping an inherited listener"/);
    assert.match(nmi.output(), /"listener":"stray","msg":"dropping an inherited descriptor nmi has no use for"/);
    assert.match(nmi.output(), /"listener":"probe"[^\n]*taken over/);
    assert.equal((await agent.http(STEADY_URL, { headers: { Metadata: 'true' } })).status, 200);
    assert.equal(await nmi.stop('SIGTERM'), 0);
  } finally {
    for (const fd of [elsewhere, probe, stray]) native.closeFd(fd);
  }
});
