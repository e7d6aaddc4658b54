// The built-in bounds of the token servers (the js server and its worker thread,
// the native one, the token core) and of the upstream calls they wait on.
export const limits = {
  maxHeaderSize: 16 * 1024, // bytes, request line + headers
  headersTimeoutMs: 10_000, // to receive the headers
  requestTimeoutMs: 30_000, // to receive the whole request
  maxBodyBytes: 16 * 1024, // request bodies: proxied categories other than GETs only (scheduledevents' POST)
  keepAliveTimeoutMs: 5_000, // idle keep-alive connection
  maxConnections: 4_096, // past it, new connections wait in the kernel's backlog (native) or are answered 503 (js)
  maxConnectionsPerSource: 64, // --max-connections-per-source's default; past it, a connection is answered 429 and closed
  maxUnsentBytes: 64 * 1024, // a connection's answers not yet taken by its peer; above it, its requests are not read
  writeTimeoutMs: 10_000, // a connection whose pending output makes no progress in this long is closed
  maxDeferredBytesPerConnection: 64 * 1024, // request bytes one connection has waiting on the main thread
  maxDeferredRequests: 1_024, // requests the whole server has waiting on the main thread; past it, 503
  maxDeferredBytes: 8 * 1024 * 1024, // their bytes; past it, 503
  busyRetryAfterS: 1, // Retry-After of those 503s and of the per-source 429
  maxProxiedAnswerBytes: 1024 * 1024, // an IMDS answer larger than this is not passed on (502)
  maxRetryAfterMs: 60_000, // the longest an upstream's Retry-After pauses a budget or a refusal is remembered
  backlog: 511, // connections the kernel queues unaccepted: what waits there while nmi restarts
  drainTimeoutMs: 10_000, // close(): in-flight requests get this long
  proxyTimeoutMs: 10_000,
  upstreamRetryAfterS: 5, // when the upstream gave no Retry-After
  budgetWaitMs: 10_000, // a first token that gets no turn upstream in this long is answered 429
  // --audit-log: (pod, identity, resource) rows held, in the audit's served records and in the tables' per-pod token rows:
  // 250 pods × --max-tokens-per-pod's default 64. Past it the oldest served record goes, and the core answers new rows.
  auditRows: 16_384,
} as const;

/** The connection bounds both token servers keep, from limits with --max-connections-per-source; tests shorten them. */
export interface ServerBounds {
  maxConnections: number;
  maxConnectionsPerSource: number;
  maxDeferredRequests: number;
  maxDeferredBytes: number;
  maxDeferredBytesPerConnection: number;
  writeTimeoutMs: number;
}

export function serverBounds(maxConnectionsPerSource: number = limits.maxConnectionsPerSource): ServerBounds {
  const { maxConnections, maxDeferredRequests, maxDeferredBytes, maxDeferredBytesPerConnection, writeTimeoutMs } = limits;
  return { maxConnections, maxConnectionsPerSource, maxDeferredRequests, maxDeferredBytes, maxDeferredBytesPerConnection, writeTimeoutMs };
}
