// The one place the addon's surface is typed and loaded.
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import { NmiError, codes } from '../errors/errors.js';

export interface NftResult {
  ok: boolean;
  output: string;
  error: string;
}

export interface NativeServerOptions {
  /** A listening TCP socket (src/net/listeners.ts). */
  fd: number;
  /** Past it, new connections wait in the kernel's backlog. */
  maxConnections: number;
  /** Past it, a caller's new connection is answered tooManyConnectionsAnswer and closed. */
  maxConnectionsPerSource: number;
  /** Request line + headers; a longer head is handed over with error "overflow". */
  maxHeaderBytes: number;
  /** A request partly received for this long is handed over with error "timeout". */
  headerTimeoutMs: number;
  /** A connection whose unsent answers make no progress for this long is closed. */
  writeTimeoutMs: number;
  /** Answers a connection's peer has not taken; above it, the connection is not read. */
  maxUnsentBytes: number;
  /** Request bytes one connection has waiting on JS; above it, the connection is not read. */
  maxHandedBytesPerConnection: number;
  /** Requests, and their bytes, the server has waiting on JS; past either, busyAnswer. */
  maxHandedRequests: number;
  maxHandedBytes: number;
  /** [status line and headers, each ending CRLF; body]: Date and Connection are added natively. */
  busyAnswer: [string, string];
  tooManyConnectionsAnswer: [string, string];
  metadataHeaderRequired: boolean;
  /** --multiple-identities first: a request naming no id is served the first of several identities (TS orders them). */
  firstOfSeveral: boolean;
  /** --rules ebpf: the eBPF peers map; callers are then keyed "address#cgroup" (0: none recorded). */
  peerMapFd?: number;
}

/**
 * Why the native server handed a request over without a complete, framed request:
 * "malformed" (not HTTP/1.x), "overflow" (head too large), "timeout", "body"
 * (a Transfer-Encoding body, not taken), "body-not-allowed" (a body on the token
 * path or a GET or HEAD, refused unread), "too-large" (a body over 16 KiB), and
 * "stopped" once, after serverStop, when the thread has finished (connId 0).
 */
export type NativeHandoffError = 'malformed' | 'overflow' | 'timeout' | 'body' | 'body-not-allowed' | 'too-large' | 'stopped';

/** Called on the JS thread for every request the native side does not answer itself. */
export type NativeRequestHandler = (connId: number, requestId: number, raw: Buffer | null, remoteAddress: string, error: NativeHandoffError | null) => void;

/** [identityKey, clientIdLowercase, resourceIdLowercase] */
export type NativeIdentityRow = [string, string, string];
/** [address, exception, index of its identity list] */
export type NativeRouteRow = [string, boolean, number];
/** [identityKey, resource, bodyBeforeExpiresIn, bodyAfterExpiresIn, expiresOnSeconds, serveUntilMs] */
export type NativeTokenRow = [string, string, string, string, number, number];
/** [identityKey, resource] */
export type NativeTokenKey = [string, string];

export interface NativeServerStats {
  connections: number;
  hits: number;
  handedToJs: number;
  malformed: number;
  overflow: number;
  timeout: number;
  /** Connections answered 429 past --max-connections-per-source. */
  refusedConnections: number;
  /** Requests answered 503 because the server held as many waiting on JS as it may. */
  busy: number;
  /** Connections closed because their answers were not read. */
  writeTimeouts: number;
  /** accept() out of descriptors or memory (new connections then wait in the backlog a moment). */
  acceptErrors: number;
}

export interface NativeAddon {
  /** null when libnftables is usable, else why not. */
  nftLoad(): string | null;
  /** Runs one nft transaction through libnftables in the caller's network namespace. */
  nftRun(commands: string, json: boolean): NftResult;
  /** Sends one sd_notify datagram, with descriptors as SCM_RIGHTS when given; null on success, else the errno text. */
  sdNotify(socketPath: string, message: string, fds?: number[]): string | null;
  /** A listening, non-blocking, close-on-exec TCP socket bound to host:port; throws with `errno` when it cannot be. */
  listenTcp(host: string, port: number, backlog: number): number;
  /** A listening unix stream socket at path, created with the umask that gives mode; throws with `errno` when it cannot be. */
  listenUnix(path: string, mode: number, backlog: number): number;
  /** Where a descriptor listens, when it is a listening TCP or unix socket (null otherwise); marks it close-on-exec. */
  listeningAddress(fd: number): { host: string; port: number } | { path: string } | null;
  /** A close-on-exec duplicate of a descriptor. */
  dupFd(fd: number): number;
  closeFd(fd: number): void;
  /** One message with descriptors (SCM_RIGHTS) on a connected unix stream socket; null on success, else the errno text. */
  sendFds(socketFd: number, message: string, fds: number[]): string | null;
  /** Connects to a unix stream socket and reads its first message and descriptors; null when nothing listens there. */
  receiveFds(path: string, timeoutMs: number): { fd: number; message: string; fds: number[] } | null;
  /** Who is at the other end of a unix socket (SO_PEERCRED); null when unknown. */
  peerCredentials(socketFd: number): { uid: number; pid: number } | null;
  /** Moves the calling (main) thread into the network namespace at path; null on success. */
  setNetns(path: string): string | null;
  /** madvise(MADV_DONTNEED) on [start, start + length); null on success, else the errno text. */
  dropPages(start: bigint, length: bigint): string | null;
  /** mallopt(M_MMAP_THRESHOLD, bytes) and mallopt(M_TRIM_THRESHOLD, bytes); null on success, else which one was refused. */
  setMallocThresholds(bytes: number): string | null;
  /** execve(2): replaces the process image (same pid), keeping stdio and keepFds open; returns the errno text only when that failed. */
  exec(file: string, argv: string[], env: string[], keepFds?: number[]): string;
  /**
   * The TCP socket of this network namespace whose own end is local and whose peer is remote (sock_diag):
   * its owner's uid and the cgroup v2 id it was created in (null before Linux 5.7); null when there is none.
   */
  socketOwner(localAddress: string, localPort: number, remoteAddress: string, remotePort: number): SocketOwner | null;
  /** Starts the server's epoll thread on a listening socket, which it owns (and closes) from then on. */
  serverStart(options: NativeServerOptions, onRequest: NativeRequestHandler): { id: number; port: number };
  /** Queues the complete answer bytes of one handed-over request; close ends the connection after it. */
  serverRespond(server: number, connId: number, requestId: number, bytes: Buffer, close: boolean): void;
  /** Replaces the route table (caller address → identities) in one swap; routes with the same identities share a list. */
  serverSetRoutes(server: number, lists: NativeIdentityRow[][], routes: NativeRouteRow[]): void;
  /** Adds or replaces `upserts` and removes `removals` from the token table, in one swap. */
  serverUpdateTokens(server: number, upserts: NativeTokenRow[], removals: NativeTokenKey[]): void;
  /** Stops accepting and drains (at most drainMs); false when already stopping or stopped. */
  serverStop(server: number, drainMs: number): boolean;
  /** null once the server has stopped. */
  serverStats(server: number): NativeServerStats | null;
  /** null when the eBPF entry points below are built in, else why not (then they are absent). */
  bpfSupport(): string | null;
  /** Loads an eBPF object, its maps pinned (or reused when pinned) as pinDir/<map name>; returns a handle. */
  bpfLoad(objectPath: string, pinDir: string): number;
  bpfUnload(handle: number): void;
  /** Pins again the object's maps whose pins were removed; returns how many. */
  bpfRepinMaps(handle: number): number;
  /** The loaded object's descriptor of a map, valid until bpfUnload. */
  bpfMapFd(handle: number, map: string): number;
  /** The kernel's id of a loaded program. */
  bpfProgramId(handle: number, program: string): number;
  /** Attaches the program to the cgroup through a new link pinned over linkPin in one rename. */
  bpfAttach(handle: number, program: string, cgroupPath: string, linkPin: string): void;
  /** Swaps the program of the link pinned at linkPin, which stays attached throughout. */
  bpfReplace(handle: number, program: string, linkPin: string): void;
  /** null when nothing is pinned there; cgroupId 0n once the link was detached. */
  bpfLinkInfo(linkPin: string): BpfLinkInfo | null;
  /** Removes a pin (detaching a link first when detach is set); false when nothing was pinned. */
  bpfUnpin(pin: string, detach: boolean): boolean;
  /** The value under key, or null when absent. */
  bpfMapLookup(fd: number, key: Buffer, valueSize: number): Buffer | null;
  bpfMapUpdate(fd: number, key: Buffer, value: Buffer): void;
}

export interface SocketOwner {
  uid: number;
  inode: number;
  cgroupId: bigint | null;
}

export interface BpfLinkInfo {
  id: number;
  programId: number;
  cgroupId: bigint;
}

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const candidates = ['build/Release/nmi.node', 'build/Debug/nmi.node'];
let loaded: NativeAddon | undefined;
let loadedFrom = '';

export function addon(): NativeAddon {
  if (loaded) return loaded;
  const require = createRequire(import.meta.url);
  const errors: string[] = [];
  for (const candidate of candidates) {
    try {
      loaded = require(path.join(root, candidate)) as NativeAddon;
      loadedFrom = path.dirname(path.join(root, candidate));
      return loaded;
    } catch (err) {
      errors.push(`${candidate}: ${(err as Error).message.split('\n')[0]}`);
    }
  }
  throw new NmiError(codes.NATIVE_LOAD, `Failed to load native module nmi.node, checked: ${errors.join('; ')}`);
}

/** A file built beside the addon (the eBPF object). */
export function builtFile(name: string): string {
  addon();
  return path.join(loadedFrom, name);
}
