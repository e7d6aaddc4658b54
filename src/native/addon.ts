// The one place the addon's surface is typed and loaded. Every call fails one
// way: it throws a NativeCallError (code NMI_ERR_NATIVE_CALL); a null or false
// it returns is an answer ("nothing there", "not usable"), never a failure.
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import { NmiError, codes } from '../errors/errors.js';

export interface NftResult {
  ok: boolean;
  output: string;
  error: string;
}

/** The native server's bounds and rules, all from TypeScript (src/config/limits.ts, the flags, request.ts): the C++ keeps no copy. */
export interface NativeServerOptions {
  /** A listening TCP socket (src/lifecycle/listeners.ts). */
  fd: number;
  /** Past it, new connections wait in the kernel's backlog. */
  maxConnections: number;
  /** Past it, a caller's new connection is answered tooManyConnectionsAnswer and closed. */
  maxConnectionsPerSource: number;
  /** Request line + headers; a longer head is deferred with error "overflow". */
  maxHeaderBytes: number;
  /** A request body; a longer declared one is deferred with error "too-large", unread. */
  maxBodyBytes: number;
  /** A request partly received for this long is deferred with error "timeout". */
  headerTimeoutMs: number;
  /** An idle keep-alive connection is closed after this long; kept-alive answers say it in Keep-Alive: timeout= (seconds). */
  keepAliveTimeoutMs: number;
  /** A connection whose unsent answers make no progress for this long is closed. */
  writeTimeoutMs: number;
  /** Answers a connection's peer has not taken; above it, the connection is not read. */
  maxUnsentBytes: number;
  /** Request bytes one connection has waiting on JS; above it, the connection is not read. */
  maxDeferredBytesPerConnection: number;
  /** Requests, and their bytes, the server has waiting on JS; past either, busyAnswer. */
  maxDeferredRequests: number;
  maxDeferredBytes: number;
  /** [status line and headers, each ending CRLF; body]: Date and Connection are added natively. */
  busyAnswer: [string, string];
  tooManyConnectionsAnswer: [string, string];
  metadataHeaderRequired: boolean;
  /** --multiple-identities (config/commands.ts's MultipleIdentities): 'first' serves a request naming no id the first of its caller's identities (TS orders them). */
  multipleIdentities: 'first' | 'refuse';
  /** The api-versions a token request may name (request.ts's IDENTITY_API_VERSIONS); any other is deferred. */
  apiVersions: readonly string[];
  /** --rules ebpf: the eBPF peers map; callers are then keyed "address#cgroup" (0: none recorded). */
  peerMapFd?: number;
  /** --audit-log: serverTakeHits is called, so entries replaced or removed keep their counts until it is. */
  countHits?: boolean;
}

/**
 * Why the native server deferred a request to JS without a complete, framed request:
 * "malformed" (not HTTP/1.x), "overflow" (head too large), "timeout", "body"
 * (a Transfer-Encoding body, not taken), "body-not-allowed" (a body on the token
 * path or a GET or HEAD, refused unread), "too-large" (a body over maxBodyBytes), and
 * "stopped" once, after serverStop, when the thread has finished (connId 0).
 */
export type NativeDeferError = 'malformed' | 'overflow' | 'timeout' | 'body' | 'body-not-allowed' | 'too-large' | 'stopped';

/** Called on the JS thread for every request the native side does not answer itself. */
export type NativeRequestHandler = (connId: number, requestId: number, raw: Buffer | null, remoteAddress: string, error: NativeDeferError | null) => void;

/** [identityKey, clientIdLowercase, resourceIdLowercase] */
export type NativeIdentityRow = [string, string, string];
/** A caller entry: [caller key, exception, index of its identity list] */
export type NativeCallerRow = [string, boolean, number];
/** [identityKey, resource, bodyBeforeExpiresIn, bodyAfterExpiresIn, expiresOnSeconds, serveUntilMs] */
export type NativeTokenRow = [string, string, string, string, number, number];
/** [identityKey, resource] */
export type NativeTokenKey = [string, string];

export interface NativeServerStats {
  connections: number;
  hits: number;
  deferredToJs: number;
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
  /** Sends one sd_notify datagram, with descriptors as SCM_RIGHTS when given. */
  sdNotify(socketPath: string, message: string, fds?: number[]): void;
  /** A listening, non-blocking, close-on-exec TCP socket bound to host:port. */
  listenTcp(host: string, port: number, backlog: number): number;
  /** A listening unix stream socket at path, created with the umask that gives mode. */
  listenUnix(path: string, mode: number, backlog: number): number;
  /** Where a descriptor listens, when it is a listening TCP or unix socket (null otherwise); marks it close-on-exec. */
  listeningAddress(fd: number): { host: string; port: number } | { path: string } | null;
  /** A close-on-exec duplicate of a descriptor. */
  dupFd(fd: number): number;
  closeFd(fd: number): void;
  /** One message with descriptors (SCM_RIGHTS) on a connected unix stream socket. */
  sendFds(socketFd: number, message: string, fds: number[]): void;
  /** Connects to a unix stream socket and reads its first message and descriptors; null when nothing listens there. */
  receiveFds(path: string, timeoutMs: number): { fd: number; message: string; fds: number[] } | null;
  /** Who is at the other end of a unix socket (SO_PEERCRED); null when unknown. */
  peerCredentials(socketFd: number): { uid: number; pid: number } | null;
  /** Moves the calling (main) thread into the network namespace at path. */
  setNetns(path: string): void;
  /** madvise(MADV_DONTNEED) on [start, start + length). */
  dropPages(start: bigint, length: bigint): void;
  /** mallopt(M_MMAP_THRESHOLD, bytes) and mallopt(M_TRIM_THRESHOLD, bytes); the error says which one was refused. */
  setMallocThresholds(bytes: number): void;
  /** execve(2): replaces the process image (same pid), keeping stdio and keepFds open; returns only by throwing. */
  exec(file: string, argv: string[], env: string[], keepFds?: number[]): never;
  /**
   * The TCP socket of this network namespace whose own end is local and whose peer is remote (sock_diag):
   * its owner's uid and the cgroup v2 id it was created in (null before Linux 5.7); null when there is none.
   */
  socketOwner(localAddress: string, localPort: number, remoteAddress: string, remotePort: number): SocketOwner | null;
  /** PR_SET_DUMPABLE 0 and RLIMIT_CORE 0 (soft and hard) on this process; returns what the kernel then reports. */
  disableCoreDumps(): CoreDumpState;
  /** Starts the server's epoll thread on a listening socket, which it owns (and closes) from then on. */
  serverStart(options: NativeServerOptions, onRequest: NativeRequestHandler): { id: number; port: number };
  /** Queues the complete answer bytes of one deferred request; close ends the connection after it. */
  serverRespond(server: number, connId: number, requestId: number, bytes: Buffer, close: boolean): void;
  /** Replaces the caller table (caller key → identities) in one swap; entries with the same identities share a list. */
  serverSetCallers(server: number, lists: NativeIdentityRow[][], callers: NativeCallerRow[]): void;
  /** Adds or replaces `upserts` and removes `removals` from the token table, in one swap. */
  serverUpdateTokens(server: number, upserts: NativeTokenRow[], removals: NativeTokenKey[]): void;
  /** Stops accepting and drains (at most drainMs); false when already stopping or stopped. */
  serverStop(server: number, drainMs: number): boolean;
  /** null once the server has stopped. */
  serverStats(server: number): NativeServerStats | null;
  /** [tokenKey (identityKey "\n" resource), answers from that entry] since the last call, each entry with any; null once the server has stopped. */
  serverTakeHits(server: number): [string, number][] | null;
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

/** prctl(PR_GET_DUMPABLE) and RLIMIT_CORE's limits in bytes (-1: unlimited). */
export interface CoreDumpState {
  dumpable: number;
  coreSoft: number;
  coreHard: number;
}

export interface BpfLinkInfo {
  id: number;
  programId: number;
  cgroupId: bigint;
}

/** How every addon call fails: what the C++ threw, its message kept, with the system's errno when it gave one. */
export class NativeCallError extends NmiError {
  /** The addon function that failed. */
  readonly call: string;
  readonly errno: number | undefined;
  constructor(call: string, cause: unknown) {
    const thrown = cause as { message?: unknown; errno?: unknown } | null;
    super(codes.NATIVE_CALL, typeof thrown?.message === 'string' ? thrown.message : String(cause), { cause });
    this.name = 'NativeCallError';
    this.call = call;
    this.errno = typeof thrown?.errno === 'number' ? thrown.errno : undefined;
  }
}

/** What is wrong with serverStart's options, checked here so the C++ takes them as given; undefined when nothing. */
export function serverOptionsProblem(options: NativeServerOptions): string | undefined {
  const counts = [
    'maxConnections', 'maxConnectionsPerSource', 'maxHeaderBytes', 'maxBodyBytes', 'headerTimeoutMs', 'keepAliveTimeoutMs',
    'writeTimeoutMs', 'maxUnsentBytes', 'maxDeferredBytesPerConnection', 'maxDeferredRequests', 'maxDeferredBytes',
  ] as const;
  // The C++ reads them as 32-bit unsigned numbers.
  for (const name of counts) if (!isUint32(options[name]) || options[name] === 0) return `${name} must be a whole number from 1 to 2^32-1, not ${options[name]}`;
  if (!isUint32(options.fd)) return `fd must be a descriptor, not ${options.fd}`;
  if (options.peerMapFd !== undefined && !isUint32(options.peerMapFd)) return `peerMapFd must be a descriptor, not ${options.peerMapFd}`;
  if (options.countHits !== undefined && typeof options.countHits !== 'boolean') return 'countHits must be true or false';
  if (options.multipleIdentities !== 'first' && options.multipleIdentities !== 'refuse') return `multipleIdentities must be 'first' or 'refuse'`;
  if (options.apiVersions.length === 0 || options.apiVersions.some((v) => typeof v !== 'string' || v === '')) return 'apiVersions must be a list of api-versions';
  for (const name of ['busyAnswer', 'tooManyConnectionsAnswer'] as const) {
    const [head, body] = options[name];
    if (typeof head !== 'string' || !head.endsWith('\r\n') || typeof body !== 'string') return `${name} must be [head ending CRLF, body]`;
  }
  return undefined;
}

function isUint32(n: number): boolean {
  return Number.isInteger(n) && n >= 0 && n <= 0xffff_ffff;
}

/** The raw module's functions, each throwing a NativeCallError for whatever the C++ threw; serverStart checks its options first. */
function typed(raw: Record<string, unknown>): NativeAddon {
  const surface: Record<string, unknown> = {};
  for (const [name, fn] of Object.entries(raw)) {
    if (typeof fn !== 'function') continue;
    const call = (...args: unknown[]): unknown => {
      try {
        return (fn as (...a: unknown[]) => unknown)(...args);
      } catch (err) {
        throw new NativeCallError(name, err);
      }
    };
    surface[name] = name !== 'serverStart' ? call : (options: NativeServerOptions, ...rest: unknown[]): unknown => {
      const problem = serverOptionsProblem(options);
      if (problem) throw new NmiError(codes.NATIVE_CALL, `serverStart: ${problem}`);
      return call(options, ...rest);
    };
  }
  return surface as unknown as NativeAddon;
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
      loaded = typed(require(path.join(root, candidate)) as Record<string, unknown>);
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
