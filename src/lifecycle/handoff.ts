// A planned handoff between two nmi on one node: a DaemonSet's rolling update
// with maxSurge starts the new pod while the old one still runs. The new one
// (--take-over) connects to the running one's handoff socket and receives its
// listening sockets, the very same kernel sockets: both accept from the token
// port's one queue while both run, so no connection is refused or dropped
// when the old one closes its descriptors. Then, in this order:
//   1. the old one stops answering the probe address: from now on every probe,
//      the new pod's as the old pod's, is answered by the new process, so the
//      new pod is not reported ready before it is;
//   2. once it serves, the new one asks for the rules: the old one stops its
//      repair loop and says so, and only then does the new one verify and keep
//      them (one keeper at any time: nothing rewritten, no flapping);
//   3. the old one, stopped, leaves the rules to its successor.
// If the new one goes away first, the old one answers the probe and keeps the
// rules again.
//
// Messages are JSON lines; the first, from the old one, carries the
// descriptors (SCM_RIGHTS). Each side checks the other's peer credentials
// (SO_PEERCRED): root or this process's own uid, nobody else (the socket is also
// 0600 in a 0700 folder). A line that is not one of the messages below, or longer
// than MAX_LINE_BYTES, is refused: the connection is dropped and the log says why.
import { once } from 'node:events';
import { mkdir, rename, rm } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { codes, NmiError, messageOf } from '../errors/errors.js';
import type { Logger } from '../log/logger.js';
import { addon } from '../native/addon.js';
import { isRootOrSelf } from '../util/trusted-uid.js';
import type { HeldListener, ListenerName } from './listeners.js';

interface Offer {
  type: 'listeners';
  pid: number;
  names: ListenerName[];
}
type Control = { type: 'take-rules' } | { type: 'rules-released' };
type Message = Offer | Control;

/** The longest line either side sends is an offer of four names: far below this. Also what receiveFds reads at once. */
export const MAX_LINE_BYTES = 4096;
const LISTENER_NAMES: readonly ListenerName[] = ['token', 'probe', 'host-token', 'host-token-tcp'];

/** Who may be at the other end: root, or a process of this one's uid (an nmi run as a user in tests). */
export function peerProblem(peer: { uid: number; pid: number } | null, ownUid = process.geteuid?.() ?? 0): string | undefined {
  if (!peer) return 'the kernel names no peer';
  if (isRootOrSelf(peer.uid, ownUid)) return undefined;
  return `its peer is uid ${peer.uid} (pid ${peer.pid}), neither root nor nmi's uid ${ownUid}`;
}

/** The offer a line holds, or why it is none. */
export function parseOffer(line: string, fds: number): Offer | string {
  const message = parseLine(line);
  if (typeof message === 'string') return message;
  if (message.type !== 'listeners') return `expected a listener offer, got ${JSON.stringify(String(message.type)).slice(0, 40)}`;
  const { pid, names } = message as Partial<Offer>;
  if (!Number.isSafeInteger(pid) || pid! <= 0) return 'the offer names no pid';
  if (!Array.isArray(names) || names.some((n) => !LISTENER_NAMES.includes(n)) || new Set(names).size !== names.length) {
    return `the offer's names are not distinct listener names (${LISTENER_NAMES.join(', ')})`;
  }
  if (names.length !== fds) return `the offer names ${names.length} listeners and carries ${fds} descriptors`;
  return { type: 'listeners', pid: pid!, names };
}

/** One JSON message with a string type, or why the line is none; never throws. */
function parseLine(line: string): { type: unknown } | string {
  if (Buffer.byteLength(line) > MAX_LINE_BYTES) return `a line longer than ${MAX_LINE_BYTES} bytes`;
  let value: unknown;
  try {
    value = JSON.parse(line);
  } catch {
    return 'a line that is not JSON';
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value) || typeof (value as { type?: unknown }).type !== 'string') {
    return 'a JSON line that is no message (an object with a type)';
  }
  return value as { type: unknown };
}

/**
 * Calls onMessage with each control message the peer sends; the first line that is none (not JSON, another
 * type, longer than MAX_LINE_BYTES) calls onRefused with why, once, and ends the connection.
 */
function readControl(conn: net.Socket, expected: Control['type'], onMessage: () => void, onRefused: (why: string) => void): void {
  let buffered = '';
  conn.setEncoding('utf8');
  conn.on('data', (chunk: string) => {
    buffered += chunk;
    let end: number;
    while ((end = buffered.indexOf('\n')) >= 0) {
      const line = buffered.slice(0, end);
      buffered = buffered.slice(end + 1);
      const message = parseLine(line);
      const why = typeof message === 'string' ? message : message.type === expected ? undefined : `an unexpected ${JSON.stringify(message.type).slice(0, 40)} message`;
      if (why === undefined) {
        onMessage();
        continue;
      }
      onRefused(why);
      conn.destroy();
      return;
    }
    if (Buffer.byteLength(buffered) > MAX_LINE_BYTES) {
      onRefused(`a line longer than ${MAX_LINE_BYTES} bytes`);
      conn.destroy();
    }
  });
}

/** The running nmi, as its successor sees it. */
export interface Predecessor {
  pid: number;
  /** Its listeners, to adopt (src/lifecycle/listeners.ts). */
  listeners: Map<string, number[]>;
  /** Asks it to stop keeping the rules; resolves when it has, or after timeoutMs (it may have gone). */
  takeRules(timeoutMs: number): Promise<boolean>;
}

/** Connects to the nmi serving the handoff socket and takes its listeners; undefined when none runs there. */
export function takeOver(socketPath: string, log: Logger, timeoutMs = 5_000): Predecessor | undefined {
  const native = addon();
  let received: ReturnType<typeof native.receiveFds>;
  try {
    received = native.receiveFds(socketPath, timeoutMs);
  } catch (err) {
    throw new NmiError(codes.LISTEN, `--take-over: ${messageOf(err)}`, { cause: err });
  }
  if (!received) return undefined;
  const refuse = (why: string): never => {
    for (const fd of [received.fd, ...received.fds]) native.closeFd(fd);
    throw new NmiError(codes.LISTEN, `--take-over: ${socketPath}: ${why}; refused`);
  };
  // Whoever listens there could hand us sockets of its choosing, or lie about what they are.
  const problem = peerProblem(native.peerCredentials(received.fd));
  if (problem) refuse(problem);
  const newline = received.message.indexOf('\n');
  if (newline < 0) refuse(`it sent ${received.message.length >= MAX_LINE_BYTES ? `a line longer than ${MAX_LINE_BYTES} bytes` : 'no complete line'}`);
  const offer = parseOffer(received.message.slice(0, newline), received.fds.length);
  if (typeof offer === 'string') return refuse(`it answered ${offer}`);
  const listeners = new Map<string, number[]>(offer.names.map((name, i) => [name, [received.fds[i]!]]));
  const conn = new net.Socket({ fd: received.fd, readable: true, writable: true });
  // Held for the life of this process, never keeping it alive.
  conn.unref();
  conn.on('error', () => undefined);
  let onReleased = (): void => undefined;
  readControl(conn, 'rules-released', () => onReleased(), (why) => {
    log.warn({ predecessor: offer.pid, code: codes.LISTEN }, `handoff: the running nmi sent ${why}; refused, connection dropped`);
  });
  log.info({ predecessor: offer.pid, listeners: offer.names }, 'taking over from the running nmi');
  return {
    pid: offer.pid,
    listeners,
    async takeRules(waitMs) {
      const released = new Promise<boolean>((resolve) => {
        onReleased = () => resolve(true);
        conn.once('close', () => resolve(false));
        setTimeout(() => resolve(false), waitMs).unref();
      });
      conn.write(`${JSON.stringify({ type: 'take-rules' } satisfies Message)}\n`);
      return released;
    },
  };
}

export interface HandoffEvents {
  /** A successor took the listeners: stop answering the probe address. */
  onSuccessor(): void;
  /** It asks for the rules: stop keeping them; resolve once stopped. */
  onTakeRules(): Promise<void>;
  /** It went away before this process stopped: answer the probe and keep the rules again. */
  onSuccessorGone(): void;
}

/** The handoff socket of a running nmi; one successor at a time. */
export class HandoffServer {
  readonly #server: net.Server;
  readonly #log: Logger;
  #successor: net.Socket | undefined;
  #closing = false;

  private constructor(server: net.Server, log: Logger) {
    this.#server = server;
    this.#log = log;
  }

  /** True while a successor is connected (it keeps the listeners, and the rules once asked). */
  get handedOver(): boolean {
    return this.#successor !== undefined;
  }

  /**
   * Listens at socketPath: bound beside it and renamed over it, so a predecessor still
   * listening there keeps its connection and the path is never missing.
   */
  static async listen(socketPath: string, held: () => readonly HeldListener[], events: HandoffEvents, log: Logger): Promise<HandoffServer> {
    await mkdir(path.dirname(socketPath), { recursive: true, mode: 0o700 });
    const fresh = `${socketPath}.${process.pid}`;
    await rm(fresh, { force: true });
    const server = net.createServer();
    const handoff = new HandoffServer(server, log);
    server.on('connection', (conn) => handoff.#offer(conn, held(), events));
    server.listen(fresh);
    await once(server, 'listening');
    server.unref();
    await rename(fresh, socketPath);
    return handoff;
  }

  #offer(conn: net.Socket, held: readonly HeldListener[], events: HandoffEvents): void {
    conn.on('error', () => undefined);
    const fd = (conn as unknown as { _handle?: { fd?: number } })._handle?.fd;
    const native = addon();
    const peer = fd === undefined ? null : native.peerCredentials(fd);
    const problem = peerProblem(peer);
    if (this.#closing || fd === undefined || problem || this.#successor || !peer) {
      // Neither root nor our uid, or a second successor while one is taking over: nothing is handed out.
      this.#log.warn({ reason: this.#closing ? 'stopping' : this.#successor ? 'a successor is already taking over' : problem }, 'handoff refused');
      conn.destroy();
      return;
    }
    const offer: Offer = { type: 'listeners', pid: process.pid, names: held.map((l) => l.name) };
    try {
      native.sendFds(fd, `${JSON.stringify(offer)}\n`, held.map((l) => l.fd));
    } catch (err) {
      this.#log.warn({ error: messageOf(err) }, 'handoff failed');
      conn.destroy();
      return;
    }
    this.#successor = conn;
    events.onSuccessor();
    this.#log.info({ successor: peer.pid }, 'a new nmi took the listening sockets; it answers the probe address from now on');
    readControl(
      conn,
      'take-rules',
      () => void events.onTakeRules().then(() => conn.write(`${JSON.stringify({ type: 'rules-released' } satisfies Message)}\n`)),
      (why) => this.#log.warn({ successor: peer.pid }, `handoff: the nmi taking over sent ${why}; refused, connection dropped`),
    );
    conn.on('close', () => {
      this.#successor = undefined;
      if (this.#closing) return;
      this.#log.warn('the nmi taking over went away: answering the probe and keeping the rules again');
      events.onSuccessorGone();
    });
  }

  /**
   * Stops accepting successors (this process is stopping); a connected one keeps what it took.
   * The path stays: it may be a successor's by now, and a stale one only refuses connections.
   */
  close(): void {
    this.#closing = true;
    this.#server.close();
    // A successor that has not asked for the rules yet sees the close and keeps them at once.
    this.#successor?.destroy();
  }
}
