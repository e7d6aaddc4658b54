// The token servers' limits, shared by the js server (its worker thread), the
// native one and the token core.
export const limits = {
  maxHeaderSize: 16 * 1024, // bytes, request line + headers
  headersTimeoutMs: 10_000, // to receive the headers
  requestTimeoutMs: 30_000, // to receive the whole request
  maxBodyBytes: 1024 * 1024, // request bodies (proxied categories only), as native/http-parse.h's kMaxBodyBytes
  keepAliveTimeoutMs: 5_000, // idle keep-alive connection
  maxConnections: 4_096,
  backlog: 511, // connections the kernel queues unaccepted: what waits there while nmi restarts
  drainTimeoutMs: 10_000, // close(): in-flight requests get this long
  proxyTimeoutMs: 10_000,
  upstreamRetryAfterS: 5, // when the upstream gave no Retry-After
  budgetWaitMs: 10_000, // a first token that gets no turn upstream in this long is answered 429
} as const;
