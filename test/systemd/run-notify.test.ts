// End to end: `nmi run` under a stand-in systemd. The test owns NOTIFY_SOCKET and
// asks for a watchdog; READY=1 must come only once the rules are in the node
// namespace and the kubelet has been read, then WATCHDOG=1 pings, then
// STOPPING=1 on SIGTERM, and every datagram from nmi's own pid (NotifyAccess=main).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createNode, type NodeNs } from '../harness/netns.js';
import { nmi, startNmi, type NmiProcess } from '../harness/nmi-process.js';
import { waitFor } from '../harness/wait-for.js';
import { startKubelet, type Kubelet } from '../standins/kubelet.js';
import { createPki, type Pki } from '../standins/pki.js';
import { isWatchdog, startReceiver, type Datagram, type Receiver } from './notify-receiver.js';

const isReady = (m: Datagram) => m.data.split('\n').includes('READY=1');
const isStopping = (m: Datagram) => m.data.split('\n').includes('STOPPING=1');

let node: NodeNs;
let pki: Pki;
let kubelet: Kubelet;
let dir: string;
let running: NmiProcess | undefined;
const receivers: Receiver[] = [];

before(async () => {
  node = createNode();
  pki = createPki();
  kubelet = await startKubelet({ pki });
  dir = mkdtempSync(path.join(tmpdir(), 'nmi-run-notify-'));
});

after(async () => {
  await running?.stop('SIGKILL');
  await Promise.all(receivers.map((r) => r.close()));
  await kubelet?.close();
  nmi(['cleanup']);
  node?.destroy();
  pki?.remove();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

function natRules(): string {
  return node.exec('iptables-save', ['-t', 'nat']);
}

/** What the world looked like when READY=1 was read. */
interface AtReady {
  chain: boolean;
  jump: boolean;
  kubeletCalls: number;
}

async function startUnderSystemd(name: string): Promise<{ receiver: Receiver; atReady: () => AtReady | undefined }> {
  // A test that failed half-way leaves its nmi holding the probe port.
  await running?.stop('SIGKILL');
  nmi(['cleanup']);
  const bindings = mkdtempSync(path.join(dir, `${name}-bindings-`));
  const receiver = await startReceiver(path.join(dir, `${name}.sock`));
  receivers.push(receiver);
  let atReady: AtReady | undefined;
  // Synchronous on the datagram being read: nmi cannot have installed anything "just after" it.
  receiver.onMessage = (m) => {
    if (!isReady(m) || atReady) return;
    const nat = natRules();
    atReady = { chain: /^:aad-metadata /m.test(nat), jump: /^-A PREROUTING -j aad-metadata$/m.test(nat), kubeletCalls: kubelet.calls };
  };
  running = await startNmi(
    [
      '--node-ip', node.nodeIp,
      '--rules', 'iptables',
      '--bindings', bindings,
      '--kubelet-url', kubelet.url.href,
      '--kubelet-ca', kubelet.caFile,
      '--kubelet-client-cert', kubelet.client.cert,
      '--kubelet-client-key', kubelet.client.key,
      '--kubelet-server-name', '127.0.0.1',
      '--pod-refresh-interval', '200ms',
      '--sync-interval', '200ms',
    ],
    // 400 ms watchdog: pings every 200 ms.
    { env: { ...process.env, NOTIFY_SOCKET: receiver.address, WATCHDOG_USEC: '400000' }, waitReady: false },
  );
  return { receiver, atReady: () => atReady };
}

test('nmi run: READY=1 after the rules and the first kubelet read, then WATCHDOG=1, then STOPPING=1 on SIGTERM', async () => {
  const { receiver, atReady } = await startUnderSystemd('happy');
  const nmiPid = running!.child.pid;
  const exited = () => running!.child.exitCode !== null;

  await receiver.until(() => `READY=1 from nmi\n${running!.output()}`, (m) => exited() || m.some(isReady), 20_000);
  assert.ok(!exited(), `nmi exited before READY=1: ${running!.output()}`);
  const seen = atReady();
  assert.ok(seen);
  assert.equal(seen.chain, true, 'chain aad-metadata in nat before READY=1');
  assert.equal(seen.jump, true, 'jump from PREROUTING before READY=1');
  assert.ok(seen.kubeletCalls >= 1, 'the kubelet was read before READY=1');

  const readyAt = receiver.messages.findIndex(isReady);
  await receiver.until('two WATCHDOG=1 after READY=1', (m) => m.slice(readyAt + 1).filter(isWatchdog).length >= 2);
  // The listeners went to the store first, one per datagram, each named, each the listening socket itself.
  const stored = receiver.messages.filter((m) => m.data.startsWith('FDSTORE=1'));
  assert.deepEqual(
    stored.map((m) => ({ data: m.data, fds: m.fds })),
    [
      { data: 'FDSTORE=1\nFDNAME=probe', fds: [{ address: running!.probe, listening: true }] },
      { data: 'FDSTORE=1\nFDNAME=token', fds: [{ address: `${node.nodeIp}:2579`, listening: true }] },
    ],
  );
  assert.ok(receiver.messages.indexOf(stored[1]!) < readyAt, 'stored before READY=1');

  const code = await running!.stop('SIGTERM');
  running = undefined;
  assert.equal(code, 0);
  const all = receiver.messages;
  const stoppingAt = all.findIndex(isStopping);
  assert.ok(stoppingAt > readyAt, `STOPPING=1 after READY=1: ${JSON.stringify(all.map((m) => m.data))}`);
  assert.equal(all.filter(isReady).length, 1, 'READY=1 sent once');
  assert.ok(all.every((m) => m.pid === nmiPid), `every datagram from nmi's main pid ${nmiPid}: ${all.map((m) => m.pid).join()}`);
  assert.doesNotMatch(natRules(), /aad-metadata/, '--on-exit remove took the rules out');
});

test('nmi run: no READY=1 while the kubelet answers errors (it waits, or exits non-zero for systemd to restart it)', async () => {
  kubelet.failWith(500);
  try {
    const { receiver } = await startUnderSystemd('kubelet-500');
    const calls = kubelet.calls;
    await waitFor(`nmi to retry or exit\n${running!.output()}`, () => running!.child.exitCode !== null || kubelet.calls >= calls + 2 || undefined, 20_000);
    assert.equal(receiver.messages.filter(isReady).length, 0, 'not READY before a successful first pod sync');
    if (running!.child.exitCode !== null) {
      assert.notEqual(running!.child.exitCode, 0, 'a failed start is not a clean exit (Restart=on-failure)');
      return;
    }
    kubelet.failWith(null);
    await receiver.until(() => `READY=1 after the kubelet recovers\n${running!.output()}`, (m) => m.some(isReady), 20_000);
  } finally {
    kubelet.failWith(null);
  }
  assert.equal(await running!.stop('SIGTERM'), 0);
  running = undefined;
});

// nmi.service is ordered Before=kubelet.service, so at boot nothing listens on the
// kubelet port yet: READY=1 must still come, or the kubelet would wait for nmi forever.
test('nmi run: READY=1 while the kubelet is not listening yet (boot order), then the kubelet is polled', async () => {
  await kubelet.stop();
  try {
    const { receiver, atReady } = await startUnderSystemd('kubelet-down');
    await receiver.until(() => `READY=1 with the kubelet down\n${running!.output()}`, (m) => running!.child.exitCode !== null || m.some(isReady), 20_000);
    assert.equal(running!.child.exitCode, null, running!.output());
    assert.equal(atReady()?.chain, true, 'rules installed before READY=1');
  } finally {
    await kubelet.start();
  }
  const calls = kubelet.calls;
  await waitFor('a kubelet poll once it listens', () => kubelet.calls > calls || undefined, 20_000);
  assert.equal(await running!.stop('SIGTERM'), 0);
  running = undefined;
});
