// A stand-in Azure IMDS on 127.0.0.1:<port>, plain HTTP as the real one.
//
//   const imds = await startImds();            // imds.url = 'http://127.0.0.1:<port>'
//   GET /metadata/identity/oauth2/token[/]?api-version=...&resource=...[&client_id|msi_res_id|mi_res_id|object_id=...]
//     with `Metadata: true` → 200 with IMDS's answer (every value a string); the access
//     token is a JWT-shaped string whose payload says whose it is: decodeStandinToken(t).
//   imds.failNext(2, { status: 429, headers: { 'retry-after': '1' } })  // next 2 token calls fail
//   imds.hang(true)                             // token calls wait; hang(false) answers the ones still connected
//   imds.calls                                  // token calls so far; imds.requests: every request (last 100)
//   startImds({ throttle: { maxConcurrent: 5, perSecond: 20, latencyMs: 50 } })
//                                               // IMDS's documented limits: 429 past them; imds.throttle.throttled counts
//   GET /metadata/instance, /metadata/versions, ... → small JSON; other paths → 404 JSON.
//   startImds({ reply: FIXED_REPLY }), imds.reply = { status, headers, body } | 'hang'
//                                               // every request answered so (or never), as IMDS
//                                               // behind nmi's proxy; imds.requests keep url and body
//   await imds.close()
import { createHash, randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { createServer, type IncomingHttpHeaders, type ServerResponse } from 'node:http';
import { Faults, Throttle, type Failure, type ThrottleLimits } from './faults.js';

export type { Failure };

export interface StandinRequest {
  method: string;
  path: string;
  query: Record<string, string>;
  headers: IncomingHttpHeaders;
  /** POST bodies as form fields (secrets redacted); {} for GET. */
  form: Record<string, string>;
}

/** What a stand-in token says about itself. */
export interface StandinTokenClaims {
  /** The resource (IMDS) or scope without /.default (Entra). */
  aud: string;
  /** Client id the token was issued to. */
  appid: string;
  /** `client_id:<id>`, `msi_res_id:<id>`, `object_id:<id>`, `system`, or `sp:<tenant>/<client id>`. */
  identity: string;
  /** Per stand-in, counts tokens issued: 1, 2, ... */
  serial: number;
  /** Unique per token, as Entra ID's (its sign-in logs' UniqueTokenIdentifier). */
  uti: string;
  /** The identity's object (principal) id. */
  oid: string;
  iat: number;
  nbf: number;
  exp: number;
}

/** What the IMDS stand-in saw: also the request target as sent, and the body. */
export interface ImdsRequest extends StandinRequest {
  url: string;
  body: string;
}

/** One answer given to every request, whatever it asks (the proxy tests' upstream). */
export interface FixedReply {
  status: number;
  headers?: Record<string, string>;
  body?: string;
}

export const FIXED_REPLY: FixedReply = {
  status: 200,
  headers: { 'Content-Type': 'application/json; charset=utf-8', 'X-Upstream': 'imds-standin' },
  body: '{"compute":{"name":"standin"}}',
};

export interface MsiRecord {
  clientId: string;
  resourceId?: string;
  objectId?: string;
}

export interface ImdsOptions {
  /** Token lifetime in seconds [86399, like IMDS]. */
  expiresInSec?: number;
  /** Known identities; when given, unknown ids get IMDS's 400 "Identity not found". */
  identities?: MsiRecord[];
  /** Seconds since the epoch, for expires_on/not_before. */
  nowSec?: () => number;
  /** Where to listen [127.0.0.1, any port]; the eBPF tests put it where the real IMDS is. */
  host?: string;
  port?: number;
  /** Limits on token calls, enforced as IMDS does: 429 past them. */
  throttle?: ThrottleLimits;
  /** Answers every request so, or never ('hang'), instead of as IMDS would. */
  reply?: FixedReply | 'hang';
}

export interface ImdsStandin {
  url: string;
  /** Token calls so far (held ones included; not those given a fixed reply). */
  readonly calls: number;
  /** The last 100 requests, each once its body has arrived; a test may start it afresh ([]). */
  requests: ImdsRequest[];
  /** While set, every request gets this answer (or none: 'hang'). */
  reply: FixedReply | 'hang' | undefined;
  failNext(n: number, failure: Failure): void;
  /** While on, token calls wait; turning it off answers those still connected. */
  hang(on: boolean): void;
  expiresInSec: number;
  /** With options.throttle: its counts. */
  readonly throttle: Throttle | undefined;
  close(): Promise<void>;
}

const tokenPaths = new Set(['/metadata/identity/oauth2/token', '/metadata/identity/oauth2/token/']);

export async function startImds(options: ImdsOptions = {}): Promise<ImdsStandin> {
  const nowSec = options.nowSec ?? (() => Math.floor(Date.now() / 1000));
  const known = options.identities;
  const faults = new Faults();
  let calls = 0;
  let serial = 0;
  const standin = { expiresInSec: options.expiresInSec ?? 86399, requests: [] as ImdsRequest[], reply: options.reply };
  const throttle = options.throttle && new Throttle(options.throttle);

  const server = createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://imds');
    const query = Object.fromEntries(url.searchParams);
    let body = '';
    req.setEncoding('utf8').on('data', (chunk: string) => (body += chunk));
    req.on('end', () => {
      standin.requests.push({ method: req.method ?? '', url: req.url ?? '', path: url.pathname, query, headers: req.headers, body, form: {} });
      if (standin.requests.length > 100) standin.requests.shift();
      answer(url.pathname, query, req.headers, res);
    });
  });

  function answer(path: string, query: Record<string, string>, headers: IncomingHttpHeaders, res: ServerResponse): void {
    const reply = standin.reply;
    if (reply === 'hang') return;
    if (reply) {
      res.writeHead(reply.status, reply.headers ?? {});
      return void res.end(reply.body ?? '');
    }
    if (!tokenPaths.has(path)) return metadata(path, res);
    calls++;
    if (headers.metadata !== 'true') return send(res, 400, imdsError('invalid_request', 'Required metadata header not specified'));
    if (throttle && !throttle.admit()) return send(res, 429, imdsError('too_many_requests', 'Too many requests'));
    if (throttle) throttle.until(res);
    const respond = (): void => answerToken(res, query);
    const latency = throttle?.limits.latencyMs ?? 0;
    faults.run(latency > 0 ? () => setTimeout(respond, latency) : respond);
  }

  function answerToken(res: ServerResponse, query: Record<string, string>): void {
    if (res.destroyed) return;
    const failure = faults.next();
    if (failure) return send(res, failure.status, failure.body ?? defaultBody(failure.status), failure.headers);
    if (!query['api-version']) return send(res, 400, imdsError('invalid_request', "Required query variable 'api-version' is missing"));
    if (!query.resource) return send(res, 400, imdsError('invalid_request', 'Required audience variable not specified'));
    const msi = identify(query, known);
    if (!msi) return send(res, 400, imdsError('invalid_request', 'Identity not found'));
    const now = nowSec();
    const expiresOn = now + standin.expiresInSec;
    const claims: StandinTokenClaims = { aud: query.resource, appid: msi.clientId, identity: msi.identity, serial: ++serial, ...standinTokenIds(msi.identity), iat: now, nbf: now, exp: expiresOn };
    send(res, 200, {
      access_token: issueStandinToken(claims),
      client_id: msi.clientId,
      expires_in: String(standin.expiresInSec),
      expires_on: String(expiresOn),
      ext_expires_in: String(standin.expiresInSec),
      not_before: String(now),
      resource: query.resource,
      token_type: 'Bearer',
    });
  }

  const host = options.host ?? '127.0.0.1';
  server.listen(options.port ?? 0, host);
  await once(server, 'listening');
  const { port } = server.address() as { port: number };

  return {
    url: port === 80 ? `http://${host}` : `http://${host}:${port}`,
    get calls() {
      return calls;
    },
    get requests() {
      return standin.requests;
    },
    set requests(value: ImdsRequest[]) {
      standin.requests = value;
    },
    get reply() {
      return standin.reply;
    },
    set reply(value: FixedReply | 'hang' | undefined) {
      standin.reply = value;
    },
    get expiresInSec() {
      return standin.expiresInSec;
    },
    set expiresInSec(value: number) {
      standin.expiresInSec = value;
    },
    throttle,
    failNext: (n: number, failure: Failure) => faults.failNext(n, failure),
    hang: (on: boolean) => faults.hang(on),
    async close() {
      faults.clear();
      server.closeAllConnections();
      server.close();
      await once(server, 'close');
    },
  };
}

function identify(query: Record<string, string>, known: MsiRecord[] | undefined): { clientId: string; identity: string } | undefined {
  const resourceId = query.msi_res_id ?? query.mi_res_id;
  const [param, id, field] = query.client_id
    ? (['client_id', query.client_id, 'clientId'] as const)
    : resourceId
      ? (['msi_res_id', resourceId, 'resourceId'] as const)
      : query.object_id
        ? (['object_id', query.object_id, 'objectId'] as const)
        : ([undefined, undefined, undefined] as const);
  if (!param || !id) return { clientId: 'system-assigned', identity: 'system' };
  if (known) {
    const msi = known.find((m) => m[field]?.toLowerCase() === id.toLowerCase());
    return msi && { clientId: msi.clientId, identity: `${param}:${id}` };
  }
  return { clientId: param === 'client_id' ? id : fakeGuid(id), identity: `${param}:${id}` };
}

function metadata(path: string, res: ServerResponse): void {
  if (path === '/metadata/instance' || path === '/metadata/instance/') {
    return send(res, 200, { compute: { name: 'standin-vm', location: 'westeurope', vmId: '00000000-0000-0000-0000-000000000001' }, network: { interface: [] } });
  }
  if (path === '/metadata/versions') return send(res, 200, { apiVersions: ['2018-02-01', '2019-08-01', '2021-02-01'] });
  if (path.startsWith('/metadata/')) return send(res, 200, { standin: true, path });
  send(res, 404, { error: 'not_found', error_description: `no such path ${path}` });
}

function imdsError(error: string, description: string): { error: string; error_description: string } {
  return { error, error_description: description };
}

function defaultBody(status: number): unknown {
  if (status === 429) return imdsError('too_many_requests', 'Too many requests');
  if (status >= 500) return imdsError('unknown_error', 'Internal server error');
  return imdsError('invalid_request', 'Bad request');
}

function send(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', ...headers });
  res.end(JSON.stringify(body));
}

/** A token's uti (random, 22 base64url characters as Entra ID's) and its identity's oid (a GUID derived from it). */
export function standinTokenIds(identity: string): { uti: string; oid: string } {
  return { uti: randomBytes(16).toString('base64url').slice(0, 22), oid: fakeGuid(`oid:${identity}`) };
}

/** A JWT-shaped, unsigned token carrying claims. */
export function issueStandinToken(claims: StandinTokenClaims): string {
  const part = (value: unknown): string => Buffer.from(JSON.stringify(value)).toString('base64url');
  return `${part({ alg: 'none', typ: 'JWT' })}.${part(claims)}.standin`;
}

export function decodeStandinToken(token: string): StandinTokenClaims {
  const payload = token.split('.')[1];
  if (!payload) throw new Error('not a stand-in token');
  return JSON.parse(Buffer.from(payload, 'base64url').toString('utf8')) as StandinTokenClaims;
}

function fakeGuid(seed: string): string {
  const h = createHash('sha256').update(seed).digest('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20, 32)}`;
}
