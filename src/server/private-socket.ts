// The unix socket of --host-token-socket, private to root: the endpoint on it
// (host-token.ts) answers any pod's token, so only root may connect.
// Node has no SO_PEERCRED API, so the peer's uid cannot be read. The socket is
// instead created 0600 and owned by root (the daemon runs as root), inside a
// directory no one else can write, so connect(2) itself refuses every other user
// with EACCES. There is no moment where the socket is more open: the umask is
// 0177 during the bind.
import { chmod, lstat, mkdir, stat, unlink } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { limits } from '../config/limits.js';
import { messageOf, UsageError } from '../errors/errors.js';
import { addon } from '../native/addon.js';

const SOCKET_MODE = 0o600;
const DIRECTORY_MODE = 0o700;

/**
 * A listening socket at socketPath, 0600 and root's from its creation: its folder private to
 * root (made 0700 when missing), a stale socket there removed, anything else refused. Made
 * outside node, which would unlink it when its server closes: it outlives the process in
 * systemd's store or a successor, and its path with it.
 */
export async function bindHostTokenSocket(socketPath: string): Promise<number> {
  await preparePath(socketPath);
  let fd: number;
  try {
    fd = addon().listenUnix(socketPath, SOCKET_MODE, limits.backlog);
  } catch (err) {
    throw new UsageError(`--host-token-socket: ${messageOf(err)}`);
  }
  try {
    await verifyHostTokenSocket(socketPath);
  } catch (err) {
    addon().closeFd(fd);
    throw err;
  }
  return fd;
}

/** The directory must be private to root (made 0700 when missing); a stale socket is removed, anything else refused. */
async function preparePath(socketPath: string): Promise<void> {
  const dir = path.dirname(socketPath);
  await mkdir(dir, { recursive: true, mode: DIRECTORY_MODE });
  const info = await stat(dir);
  if (!info.isDirectory()) throw new UsageError(`--host-token-socket: ${dir} is not a directory`);
  if ((info.mode & 0o022) !== 0) {
    throw new UsageError(`--host-token-socket: directory ${dir} is group- or world-writable (mode ${octal(info.mode)}): another user could replace the socket`);
  }
  if (info.uid !== 0 && info.uid !== process.geteuid?.()) {
    throw new UsageError(`--host-token-socket: directory ${dir} is owned by uid ${info.uid}, not root`);
  }

  const existing = await lstatOrUndefined(socketPath);
  if (!existing) return;
  if (!existing.isSocket()) throw new UsageError(`--host-token-socket: ${socketPath} exists and is not a socket; not removing it`);
  if (await answers(socketPath)) throw new UsageError(`--host-token-socket: ${socketPath} is in use by another process`);
  await unlink(socketPath);
}

/** chmod is a second line of defence; lstat proves the result (a socket, 0600, ours). */
export async function verifyHostTokenSocket(socketPath: string): Promise<void> {
  await chmod(socketPath, SOCKET_MODE);
  const info = await lstat(socketPath);
  const owner = process.geteuid?.();
  if (!info.isSocket() || (info.mode & 0o7777) !== SOCKET_MODE || (owner !== undefined && info.uid !== owner)) {
    throw new UsageError(`--host-token-socket: ${socketPath} did not end up a ${octal(SOCKET_MODE)} socket owned by uid ${owner} (mode ${octal(info.mode)}, uid ${info.uid})`);
  }
}

/** A socket file nobody listens on refuses the connection: that one is stale. */
function answers(socketPath: string): Promise<boolean> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(socketPath);
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', (err: NodeJS.ErrnoException) => {
      if (err.code === 'ECONNREFUSED' || err.code === 'ENOENT') resolve(false);
      else reject(new UsageError(`--host-token-socket: cannot tell whether ${socketPath} is in use: ${err.code ?? err.message}`));
    });
  });
}

async function lstatOrUndefined(file: string) {
  try {
    return await lstat(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
}

function octal(mode: number): string {
  return `0${(mode & 0o7777).toString(8)}`;
}
