// SystemdNotifier against a real datagram socket (path and abstract), received by
// a python3 child standing in for systemd.
import { execFileSync } from 'node:child_process';
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { silentLogger, type Logger } from '../../src/log/logger.js';
import { SystemdNotifier } from '../../src/systemd/notify.js';
import { isWatchdog, startReceiver, type Datagram, type Receiver } from './notify-receiver.js';
import { captureLogs, type LogLine } from '../harness/log-capture.js';

const dir = mkdtempSync(path.join(tmpdir(), 'nmi-notify-'));
const receivers: Receiver[] = [];
const notifiers: SystemdNotifier[] = [];
let seq = 0;

after(async () => {
  notifiers.forEach((n) => n.close());
  await Promise.all(receivers.map((r) => r.close()));
  rmSync(dir, { recursive: true, force: true });
});

async function receiver(kind: 'path' | 'abstract' = 'path'): Promise<Receiver> {
  const name = `notify-${process.pid}-${seq++}`;
  const r = await startReceiver(kind === 'path' ? path.join(dir, `${name}.sock`) : `@nmi-test/${name}`);
  receivers.push(r);
  return r;
}

function notifier(env: NodeJS.ProcessEnv, log = silentLogger): SystemdNotifier {
  const n = SystemdNotifier.fromEnv(env, log);
  assert.ok(n, 'a notifier when NOTIFY_SOCKET is set');
  notifiers.push(n);
  return n;
}

/** A JSON logger whose lines the test can read. */
function capturingLogger(): { log: Logger; entries: () => LogLine[] } {
  const { log, lines } = captureLogs();
  return { log, entries: lines };
}

const data = (messages: Datagram[]) => messages.map((m) => m.data);

for (const kind of ['path', 'abstract'] as const) {
  test(`${kind} socket: status, ready and stopping arrive in order, from this process`, async () => {
    const r = await receiver(kind);
    const n = notifier({ NOTIFY_SOCKET: r.address });
    n.status('installing rules');
    n.ready('serving');
    n.stopping('draining');
    const got = await r.until('three messages', (m) => m.length >= 3);
    assert.deepEqual(data(got), ['STATUS=installing rules', 'READY=1\nSTATUS=serving', 'STOPPING=1\nSTATUS=draining']);
    // systemd drops messages from other pids under NotifyAccess=main.
    assert.ok(got.every((m) => m.pid === process.pid), `sender pid ${got.map((m) => m.pid).join()} is ${process.pid}`);
  });
}

test('a newline in a status cannot smuggle another assignment', async () => {
  const r = await receiver();
  const n = notifier({ NOTIFY_SOCKET: r.address });
  n.status('line one\nREADY=1');
  n.ready('a\r\nb');
  const got = await r.until('two messages', (m) => m.length >= 2);
  assert.deepEqual(data(got), ['STATUS=line one READY=1', 'READY=1\nSTATUS=a b']);
});

test('fromEnv: undefined without NOTIFY_SOCKET; the systemd variables are removed from the environment', () => {
  const env: NodeJS.ProcessEnv = { WATCHDOG_USEC: '1000000', WATCHDOG_PID: String(process.pid), PATH: '/usr/bin' };
  assert.equal(SystemdNotifier.fromEnv(env, silentLogger), undefined);
  assert.deepEqual(env, { PATH: '/usr/bin' });

  const withSocket: NodeJS.ProcessEnv = { NOTIFY_SOCKET: '/run/systemd/notify', WATCHDOG_USEC: '1000000', HOME: '/root' };
  const n = SystemdNotifier.fromEnv(withSocket, silentLogger);
  assert.equal(n?.socket, '/run/systemd/notify');
  assert.equal(n?.watchdogIntervalMs, 500);
  assert.deepEqual(withSocket, { HOME: '/root' }, 'children (iptables, conntrack) must not inherit them');
});

test('fromEnv: a socket that is neither a path nor abstract is refused with a warning', () => {
  const { log, entries } = capturingLogger();
  assert.equal(SystemdNotifier.fromEnv({ NOTIFY_SOCKET: 'relative.sock' }, log), undefined);
  assert.deepEqual(entries().map((e) => [e.level, e.socket]), [[40, 'relative.sock']]);
});

test('fromEnv: a malformed WATCHDOG_USEC disables pings with a warning', () => {
  for (const usec of ['0', '-5', '1e6', 'soon', '']) {
    const { log, entries } = capturingLogger();
    const n = SystemdNotifier.fromEnv({ NOTIFY_SOCKET: '/run/x', WATCHDOG_USEC: usec }, log);
    assert.equal(n?.watchdogIntervalMs, undefined, usec);
    assert.equal(entries().filter((e) => e.level === 40).length, usec === '' ? 0 : 1, usec);
  }
});

test('watchdog: WATCHDOG=1 at half of WATCHDOG_USEC, repeatedly, when WATCHDOG_PID is ours', async () => {
  const r = await receiver();
  const n = notifier({ NOTIFY_SOCKET: r.address, WATCHDOG_USEC: '40000', WATCHDOG_PID: String(process.pid) });
  assert.equal(n.watchdogIntervalMs, 20);
  n.startWatchdog();
  n.startWatchdog(); // a second call must not start a second timer
  const got = await r.until('five pings', (m) => m.filter(isWatchdog).length >= 5);
  assert.ok(got.every(isWatchdog));
});

test('watchdog: with WATCHDOG_PID unset the main process pings', async () => {
  const r = await receiver();
  const n = notifier({ NOTIFY_SOCKET: r.address, WATCHDOG_USEC: '40000' });
  n.startWatchdog();
  await r.until('three pings', (m) => m.filter(isWatchdog).length >= 3);
});

test('watchdog: a WATCHDOG_PID of another process means no pings', async () => {
  const r = await receiver();
  const n = notifier({ NOTIFY_SOCKET: r.address, WATCHDOG_USEC: '20000', WATCHDOG_PID: String(process.pid + 1) });
  assert.equal(n.watchdogIntervalMs, undefined);
  n.startWatchdog();
  await sleep(300); // at a 10 ms interval this would be many pings
  n.status('marker');
  const got = await r.until('the marker', (m) => m.some((x) => x.data === 'STATUS=marker'));
  assert.deepEqual(data(got), ['STATUS=marker']);
});

test('watchdog: close() stops the pings', async () => {
  const r = await receiver();
  const n = notifier({ NOTIFY_SOCKET: r.address, WATCHDOG_USEC: '20000' });
  n.startWatchdog();
  await r.until('a ping', (m) => m.some(isWatchdog));
  n.close();
  // Datagrams on one socket arrive in send order: nothing may come between the two markers.
  n.status('closed');
  await sleep(300);
  n.status('end');
  const got = data(await r.until('both markers', (m) => m.some((x) => x.data === 'STATUS=end')));
  assert.deepEqual(got.slice(got.indexOf('STATUS=closed')), ['STATUS=closed', 'STATUS=end']);
});

test('the watchdog timer does not keep the process alive', async () => {
  const r = await receiver();
  // A child process that starts a watchdog and does nothing else must exit by itself.
  const script = `
    const { SystemdNotifier } = await import(${JSON.stringify(new URL('../../src/systemd/notify.js', import.meta.url).href)});
    const { silentLogger } = await import(${JSON.stringify(new URL('../../src/log/logger.js', import.meta.url).href)});
    SystemdNotifier.fromEnv({ NOTIFY_SOCKET: ${JSON.stringify(r.address)}, WATCHDOG_USEC: '60000000' }, silentLogger).startWatchdog();
    console.log('started');`;
  const out = execFileSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8', timeout: 20_000 });
  assert.equal(out.trim(), 'started');
});

for (const [what, socketPath] of [
  ['a path nothing ever bound', () => path.join(dir, 'never-bound.sock')],
  ['a socket whose receiver has gone', async () => {
    const r = await receiver();
    await r.close();
    return r.address;
  }],
  ['an abstract name nothing listens on', () => `@nmi-test/nobody-${process.pid}`],
] as const) {
  test(`send failure (${what}): logged once as a warning, never thrown`, async () => {
    const { log, entries } = capturingLogger();
    const n = notifier({ NOTIFY_SOCKET: await socketPath(), WATCHDOG_USEC: '20000' }, log);
    n.status('installing rules');
    n.ready('serving');
    n.startWatchdog();
    await sleep(200);
    n.stopping('draining');
    n.close();
    const warnings = entries().filter((e) => e.level === 40);
    assert.equal(warnings.length, 1, JSON.stringify(entries()));
    assert.equal(warnings[0]!.message, 'STATUS=installing rules', 'the first failed message is named');
    assert.match(String(warnings[0]!.error), /refused|No such file/i);
  });
}
