// The handoff socket (--handoff-socket, --take-over) between two nmi: each side
// takes the other's word only when the kernel says the other is root or its own
// uid (SO_PEERCRED), and a line that is no message (not JSON, the wrong shape, too
// long) is refused with a clear error, never a crash. The other side is a real
// process here: a fake predecessor in a child (takeOver blocks the event loop
// while it reads the offer), as nobody too when this test runs as root.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { chmodSync, chownSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { codes, isNmiError } from '../../src/errors/errors.js';
import { HandoffServer, MAX_LINE_BYTES, parseOffer, peerProblem, takeOver } from '../../src/lifecycle/handoff.js';
import { addon } from '../../src/native/addon.js';
import { captureLogs } from '../harness/log-capture.js';
import { projectRoot } from '../harness/netns.js';
import { waitFor } from '../harness/wait-for.js';
import { asUser, NOBODY } from '../harness/users.js';

const asRoot = process.getuid?.() === 0;
const asNobody = asUser(NOBODY);
const dir = mkdtempSync(path.join(tmpdir(), 'nmi-handoff-'));
// nobody's processes must reach the sockets here: the 0700 folder nmi makes is a test of its own.
chmodSync(dir, 0o755);
const children: ChildProcess[] = [];
after(() => {
  for (const c of children) c.kill('SIGKILL');
  rmSync(dir, { recursive: true, force: true });
});

let n = 0;
const socketPath = () => path.join(dir, `s${n++}.sock`);

/**
 * A fake predecessor in its own process: listens at `at`, sends `first` to whoever connects (with one listening
 * socket as SCM_RIGHTS when withFd), and `reply` once it is asked for the rules.
 */
async function fakePredecessor(at: string, first: string, options: { withFd?: boolean; reply?: string; prefix?: string[] } = {}): Promise<ChildProcess> {
  const script = `
    import net from 'node:net';
    import { chmodSync } from 'node:fs';
    import { addon } from ${JSON.stringify(path.join(projectRoot, 'dist/src/native/addon.js'))};
    const [at, first, withFd, reply] = JSON.parse(process.argv[1]);
    net.createServer((conn) => {
      conn.on('error', () => {});
      if (withFd) addon().sendFds(conn._handle.fd, first, [addon().listenTcp('127.0.0.1', 0, 4)]);
      else conn.write(first);
      conn.on('data', (d) => { if (String(d).includes('take-rules') && reply) conn.write(reply); });
    }).on('error', (err) => { console.error(err.message); process.exit(1); }).listen(at, () => { chmodSync(at, 0o777); console.log('listening'); });`;
  const command = [...(options.prefix ?? []), process.execPath, '--input-type=module', '-e', script, JSON.stringify([at, first, options.withFd ?? false, options.reply ?? ''])];
  const child = spawn(command[0]!, command.slice(1), { stdio: ['ignore', 'pipe', 'inherit'] });
  children.push(child);
  const [what] = await Promise.race([once(child.stdout!, 'data'), once(child, 'exit')]);
  assert.ok(Buffer.isBuffer(what), `the fake predecessor exited ${what}`);
  return child;
}

const offer = (names: string[]) => `${JSON.stringify({ type: 'listeners', pid: 4242, names })}\n`;

test('the peer rule: root or our own uid, nobody else', () => {
  assert.equal(peerProblem({ uid: 0, pid: 1 }, 1000), undefined);
  assert.equal(peerProblem({ uid: 1000, pid: 1 }, 1000), undefined);
  assert.match(peerProblem({ uid: 1001, pid: 77 }, 1000)!, /peer is uid 1001 \(pid 77\), neither root nor nmi's uid 1000/);
  assert.match(peerProblem(null, 0)!, /no peer/);
});

test('an offer must be exactly one: a known name per descriptor, a pid', () => {
  assert.deepEqual(parseOffer(offer(['token', 'probe']).trim(), 2), { type: 'listeners', pid: 4242, names: ['token', 'probe'] });
  assert.match(parseOffer('not json', 0) as string, /not JSON/);
  assert.match(parseOffer('[1,2]', 0) as string, /no message/);
  assert.match(parseOffer('{"type":7}', 0) as string, /no message/);
  assert.match(parseOffer('{"type":"take-rules"}', 0) as string, /expected a listener offer/);
  assert.match(parseOffer('{"type":"listeners","names":["token"]}', 1) as string, /no pid/);
  assert.match(parseOffer(offer(['token', 'evil']).trim(), 2) as string, /not distinct listener names/);
  assert.match(parseOffer(offer(['token', 'token']).trim(), 2) as string, /not distinct listener names/);
  assert.match(parseOffer(offer(['token']).trim(), 0) as string, /names 1 listeners and carries 0 descriptors/);
  assert.match(parseOffer(`{"type":"listeners","pad":"${'x'.repeat(MAX_LINE_BYTES)}"}`, 0) as string, /longer than 4096 bytes/);
});

for (const [what, first, why] of [
  ['not JSON', 'hello there\n', /it answered a line that is not JSON; refused/],
  ['the wrong shape', '{"type":"listeners","pid":"x","names":{}}\n', /it answered the offer names no pid; refused/],
  ['names without descriptors', offer(['token']), /names 1 listeners and carries 0 descriptors; refused/],
  ['an oversized line', `{"type":"listeners","pad":"${'x'.repeat(3 * MAX_LINE_BYTES)}"}\n`, /a line longer than 4096 bytes; refused/],
  ['no line at all', '{"type":', /no complete line; refused/],
] as const) {
  test(`--take-over refuses a predecessor that speaks ${what}, with an NMI_ERR_LISTEN line, and does not crash`, async () => {
    const at = socketPath();
    await fakePredecessor(at, first);
    assert.throws(() => takeOver(at, captureLogs().log, 2_000), (err) => {
      assert.ok(isNmiError(err, codes.LISTEN), String(err));
      assert.match(err.message, new RegExp(`^--take-over: ${at}: `));
      assert.match(err.message, why);
      return true;
    });
  });
}

test('a predecessor that takes the offer well, then answers the rules request with garbage: refused and logged, takeRules says no', async () => {
  const at = socketPath();
  await fakePredecessor(at, offer(['token']), { withFd: true, reply: '{"type":"rules-released"\n' });
  const { log, lines } = captureLogs();
  const predecessor = takeOver(at, log, 2_000)!;
  assert.equal(predecessor.pid, 4242);
  assert.equal(predecessor.listeners.get('token')?.length, 1);
  assert.equal(await predecessor.takeRules(2_000), false);
  assert.ok(lines().some((l) => /handoff: the running nmi sent a line that is not JSON; refused, connection dropped/.test(l.msg)), JSON.stringify(lines()));
  addon().closeFd(predecessor.listeners.get('token')![0]!);
});

test('a predecessor that answers the rules request with an endless line: refused once the line passes the bound', async () => {
  const at = socketPath();
  await fakePredecessor(at, offer(['token']), { withFd: true, reply: 'y'.repeat(4 * MAX_LINE_BYTES) });
  const { log, lines } = captureLogs();
  const predecessor = takeOver(at, log, 2_000)!;
  assert.equal(await predecessor.takeRules(2_000), false);
  assert.ok(lines().some((l) => /sent a line longer than 4096 bytes; refused/.test(l.msg)), JSON.stringify(lines()));
  addon().closeFd(predecessor.listeners.get('token')![0]!);
});

test('--take-over refuses a predecessor socket served by another uid (the kernel names it)', { skip: !asRoot && 'needs root to run the fake predecessor as nobody' }, async () => {
  // Its own folder: nobody binds the socket there.
  const own = path.join(dir, 'nobody');
  mkdirSync(own);
  chownSync(own, NOBODY, NOBODY);
  const at = path.join(own, 'predecessor.sock');
  await fakePredecessor(at, offer(['token']), { withFd: true, prefix: asNobody });
  assert.throws(() => takeOver(at, captureLogs().log, 2_000), (err) => {
    assert.ok(isNmiError(err, codes.LISTEN), String(err));
    assert.match(err.message, new RegExp(`its peer is uid ${NOBODY} \\(pid \\d+\\), neither root nor nmi's uid 0; refused`));
    return true;
  });
});

/** A running nmi's handoff server with one held listener; what it was told. */
async function handoffServer(at: string) {
  const { log, lines } = captureLogs();
  const fd = addon().listenTcp('127.0.0.1', 0, 4);
  const told: string[] = [];
  const server = await HandoffServer.listen(at, () => [{ name: 'token', fd, adopted: false }], {
    onSuccessor: () => told.push('successor'),
    onTakeRules: async () => void told.push('take-rules'),
    onSuccessorGone: () => told.push('gone'),
  }, log);
  return { server, lines, told, close: () => { server.close(); addon().closeFd(fd); } };
}

test('the running nmi drops a successor that sends garbage after the offer, says why, and keeps serving', async () => {
  const at = socketPath();
  const running = await handoffServer(at);
  try {
    const conn = net.connect(at);
    await once(conn, 'data');
    conn.write('{"type":"take-rules"]\n');
    await once(conn, 'close');
    await waitFor('the successor gone', () => (running.told.includes('gone') ? true : undefined), 2_000);
    assert.deepEqual(running.told, ['successor', 'gone']);
    assert.ok(running.lines().some((l) => /handoff: the nmi taking over sent a line that is not JSON; refused, connection dropped/.test(l.msg)), JSON.stringify(running.lines()));
  } finally {
    running.close();
  }
});

test('the running nmi hands nothing to a process of another uid', { skip: !asRoot && 'needs root to connect as nobody' }, async () => {
  const at = socketPath();
  const running = await handoffServer(at);
  try {
    // The socket is 0600 in a 0700 folder: opened up here so that the peer check is what refuses.
    chmodSync(path.dirname(at), 0o755);
    chmodSync(at, 0o777);
    const script = `const c = require('node:net').connect(process.argv[1]); let got = 0; c.on('data', (d) => (got += d.length)); c.on('error', () => {}); c.on('close', () => console.log(got));`;
    const child = spawn(asNobody[0]!, [...asNobody.slice(1), process.execPath, '-e', script, at], { stdio: ['ignore', 'pipe', 'inherit'] });
    children.push(child);
    const [out] = (await once(child.stdout!, 'data')) as [Buffer];
    assert.equal(String(out).trim(), '0', 'no byte, no descriptor');
    assert.deepEqual(running.told, []);
    assert.ok(running.lines().some((l) => l.msg === 'handoff refused' && new RegExp(`peer is uid ${NOBODY}`).test(String(l.reason))), JSON.stringify(running.lines()));
  } finally {
    running.close();
  }
});
