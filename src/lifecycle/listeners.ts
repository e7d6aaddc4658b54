// The daemon's listening sockets, each made (or adopted) once and held for the
// process's life. Servers get duplicates, which they close when they stop; the
// listener itself stays open until the process exits, and past that in
// systemd's file descriptor store, so a connection that arrives while nmi
// restarts waits in the kernel's queue for the next process instead of being
// refused.
import { getSystemErrorName } from 'node:util';
import { codes, NmiError } from '../errors/errors.js';
import type { HostPort } from '../config/values.js';
import type { Logger } from '../log/logger.js';
import { addon } from '../native/addon.js';
import { limits } from '../config/limits.js';

/** What each listener is stored as (FDNAME=), and so known by on the next start. */
export type ListenerName = 'token' | 'probe' | 'host-token' | 'host-token-tcp';

export interface HeldListener {
  name: ListenerName;
  fd: number;
  /** Taken from the descriptors this process was started with, not bound by it. */
  adopted: boolean;
}

/** A listener that could not be bound; `errno` as the kernel said it (EADDRINUSE: someone listens there). */
export class ListenError extends NmiError {
  readonly errno: number | undefined;
  constructor(name: ListenerName, cause: Error & { errno?: number }) {
    super(codes.LISTEN, `${name}: ${cause.message}${cause.errno ? ` (${getSystemErrorName(-cause.errno)})` : ''}`, { cause });
    this.name = 'ListenError';
    this.errno = cause.errno;
  }
}

type Where = { host: string; port: number } | { path: string };

function describe(at: Where): string {
  return 'path' in at ? at.path : `${at.host}:${at.port}`;
}

function same(a: Where, b: Where): boolean {
  if ('path' in a || 'path' in b) return 'path' in a && 'path' in b && a.path === b.path;
  return a.host === b.host && a.port === b.port;
}

export class Listeners {
  /** Inherited descriptors not taken yet, by name. */
  readonly #inherited: Map<string, number[]>;
  readonly #held = new Map<ListenerName, HeldListener>();
  readonly #log: Logger;

  constructor(inherited: Map<string, number[]>, log: Logger) {
    this.#inherited = new Map([...inherited].map(([name, fds]) => [name, [...fds]]));
    this.#log = log;
  }

  /** Binds a TCP listener, or adopts the inherited one of that name when it is bound to the same address. */
  hold(name: ListenerName, address: HostPort): HeldListener {
    const adopted = this.#adopt(name, address);
    if (adopted !== undefined) return this.#record(name, adopted, true);
    try {
      return this.#record(name, addon().listenTcp(address.host, address.port, limits.backlog), false);
    } catch (err) {
      throw new ListenError(name, err as Error);
    }
  }

  /** The same for a unix socket: adopted when inherited at that path, else made by `bind` (which checks the path first). */
  async holdUnix(name: ListenerName, socketPath: string, bind: () => Promise<number>): Promise<HeldListener> {
    const adopted = this.#adopt(name, { path: socketPath });
    return adopted !== undefined ? this.#record(name, adopted, true) : this.#record(name, await bind(), false);
  }

  #record(name: ListenerName, fd: number, adopted: boolean): HeldListener {
    const made: HeldListener = { name, fd, adopted };
    this.#held.set(name, made);
    return made;
  }

  /** The inherited descriptor of that name listening at `where`; the others of that name are closed. */
  #adopt(name: ListenerName, where: Where): number | undefined {
    const native = addon();
    let adopted: number | undefined;
    for (const fd of this.#inherited.get(name) ?? []) {
      const at = native.listeningAddress(fd);
      if (adopted === undefined && at && same(at, where)) adopted = fd;
      else {
        // Bound elsewhere (the flags changed since it was stored), or not a listener: of no use.
        this.#log.info({ listener: name, was: at ? describe(at) : 'not a listening socket' }, 'dropping an inherited listener');
        native.closeFd(fd);
      }
    }
    this.#inherited.delete(name);
    if (adopted !== undefined) this.#log.info({ listener: name, address: describe(where) }, 'listening socket taken over from the previous nmi');
    return adopted;
  }

  /** A descriptor of a held listener for a server to own (and close when it stops). */
  take(name: ListenerName): number {
    const held = this.#held.get(name);
    if (!held) throw new NmiError(codes.LISTEN, `${name}: not held`);
    return addon().dupFd(held.fd);
  }

  get held(): HeldListener[] {
    return [...this.#held.values()];
  }

  /** Closes inherited descriptors nothing took; returns their names (for systemd to forget too). */
  discardUnused(): string[] {
    const names = [...this.#inherited.keys()];
    for (const [name, fds] of this.#inherited) {
      this.#log.info({ listener: name }, 'dropping an inherited descriptor nmi has no use for');
      for (const fd of fds) addon().closeFd(fd);
    }
    this.#inherited.clear();
    return names;
  }
}
