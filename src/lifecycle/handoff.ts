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
// descriptors (SCM_RIGHTS). Only root may connect (the socket is 0600, and the
// peer's uid is checked).
import { once } from 'node:events';
import { mkdir, rename, rm } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import readline from 'node:readline';
import { codes, NmiError, messageOf } from '../errors/errors.js';
import type { Logger } from '../log/logger.js';
import { addon } from '../native/addon.js';
import type { HeldListener, ListenerName } from './listeners.js';

interface Offer {
  type: 'listeners';
  pid: number;
  names: ListenerName[];
}
type Message = Offer | { type: 'take-rules' } | { type: 'rules-released' };

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
  let offer: Offer;
  try {
    offer = JSON.parse(received.message.split('\n')[0]!) as Offer;
    if (offer.type !== 'listeners' || offer.names.length !== received.fds.length) throw new Error('not a listener offer');
  } catch (err) {
    for (const fd of [received.fd, ...received.fds]) native.closeFd(fd);
    throw new NmiError(codes.LISTEN, `--take-over: ${socketPath} answered something else: ${messageOf(err)}`);
  }
  const listeners = new Map<string, number[]>(offer.names.map((name, i) => [name, [received.fds[i]!]]));
  const conn = new net.Socket({ fd: received.fd, readable: true, writable: true });
  // Held for the life of this process, never keeping it alive.
  conn.unref();
  conn.on('error', () => undefined);
  const lines = readline.createInterface({ input: conn });
  log.info({ predecessor: offer.pid, listeners: offer.names }, 'taking over from the running nmi');
  return {
    pid: offer.pid,
    listeners,
    async takeRules(waitMs) {
      const released = new Promise<boolean>((resolve) => {
        lines.on('line', (line) => {
          if ((JSON.parse(line) as Message).type === 'rules-released') resolve(true);
        });
        lines.once('close', () => resolve(false));
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
    if (this.#closing || fd === undefined || peer?.uid !== 0 || this.#successor) {
      // Not root, or a second successor while one is taking over: nothing is handed out.
      this.#log.warn({ reason: this.#closing ? 'stopping' : this.#successor ? 'a successor is already taking over' : 'peer is not root' }, 'handoff refused');
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
    readline.createInterface({ input: conn }).on('line', (line) => {
      let message: Message;
      try {
        message = JSON.parse(line) as Message;
      } catch {
        return;
      }
      if (message.type !== 'take-rules') return;
      void events.onTakeRules().then(() => conn.write(`${JSON.stringify({ type: 'rules-released' } satisfies Message)}\n`));
    });
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
