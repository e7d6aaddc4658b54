// The js token server against hostile callers, over raw sockets: bodies refused
// before they are read, connections capped per source and in all (answered and
// closed, never reset), the requests deferred to the main thread bounded, what follows
// a Connection: close dropped without losing the answers before it, and a
// connection whose output never drains cut. The bounds are shortened through
// createTokenServer's `bounds` so each attack stays small and quick.
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { once } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';
import { problems } from '../../src/server/answers.js';
import type { ServerBounds } from '../../src/config/limits.js';
import { limits } from '../../src/config/limits.js';
import type { Token } from '../../src/tokens/token.js';
import { createTokenServer, type TokenServer } from '../../src/server/token-server.js';
import { FIXED_REPLY, startImds, type ImdsStandin } from '../standins/imds.js';
import { assertProblem, idA, newWorld, parseAnswer, pod, QUERY, TOKEN, tokenFor, worldDeps, type RawAnswer, type World } from './token-world.js';

let upstream: ImdsStandin;
let world: World;
const servers: TokenServer[] = [];

before(async () => {
  upstream = await startImds({ reply: FIXED_REPLY });
});
after(async () => {
  for (const s of servers) await s.close(1_000);
  await upstream.close();
});

/** A server of its own, in a new world, with the bounds given. */
async function start(bounds: Partial<ServerBounds> = {}): Promise<number> {
  world = newWorld();
  upstream.requests = [];
  const server = createTokenServer(worldDeps(() => world, new URL(upstream.url)), { bounds });
  await server.listen('127.0.0.1', 0);
  servers.push(server);
  return server.port!;
}

const tokenRequest = (extra = '') => `GET ${TOKEN}?${QUERY} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n${extra}\r\n`;

function assertRefused(answer: RawAnswer, problem: { status: number; error: string; error_description: string; retryAfter?: number }, connection: string): void {
  assertProblem(answer, problem.status, problem.error, problem.error_description);
  assert.equal(answer.headers['retry-after'], problem.retryAfter === undefined ? undefined : String(problem.retryAfter));
  assert.equal(answer.headers['connection'], connection);
}

/** A connection written to byte for byte; what comes back is split into answers (nmi's all carry Content-Length). */
interface Raw {
  socket: net.Socket;
  write(text: string): void;
  /** The answers in so far. */
  received(): RawAnswer[];
  /** The first `count` answers; fails when they are not all in within `ms`. */
  answers(count: number, ms?: number): Promise<RawAnswer[]>;
  /** How it ended: `end` (the server's FIN), `error:<code>` (a reset), `closed`; `open` when still open after `ms`. */
  ending(ms?: number): Promise<string>;
}

async function connect(port: number, localAddress = '127.0.0.1'): Promise<Raw> {
  const socket = net.connect({ port, host: '127.0.0.1', localAddress });
  let received = Buffer.alloc(0);
  const answers: RawAnswer[] = [];
  let how: string | undefined;
  socket.on('data', (chunk: Buffer) => {
    received = Buffer.concat([received, chunk]);
    for (;;) {
      const end = received.indexOf('\r\n\r\n');
      if (end < 0) return;
      const length = Number(/\r\ncontent-length: *(\d+)/i.exec(received.subarray(0, end).toString('latin1'))?.[1] ?? 0);
      if (received.length < end + 4 + length) return;
      answers.push(parseAnswer(received.subarray(0, end + 4 + length).toString('latin1')));
      received = received.subarray(end + 4 + length);
    }
  });
  socket.on('end', () => (how ??= 'end'));
  socket.on('error', (err: NodeJS.ErrnoException) => (how ??= `error:${err.code}`));
  socket.on('close', () => (how ??= 'closed'));
  await once(socket, 'connect');
  return {
    socket,
    write: (text) => void socket.write(text),
    received: () => [...answers],
    async answers(count, ms = 3_000) {
      await until(() => answers.length >= count || how !== undefined, ms);
      assert.ok(answers.length >= count, `${answers.length} of ${count} answers in ${ms} ms (${how ?? 'open'}): ${JSON.stringify(answers)}`);
      return answers.slice(0, count);
    },
    async ending(ms = 3_000) {
      await until(() => how !== undefined, ms);
      return how ?? 'open';
    },
  };
}

async function until(done: () => boolean, ms: number): Promise<void> {
  for (const deadline = Date.now() + ms; !done() && Date.now() < deadline; ) await sleep(5);
}

/** One request on a new connection, its answer. */
async function ask(port: number, request = tokenRequest(), localAddress?: string): Promise<RawAnswer> {
  const raw = await connect(port, localAddress);
  raw.write(request);
  const [answer] = await raw.answers(1);
  raw.socket.destroy();
  return answer!;
}

/** Connects again and again until `count` connections are served and kept, as places free up; how many were. */
async function servedAgain(port: number, count: number): Promise<number> {
  let served = 0;
  for (let tries = 0; served < count && tries < 200; tries++) {
    const raw = await connect(port);
    raw.write(tokenRequest());
    if ((await raw.answers(1))[0]!.status === 200) served++;
    else await sleep(10);
  }
  return served;
}

/** Those of `raws` with an answer, once `count` have one and a moment later, for any beyond. */
async function answeredOf(raws: Raw[], count: number): Promise<Raw[]> {
  const answered = () => raws.filter((raw) => raw.received().length > 0);
  await until(() => answered().length >= count, 3_000);
  await sleep(100);
  return answered();
}

/** getToken held until release() is called. */
function holdTokens(): { release(): void } {
  let release!: () => void;
  const held = new Promise<void>((resolve) => (release = resolve));
  world.getToken = async (id, resource) => {
    await held;
    return tokenFor(id, resource);
  };
  return { release };
}

test('a body on the token path, or on any GET, is answered 400 before it is sent, and the connection closed', async () => {
  const port = await start();
  const cases = [
    `GET ${TOKEN}?${QUERY} HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nContent-Length: 10000000\r\n\r\n`,
    `POST ${TOKEN}?${QUERY} HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nTransfer-Encoding: chunked\r\n\r\n`,
    'GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nContent-Length: 5\r\n\r\n',
    'GET /nowhere HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n',
  ];
  for (const request of cases) {
    const raw = await connect(port);
    raw.write(request);
    const [answer] = await raw.answers(1);
    assertRefused(answer!, problems.bodyNotAllowed, 'close');
    assert.equal(await raw.ending(), 'end', request);
  }
  assert.deepEqual(world.lookups, []);
  assert.deepEqual(upstream.requests, []);
  // A declared empty body is no body.
  assert.equal((await ask(port, tokenRequest('Content-Length: 0\r\n'))).status, 200);
});

test('a proxied body declared past maxBodyBytes is 413 at once; a chunked one as soon as it passes it; one within it goes through', async () => {
  const port = await start();
  const head = 'POST /metadata/scheduledevents?api-version=2020-07-01 HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nContent-Type: application/json\r\n';
  const declared = await connect(port);
  declared.write(`${head}Content-Length: ${1024 * 1024}\r\n\r\n`);
  const [tooLarge] = await declared.answers(1);
  assertRefused(tooLarge!, problems.bodyTooLarge, 'close');
  assert.equal(await declared.ending(), 'end');

  const chunked = await connect(port);
  chunked.write(`${head}Transfer-Encoding: chunked\r\n\r\n`);
  const chunk = 'x'.repeat(4096);
  for (let sent = 0; sent <= limits.maxBodyBytes; sent += chunk.length) chunked.write(`1000\r\n${chunk}\r\n`);
  // No last chunk: the answer comes while the body is still open.
  const [chunkedTooLarge] = await chunked.answers(1);
  assertRefused(chunkedTooLarge!, problems.bodyTooLarge, 'close');
  chunked.socket.destroy();
  assert.equal(upstream.requests.length, 0);

  const body = 'y'.repeat(limits.maxBodyBytes);
  assert.equal((await ask(port, `${head}Content-Length: ${body.length}\r\n\r\n${body}`)).status, 200);
  assert.equal(upstream.requests[0]?.body, body);
});

test('past maxConnectionsPerSource a connection is answered 429 and closed, not reset; other connections and sources are served; closing frees the places', async () => {
  const port = await start({ maxConnectionsPerSource: 3 });
  world.pods.set('127.0.0.2', { ...pod, uid: 'u2', name: 'other', ips: ['127.0.0.2'] });
  const held = await Promise.all([1, 2, 3].map(() => connect(port)));
  for (const raw of held) raw.write(tokenRequest());
  for (const raw of held) assert.equal((await raw.answers(1))[0]!.status, 200);

  // One reads the refusal before sending anything, one sends its request first.
  for (const sendsFirst of [false, true]) {
    const over = await connect(port);
    if (sendsFirst) over.write(tokenRequest());
    const [answer] = await over.answers(1);
    assertRefused(answer!, problems.tooManyConnections, 'close');
    assert.equal(await over.ending(), 'end');
  }

  held[0]!.write(tokenRequest());
  const [, again] = await held[0]!.answers(2);
  assert.equal(again!.status, 200, 'a held connection is still served');
  assert.equal((await ask(port, tokenRequest(), '127.0.0.2')).status, 200, 'another source is served');

  // A clean close and a reset each give a place back.
  held[0]!.socket.end();
  held[1]!.socket.resetAndDestroy();
  assert.equal(await servedAgain(port, 2), 2, 'two new connections of that source are accepted once two closed');
});

test('past maxConnections in all a connection is answered 503 and closed, not reset', async () => {
  const port = await start({ maxConnections: 2 });
  const held = [await connect(port, '127.0.0.1'), await connect(port, '127.0.0.2')];
  for (const raw of held) raw.write(tokenRequest());
  for (const raw of held) await raw.answers(1);
  const over = await connect(port, '127.0.0.3');
  const [answer] = await over.answers(1);
  assertRefused(answer!, problems.busy, 'close');
  assert.equal(await over.ending(), 'end');
  held[0]!.socket.destroy();
  assert.equal(await servedAgain(port, 1), 1, 'a place freed is taken again');
});

test('past maxDeferredRequests waiting on the main thread, requests are answered 503 at once and the connection kept', async () => {
  const port = await start({ maxDeferredRequests: 4 });
  const gate = holdTokens();
  const raws = await Promise.all(Array.from({ length: 10 }, () => connect(port)));
  for (const raw of raws) raw.write(tokenRequest());
  const refused = await answeredOf(raws, 6);
  assert.equal(refused.length, 6, 'all but the 4 waiting are answered');
  for (const raw of refused) assertRefused(raw.received()[0]!, problems.busy, 'keep-alive');
  gate.release();
  for (const raw of raws.filter((r) => !refused.includes(r))) assert.equal((await raw.answers(1))[0]!.status, 200);
  // Answered, they no longer count: a refused connection is served on its next request.
  const retried = refused[0]!;
  retried.write(tokenRequest());
  assert.equal((await retried.answers(2))[1]!.status, 200);

  // Nor do those of a connection gone before they were answered: here one queued behind another, its body half sent.
  const again = holdTokens();
  const leaving = await connect(port);
  leaving.write(`${tokenRequest()}POST /metadata/scheduledevents?api-version=2020-07-01 HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nContent-Length: 100\r\n\r\nabc`);
  await sleep(100);
  leaving.socket.destroy();
  await sleep(100);
  again.release();
  holdTokens();
  const fresh = await Promise.all(Array.from({ length: 5 }, () => connect(port)));
  for (const raw of fresh) raw.write(tokenRequest());
  assert.equal((await answeredOf(fresh, 1)).length, 1, 'all 4 places are free again');
});

test('past maxDeferredBytes, in all or on one connection, requests are answered 503', async () => {
  const pad = `X-Pad: ${'p'.repeat(500)}\r\n`;
  const all = await start({ maxDeferredBytes: 2_000 });
  let gate = holdTokens();
  const raws = await Promise.all(Array.from({ length: 6 }, () => connect(all)));
  for (const raw of raws) raw.write(tokenRequest(pad));
  const refused = await answeredOf(raws, 3);
  assert.ok(refused.length >= 3 && refused.length < 6, `${refused.length} of 6 answered 503 at once`);
  for (const raw of refused) assertRefused(raw.received()[0]!, problems.busy, 'keep-alive');
  gate.release();

  const one = await start({ maxDeferredBytesPerConnection: 2_000 });
  gate = holdTokens();
  const pipelining = await connect(one);
  pipelining.write(tokenRequest(pad).repeat(6));
  const other = await connect(one);
  other.write(tokenRequest(pad));
  // Three of the pipelined ones fit in the bound, and the other connection's.
  await until(() => world.tokenCalls.length >= 4, 3_000);
  gate.release();
  const statuses = (await pipelining.answers(6)).map((a) => a.status);
  assert.ok(statuses.includes(200) && statuses.at(-1) === 503, `in order: ${statuses.join(' ')}`);
  assert.equal((await other.answers(1))[0]!.status, 200, 'another connection is not held to that one\'s bound');
});

test('a caller streaming on after its Connection: close request gets the answers up to it, then the connection ends', async () => {
  const port = await start();
  const gate = holdTokens();
  const raw = await connect(port);
  raw.write(tokenRequest() + tokenRequest('Connection: close\r\n'));
  const streaming = setInterval(() => raw.write(tokenRequest().repeat(100)), 10);
  await sleep(200);
  gate.release();
  const ending = await raw.ending();
  clearInterval(streaming);
  assert.deepEqual(raw.received().map((a) => a.status), [200, 200]);
  assert.notEqual(ending, 'open');
});

test('a connection pipelining 2,000 requests and reading nothing is closed once its output stops draining, holding bounded memory; a slow upstream is not a stall', async (t) => {
  const writeTimeoutMs = 500;
  const port = await start({ writeTimeoutMs, maxDeferredRequests: 64 });
  // 128 KiB answers: the 64 waiting on the main thread alone pass what the kernel buffers.
  const big: Token = { ...tokenFor(idA, 'https://vault.azure.net'), accessToken: 'x'.repeat(128 * 1024) };
  world.getToken = async () => big;

  // A request waiting on a slow getToken has no output pending: it is answered, however long past the write timeout.
  const slow = holdTokens();
  const waiting = await connect(port);
  waiting.write(tokenRequest());
  await sleep(writeTimeoutMs * 3);
  slow.release();
  assert.equal((await waiting.answers(1))[0]!.status, 200);
  waiting.socket.destroy();

  world.getToken = async () => big;
  const rssBefore = process.memoryUsage().rss;
  let rssPeak = rssBefore;
  const sampling = setInterval(() => (rssPeak = Math.max(rssPeak, process.memoryUsage().rss)), 20);
  const reader = await connect(port);
  // Paused, the client reads no more than its high-water mark: the rest stays with the server.
  reader.socket.pause();
  const sentAt = Date.now();
  reader.write(tokenRequest().repeat(2_000));
  // Never reading, it learns of the close only by writing on.
  const writing = setInterval(() => reader.write(tokenRequest()), 50);
  const ending = await reader.ending(writeTimeoutMs + 4_000);
  const closedAfterMs = Date.now() - sentAt;
  clearInterval(writing);
  clearInterval(sampling);
  assert.notEqual(ending, 'open', 'the connection is closed');
  assert.ok(closedAfterMs >= writeTimeoutMs, `closed ${closedAfterMs} ms after the requests, not before the write timeout`);
  const grownMiB = (rssPeak - rssBefore) / 2 ** 20;
  t.diagnostic(`${ending} after ${closedAfterMs} ms; RSS grew ${grownMiB.toFixed(1)} MiB`);
  assert.ok(grownMiB < 100, `RSS grew ${grownMiB.toFixed(1)} MiB (2,000 answers unbounded: 256 MiB)`);
  // Everything it held is given back: the server answers as before.
  assert.equal((await ask(port)).status, 200);
});
