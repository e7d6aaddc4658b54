// The API server over undici, for every part of nmi that talks to it (the
// custom resources, the start gate, pod events). TLS and auth are read from the config's
// files on every request: the service account token and certificates rotate.
import { TlsAgent } from '../net/tls-agent.js';
import { Agent, request, type Dispatcher } from '../net/undici.js';
import { codes, NmiError, messageOf } from '../errors/errors.js';
import { kubeCredentials, type KubeConfig } from './kubeconfig.js';

const requestTimeoutMs = 30_000; // for everything but a watch's body

/**
 * Connections to the API server at once: the three watches hold one each (HTTP/1.1), the rest share the
 * others and queue in undici when all are busy. A node never opens one per request.
 */
const MAX_CONNECTIONS = 8;
/** An idle connection is kept this long (Go's API server closes idle ones after 90 s), so periodic reads reuse it. */
const IDLE_MS = 60_000;
/** The most a JSON answer may hold unless the caller says otherwise: one list page, one object. */
export const MAX_ANSWER_BYTES = 4 * 1024 * 1024;

/** The longest an API server's Retry-After holds nmi back: a wrong header must not silence it for hours. */
const MAX_RETRY_AFTER_MS = 10 * 60_000;

/** A non-2xx answer from the API server. */
export class ApiError extends NmiError {
  readonly status: number;
  /** The API server's Retry-After (a 429 under its flow control, or a 5xx), when it sent one. */
  readonly retryAfterMs: number | undefined;
  constructor(status: number, text: string, retryAfterMs?: number) {
    super(codes.API_SERVER, text);
    this.name = 'ApiError';
    this.status = status;
    this.retryAfterMs = retryAfterMs;
  }
}

/** An answer longer than the caller's bound; not read past it. */
export class TooLargeError extends NmiError {
  constructor(
    readonly path: string,
    readonly maxBytes: number,
  ) {
    super(codes.API_SERVER, `GET ${path.split('?')[0]}: the answer is over ${maxBytes} bytes`);
    this.name = 'TooLargeError';
  }
}

/** Retry-After in seconds (the API server sends no dates), capped; undefined when absent or not a number. */
function retryAfterMs(header: string | string[] | undefined): number | undefined {
  const seconds = Number(Array.isArray(header) ? header[0] : header);
  return header !== undefined && Number.isFinite(seconds) && seconds >= 0 ? Math.min(seconds * 1000, MAX_RETRY_AFTER_MS) : undefined;
}

export class KubeClient {
  readonly server: string;
  readonly #config: KubeConfig;
  readonly #userAgent: string;
  readonly #agent = new TlsAgent((tls) => new Agent({ connect: tls, connections: MAX_CONNECTIONS, keepAliveTimeout: IDLE_MS, keepAliveMaxTimeout: IDLE_MS }));

  constructor(config: KubeConfig, userAgent: string) {
    this.server = config.server;
    this.#config = config;
    this.#userAgent = userAgent;
  }

  async #prepare(): Promise<{ dispatcher: Agent; headers: Record<string, string> }> {
    const { tls, headers } = await kubeCredentials(this.#config);
    // In-flight requests (a watch) finish on the old agent.
    return { dispatcher: this.#agent.for(tls), headers: { accept: 'application/json', 'user-agent': this.#userAgent, ...headers } };
  }

  /** Fails early when the credentials named by the config cannot be read. */
  async check(): Promise<void> {
    try {
      await this.#prepare();
    } catch (err) {
      throw new NmiError(codes.API_SERVER, `API server credentials: ${messageOf(err)}`, { cause: err });
    }
  }

  /** A GET whose body the caller reads (or streams); non-2xx answers throw ApiError. */
  open(path: string, signal: AbortSignal, bodyTimeout = requestTimeoutMs): Promise<Dispatcher.ResponseData> {
    return this.#send('GET', path, signal, bodyTimeout);
  }

  /** Parsed JSON; an answer over maxBytes is cut off unread past the bound and throws TooLargeError. */
  async getJson(path: string, signal: AbortSignal, maxBytes = MAX_ANSWER_BYTES): Promise<unknown> {
    const res = await this.open(path, signal);
    if (Number(res.headers['content-length'] ?? 0) > maxBytes) {
      res.body.destroy();
      throw new TooLargeError(path, maxBytes);
    }
    const chunks: Buffer[] = [];
    let bytes = 0;
    for await (const chunk of res.body as AsyncIterable<Buffer>) {
      bytes += chunk.length;
      if (bytes > maxBytes) {
        res.body.destroy();
        throw new TooLargeError(path, maxBytes);
      }
      chunks.push(chunk);
    }
    return JSON.parse(Buffer.concat(chunks, bytes).toString('utf8'));
  }

  /** A JSON merge patch (RFC 7386); the object as stored after it. */
  async mergePatch(path: string, patch: object, signal: AbortSignal): Promise<unknown> {
    const res = await this.#send('PATCH', path, signal, requestTimeoutMs, { contentType: 'application/merge-patch+json', body: JSON.stringify(patch) });
    return res.body.json();
  }

  /** Creates an object; the object as stored. */
  async create(path: string, object: object, signal: AbortSignal): Promise<unknown> {
    const res = await this.#send('POST', path, signal, requestTimeoutMs, { contentType: 'application/json', body: JSON.stringify(object) });
    return res.body.json();
  }

  async #send(
    method: 'GET' | 'PATCH' | 'POST',
    path: string,
    signal: AbortSignal,
    bodyTimeout: number,
    payload?: { contentType: string; body: string },
  ): Promise<Dispatcher.ResponseData> {
    const { dispatcher, headers } = await this.#prepare();
    const res = await request(`${this.server}${path}`, {
      method,
      dispatcher,
      headers: payload ? { ...headers, 'content-type': payload.contentType } : headers,
      body: payload?.body,
      signal,
      headersTimeout: requestTimeoutMs,
      bodyTimeout,
    });
    if (res.statusCode >= 200 && res.statusCode < 300) return res;
    const text = await res.body.text().catch(() => '');
    let reason = text.slice(0, 200);
    try {
      const status = JSON.parse(text) as { reason?: string; message?: string };
      reason = [status.reason, status.message].filter(Boolean).join(': ');
    } catch {
      // Not a Status object: keep the start of the text.
    }
    throw new ApiError(res.statusCode, `${method} ${path.split('?')[0]}: ${res.statusCode} ${reason}`.trim(), retryAfterMs(res.headers['retry-after']));
  }

  async close(): Promise<void> {
    await this.#agent.close('destroy');
  }
}
