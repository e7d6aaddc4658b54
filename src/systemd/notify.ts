// sd_notify for `Type=notify` units: READY/STATUS/STOPPING and watchdog pings,
// sent as datagrams to $NOTIFY_SOCKET through the addon (Node has no AF_UNIX
// datagram sockets). Notification is best effort, as in libsystemd: a failed
// send is logged once and never stops the daemon.
import type { Logger } from '../log/logger.js';
import { addon } from '../native/addon.js';
import { messageOf } from '../errors/errors.js';

/** The variables systemd hands the main process; read once, then unset (sd_notify's unset_environment). */
const ENV_NAMES = ['NOTIFY_SOCKET', 'WATCHDOG_USEC', 'WATCHDOG_PID'] as const;

export interface NotifierOptions {
  /** An absolute path, or '@name' for an abstract socket. */
  socket: string;
  /** Ping interval; undefined when systemd asked for no watchdog. */
  watchdogIntervalMs?: number;
  log: Logger;
}

export class SystemdNotifier {
  readonly socket: string;
  readonly watchdogIntervalMs: number | undefined;
  readonly #log: Logger;
  #timer: NodeJS.Timeout | undefined;
  #warned = false;

  constructor({ socket, watchdogIntervalMs, log }: NotifierOptions) {
    this.socket = socket;
    this.watchdogIntervalMs = watchdogIntervalMs;
    this.#log = log;
  }

  /**
   * The notifier systemd asked for, or undefined when NOTIFY_SOCKET is unset (not
   * under systemd, or not Type=notify). Removes the variables from `env` so child
   * processes (iptables, conntrack) do not inherit them.
   */
  static fromEnv(env: NodeJS.ProcessEnv, log: Logger): SystemdNotifier | undefined {
    const { NOTIFY_SOCKET: socket, WATCHDOG_USEC: usec, WATCHDOG_PID: pid } = env;
    for (const name of ENV_NAMES) delete env[name];
    if (!socket) return undefined;
    // libsystemd accepts only these two forms (vsock: needs systemd 254+ and is not supported here).
    if (!socket.startsWith('/') && !socket.startsWith('@')) {
      log.warn({ socket }, 'NOTIFY_SOCKET is neither a path nor an abstract socket; systemd will not be notified');
      return undefined;
    }
    return new SystemdNotifier({ socket, watchdogIntervalMs: watchdogInterval(usec, pid, log), log });
  }

  ready(status: string): void {
    this.#send(`READY=1\nSTATUS=${oneLine(status)}`);
  }

  status(text: string): void {
    this.#send(`STATUS=${oneLine(text)}`);
  }

  stopping(status: string): void {
    this.#send(`STOPPING=1\nSTATUS=${oneLine(status)}`);
  }

  /** Pings at half the watchdog timeout, as sd_watchdog_enabled(3) advises; a no-op without a watchdog. */
  startWatchdog(): void {
    if (this.watchdogIntervalMs === undefined || this.#timer) return;
    this.#send('WATCHDOG=1');
    // unref'd: the watchdog must never be what keeps the process alive.
    this.#timer = setInterval(() => this.#send('WATCHDOG=1'), this.watchdogIntervalMs).unref();
  }

  /**
   * Hands listening sockets to systemd's file descriptor store (FDSTORE=1, FDNAME=), where they
   * outlive this process: the next start gets them back as LISTEN_FDS. Names no longer used
   * are dropped from the store first (FDSTOREREMOVE=1). systemd ignores a descriptor it holds already.
   */
  store(listeners: readonly { name: string; fd: number }[], forget: readonly string[] = []): void {
    for (const name of forget) this.#send(`FDSTOREREMOVE=1\nFDNAME=${name}`);
    for (const { name, fd } of listeners) this.#send(`FDSTORE=1\nFDNAME=${name}`, [fd]);
  }

  close(): void {
    clearInterval(this.#timer);
    this.#timer = undefined;
  }

  #send(message: string, fds?: number[]): void {
    let error: string | null = null;
    try {
      if (fds) addon().sdNotify(this.socket, message, fds);
      else addon().sdNotify(this.socket, message);
    } catch (err) {
      error = messageOf(err);
    }
    if (error === null || this.#warned) return;
    // Once: a vanished socket would otherwise log on every watchdog ping.
    this.#warned = true;
    this.#log.warn({ socket: this.socket, error, message: message.split('\n')[0] }, 'systemd notification failed; later failures are not logged');
  }
}

/** WATCHDOG_USEC/2 in ms when the watchdog is meant for this process, else undefined. */
function watchdogInterval(usec: string | undefined, pid: string | undefined, log: Logger): number | undefined {
  if (!usec) return undefined;
  // With NotifyAccess=all a child may hold the variables meant for its parent: only the named pid pings.
  if (pid && Number(pid) !== process.pid) return undefined;
  const micros = /^\d+$/.test(usec) ? Number(usec) : NaN;
  if (!(micros > 0)) {
    log.warn({ WATCHDOG_USEC: usec }, 'WATCHDOG_USEC is not a positive integer; watchdog pings disabled');
    return undefined;
  }
  return Math.max(1, Math.floor(micros / 2000));
}

/** A newline would end the STATUS= assignment and start a new one. */
function oneLine(text: string): string {
  return text.replace(/[\r\n]+/g, ' ');
}
