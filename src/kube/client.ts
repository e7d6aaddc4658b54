// The API server over undici, for every part of nmi that talks to it (the
// custom resources, the start gate, pod events). TLS and auth are read from the config's
// files on every request: the service account token and certificates rotate.
import { TlsAgent } from '../net/tls-agent.js';
import { Agent, request, type Dispatcher } from '../net/undici.js';
import { codes, NmiError, messageOf } from '../errors/errors.js';
import { kubeCredentials, type KubeConfig } from './kubeconfig.js';

const requestTimeoutMs = 30_000; // for everything but a watch's body

/** A non-2xx answer from the API server. */
/** The longest an API server's Retry-After holds nmi back: a wrong header must not silence it for hours. */
const MAX_RETRY_AFTER_MS = 10 * 60_000;

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

/** Retry-After in seconds (the API server sends no dates), capped; undefined when absent or not a number. */
function retryAfterMs(header: string | string[] | undefined): number | undefined {
  const seconds = Number(Array.isArray(header) ? header[0] : header);
  return header !== undefined && Number.isFinite(seconds) && seconds >= 0 ? Math.min(seconds * 1000, MAX_RETRY_AFTER_MS) : undefined;
}

export class KubeClient {
  readonly server: string;
  readonly #config: KubeConfig;
  readonly #userAgent: string;
  readonly #agent = new TlsAgent((tls) => new Agent({ connect: tls }));

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

  async getJson(path: string, signal: AbortSignal): Promise<unknown> {
    const res = await this.open(path, signal);
    return res.body.json();
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
