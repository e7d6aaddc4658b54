// Runs in a pod's network namespace, started by test/harness/hostile.ts with one
// attack as its JSON argument: attacks nmi through 169.254.169.254, bounded in
// time and count, then prints one JSON line of what it saw and exits. Node's
// built-ins only, so it starts fast and measures nothing of the harness.
import { once } from 'node:events';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { setTimeout as sleep, setImmediate as yieldToLoop } from 'node:timers/promises';

const HOST = '169.254.169.254';
const PORT = 80;

/** (a) One keep-alive connection, token requests pipelined as fast as it takes them, nothing ever read. */
export interface UnreadAttack {
  kind: 'unread';
  target: string;
  durationMs: number;
}
/** (b), (c) `connections` keep-alive connections, each sending up to `perConnection` requests in turn (a new connection when nmi closes one). */
export interface RequestsAttack {
  kind: 'requests';
  connections: number;
  perConnection: number;
  /** Taken round and round. */
  requests: { method: string; target: string; bodyBytes: number }[];
  durationMs: number;
}
/** (d) `held` connections each asking once and kept open, then `extra` more, each read to its end. */
export interface ConnectionsAttack {
  kind: 'connections';
  target: string;
  held: number;
  extra: number;
  holdMs: number;
}
/** (e) A request with `Connection: close`, then more requests streamed behind it, 8 every 10 ms. */
export interface CloseThenStreamAttack {
  kind: 'close-then-stream';
  target: string;
  durationMs: number;
}
export type Attack = UnreadAttack | RequestsAttack | ConnectionsAttack | CloseThenStreamAttack;

export interface UnreadResult {
  requestsWritten: number;
  /** `deadline` (still open when the attack stopped), or how nmi ended it and when. */
  ending: string;
  endedAfterMs?: number;
}
export interface RequestsResult {
  /** `<status> <error>` (the IMDS-shaped body's `error`), or `error:<code>`. */
  counts: Record<string, number>;
  connectionsOpened: number;
}
export interface Exchange {
  status?: number;
  error?: string;
  retryAfter?: string;
  /** `end` (nmi closed it cleanly), `error:<code>` (a reset, mostly), `open` (not closed within 2 s). */
  ending: string;
}
export interface ConnectionsResult {
  /** The first `held` connections' answers, by status. */
  held: Record<string, number>;
  /** Of those, still open when the extra ones were tried. */
  heldOpen: number;
  extra: Exchange[];
  /** One more request once the held connections are closed. */
  afterRelease: Exchange;
}
export interface CloseThenStreamResult {
  statuses: number[];
  requestsWritten: number;
  ending: string;
  /** From the request to the connection's end; absent when it outlived the attack. */
  closedAfterMs?: number;
}
export type AttackResult = UnreadResult | RequestsResult | ConnectionsResult | CloseThenStreamResult;

function tokenRequest(target: string, connection: 'keep-alive' | 'close'): string {
  return `GET ${target} HTTP/1.1\r\nHost: ${HOST}\r\nMetadata: true\r\nConnection: ${connection}\r\n\r\n`;
}

/** The same request repeated to about 64 KiB: one write() sends many. */
function pipelined(request: string): { chunk: Buffer; requestBytes: number } {
  return { chunk: Buffer.from(request.repeat(Math.ceil(65536 / request.length))), requestBytes: request.length };
}

/** Requests the kernel took from `socket` (node's bytesWritten counts what it still buffers too). */
function requestsSent(socket: net.Socket, requestBytes: number): number {
  return Math.floor((socket.bytesWritten - socket.writableLength) / requestBytes);
}

/** How a socket first ended (`end`: nmi closed it cleanly; `error:<code>`: a reset, mostly; `closed`), and when. */
function watchEnd(socket: net.Socket): { how?: string; at?: number } {
  const seen: { how?: string; at?: number } = {};
  const ended = (how: string) => {
    if (seen.how !== undefined) return;
    seen.how = how;
    seen.at = Date.now();
  };
  socket.on('end', () => ended('end'));
  socket.on('error', (err) => ended(code(err)));
  socket.on('close', () => ended('closed'));
  return seen;
}

/** Resolves once `socket` takes more, has ended, or after `ms`; never rejects (watchEnd records an error). */
function writable(socket: net.Socket, ms: number): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      socket.off('drain', done).off('close', done).off('error', done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    socket.on('drain', done).on('close', done).on('error', done);
  });
}

function code(err: unknown): string {
  return `error:${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`;
}

interface Answer {
  status: number;
  headers: Record<string, string>;
  body: string;
}

/** Splits what a connection receives into answers (nmi's own all carry Content-Length). */
class AnswerReader {
  #buf = Buffer.alloc(0);

  push(chunk: Buffer): Answer[] {
    this.#buf = Buffer.concat([this.#buf, chunk]);
    const answers: Answer[] = [];
    for (;;) {
      const end = this.#buf.indexOf('\r\n\r\n');
      if (end < 0) return answers;
      const [statusLine = '', ...lines] = this.#buf.subarray(0, end).toString('latin1').split('\r\n');
      const headers = Object.fromEntries(lines.map((l) => [l.slice(0, l.indexOf(':')).trim().toLowerCase(), l.slice(l.indexOf(':') + 1).trim()]));
      const length = Number(headers['content-length'] ?? 0);
      if (this.#buf.length < end + 4 + length) return answers;
      answers.push({ status: Number(statusLine.split(' ')[1]), headers, body: this.#buf.subarray(end + 4, end + 4 + length).toString() });
      this.#buf = this.#buf.subarray(end + 4 + length);
    }
  }
}

/** A small receive buffer for this namespace's new sockets: nmi's answers back up after a few KiB instead of megabytes. */
function smallReceiveBuffer(): void {
  // /proc/sys/net is the writer's network namespace's: only ever the pod's it was started in.
  const self = statSync('/proc/self/ns/net');
  const pod = statSync(`/run/netns/${netns}`);
  if (self.ino !== pod.ino || self.dev !== pod.dev) throw new Error(`hostile-client: not in namespace ${netns}`);
  writeFileSync('/proc/sys/net/ipv4/tcp_rmem', '4096 4096 4096');
  if (!readFileSync('/proc/sys/net/ipv4/tcp_rmem', 'utf8').startsWith('4096\t4096\t4096')) throw new Error('hostile-client: tcp_rmem not set');
}

async function unread(a: UnreadAttack): Promise<UnreadResult> {
  smallReceiveBuffer();
  const { chunk, requestBytes } = pipelined(tokenRequest(a.target, 'keep-alive'));
  const socket = net.connect(PORT, HOST);
  // Paused, node reads no more than its 16 KiB high-water mark: the rest stays with nmi.
  socket.pause();
  await once(socket, 'connect');
  const started = Date.now();
  const end = watchEnd(socket);
  while (end.how === undefined && Date.now() - started < a.durationMs) {
    if (!socket.write(chunk)) await writable(socket, 200);
    await yieldToLoop();
  }
  const requestsWritten = requestsSent(socket, requestBytes);
  socket.destroy();
  return { requestsWritten, ending: end.how ?? 'deadline', ...(end.at === undefined ? {} : { endedAfterMs: end.at - started }) };
}

async function requests(a: RequestsAttack): Promise<RequestsResult> {
  const agent = new http.Agent({ keepAlive: true, maxSockets: a.connections });
  const sockets = new Set<net.Socket>();
  const bodies = new Map<number, Buffer>();
  const counts: Record<string, number> = {};
  const deadline = Date.now() + a.durationMs;
  const one = (r: RequestsAttack['requests'][number]) =>
    new Promise<string>((resolve) => {
      const body = bodies.get(r.bodyBytes) ?? Buffer.alloc(r.bodyBytes, 'x');
      bodies.set(r.bodyBytes, body);
      const headers = { Metadata: 'true', ...(r.bodyBytes > 0 ? { 'Content-Length': String(r.bodyBytes), 'Content-Type': 'application/json' } : {}) };
      const req = http.request({ host: HOST, port: PORT, method: r.method, path: r.target, headers, agent, timeout: 10_000 }, (res) => {
        let text = '';
        res.setEncoding('utf8').on('data', (d: string) => (text += d));
        res.on('end', () => {
          let error = '';
          try {
            error = String((JSON.parse(text) as { error?: unknown }).error ?? '');
          } catch {
            // not IMDS-shaped: the status says enough
          }
          resolve(`${res.statusCode} ${error}`.trim());
        });
        res.on('error', (err) => resolve(code(err)));
      });
      req.on('socket', (s) => sockets.add(s));
      req.on('timeout', () => req.destroy(new Error('timeout')));
      // A write error after the answer (nmi closed without reading the body) changes nothing: resolved already.
      req.on('error', (err) => resolve(code(err)));
      req.end(body);
    });
  const worker = async (w: number) => {
    for (let i = 0; i < a.perConnection && Date.now() < deadline; i++) {
      const key = await one(a.requests[(w * a.perConnection + i) % a.requests.length]!);
      counts[key] = (counts[key] ?? 0) + 1;
    }
  };
  await Promise.all(Array.from({ length: a.connections }, (_, w) => worker(w)));
  agent.destroy();
  return { counts, connectionsOpened: sockets.size };
}

/** Connects, sends `request`, and reads the first answer; with `toEnd`, also waits (2 s at most) for nmi to close. */
function exchange(request: string, toEnd: boolean): Promise<{ socket: net.Socket; result: Exchange }> {
  return new Promise((resolve) => {
    const socket = net.connect(PORT, HOST, () => socket.write(request));
    const reader = new AnswerReader();
    const result: Exchange = { ending: 'open' };
    let timer: NodeJS.Timeout | undefined;
    const done = () => {
      clearTimeout(timer);
      socket.removeAllListeners('data').removeAllListeners('end').removeAllListeners('error');
      socket.on('error', () => {}); // a held socket's later reset is not this exchange's
      resolve({ socket, result });
    };
    timer = setTimeout(done, toEnd ? 5_000 : 10_000);
    socket.on('data', (chunk: Buffer) => {
      const [answer] = reader.push(chunk);
      if (!answer || result.status !== undefined) return;
      result.status = answer.status;
      result.retryAfter = answer.headers['retry-after'];
      try {
        result.error = String((JSON.parse(answer.body) as { error?: unknown }).error ?? '');
      } catch {
        result.error = answer.body.slice(0, 80);
      }
      if (!toEnd) return done();
      clearTimeout(timer);
      timer = setTimeout(done, 2_000);
    });
    socket.on('end', () => {
      result.ending = 'end';
      done();
    });
    socket.on('error', (err) => {
      result.ending = code(err);
      done();
    });
  });
}

async function connections(a: ConnectionsAttack): Promise<ConnectionsResult> {
  const request = tokenRequest(a.target, 'keep-alive');
  const started = Date.now();
  const held = await Promise.all(Array.from({ length: a.held }, () => exchange(request, false)));
  const open = new Set(held.map((h) => h.socket));
  for (const { socket } of held) socket.on('close', () => open.delete(socket));
  const heldOpen = open.size;
  const extra: Exchange[] = [];
  for (let i = 0; i < a.extra; i++) {
    const { socket, result } = await exchange(request, true);
    socket.destroy();
    extra.push(result);
  }
  await sleep(Math.max(0, a.holdMs - (Date.now() - started)));
  const counts: Record<string, number> = {};
  for (const { socket, result } of held) {
    const key = result.status === undefined ? result.ending : String(result.status);
    counts[key] = (counts[key] ?? 0) + 1;
    socket.destroy();
  }
  await sleep(200); // nmi sees the closes before the next connection
  const after = await exchange(request, false);
  after.socket.destroy();
  return { held: counts, heldOpen, extra, afterRelease: after.result };
}

async function closeThenStream(a: CloseThenStreamAttack): Promise<CloseThenStreamResult> {
  const request = tokenRequest(a.target, 'keep-alive');
  // Paced, not flooded: a write in the instant between nmi's answer and its close would
  // fail and make node drop the answer unread, whatever nmi did.
  const chunk = Buffer.from(request.repeat(8));
  const socket = net.connect(PORT, HOST);
  await once(socket, 'connect');
  const started = Date.now();
  const reader = new AnswerReader();
  const statuses: number[] = [];
  socket.on('data', (data: Buffer) => statuses.push(...reader.push(data).map((answer) => answer.status)));
  const end = watchEnd(socket);
  socket.write(tokenRequest(a.target, 'close'));
  while (end.how === undefined && Date.now() - started < a.durationMs) {
    // What a pod that ignores its own Connection: close would go on sending.
    socket.write(chunk);
    await sleep(10);
  }
  const requestsWritten = requestsSent(socket, request.length);
  socket.destroy();
  return { statuses, requestsWritten, ending: end.how ?? 'deadline', ...(end.at === undefined ? {} : { closedAfterMs: end.at - started }) };
}

const attack = JSON.parse(process.argv[2] ?? '{}') as Attack;
/** The namespace `ip netns exec` put this process in. */
const netns = process.argv[3] ?? '';
const run = { unread, requests, connections, 'close-then-stream': closeThenStream }[attack.kind] as (a: Attack) => Promise<AttackResult>;
process.stdout.write(`${JSON.stringify(await run(attack))}\n`);
process.exit(0);
