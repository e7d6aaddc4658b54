// A stand-in Entra ID (login.microsoftonline.com) on https://127.0.0.1:<port>,
// serving with a certificate from a throwaway CA (pki.ts); clients trust entra.caPem.
//
//   const entra = await startEntra();                 // entra.url = 'https://127.0.0.1:<port>'
//   entra.register({ tenantId, clientId, clientSecret })          // or certificatePem
//   entra.federate({ tenantId, clientId, issuer, subject, audience? })   // a federated identity credential
//   POST /<tenant>/oauth2/v2.0/token  grant_type=client_credentials, scope=<resource>/.default,
//     client_id + client_secret, or client_assertion (a JWT signed with the registered
//     certificate's key: signature, x5t/x5t#S256, aud, iss, sub, exp checked)
//     → 200 {token_type, expires_in, ext_expires_in, access_token} (decodeStandinToken reads it)
//     wrong secret or assertion → 401 invalid_client; unknown client → 400 unauthorized_client;
//     unknown tenant → 400 invalid_request; scope not ending in /.default → 400 invalid_scope.
//   Workload ID federation: a client_assertion whose iss is not the client id, for an app with
//     federated credentials, is checked as Entra ID does: credentials with its iss (else 401
//     AADSTS700211), the issuer's <iss>/.well-known/openid-configuration and jwks_uri fetched over
//     HTTPS trusting the pki's CA, cached per issuer (unreachable → 400 AADSTS50166), the kid's key
//     (missing → 401 AADSTS7000272), the RS256 signature (→ 401 AADSTS700027), exp/nbf (→ 401
//     AADSTS700024), then subject (→ 401 AADSTS700213) and audience (→ 401 AADSTS700212), case-sensitive;
//     not a JWT → 400 AADSTS50027. The token's identity is `fic:<tenant>/<client id>/<subject>`.
//   GET /<tenant>/v2.0/.well-known/openid-configuration, GET /common/discovery/instance:
//     the documented shapes; counted in entra.discoveryCalls.
//   entra.failNext(n, { status, body?, headers? }); entra.hang(true) holds token calls, hang(false) answers them;
//   entra.calls, entra.requests (client_secret and client_assertion redacted), entra.issuerFetches.
//   startEntra({ throttle: { maxConcurrent, perSecond, latencyMs } }): per tenant, 429 past them;
//   entra.throttled() sums the 429s answered.
//   createRsaCertificate(pki, cn, password?) makes an RSA client certificate (msal signs with RSA only).
//   await entra.close()
import { constants, createHash, createPublicKey, randomUUID, verify, X509Certificate } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import { Agent, createServer, get, type Server } from 'node:https';
import type { ServerResponse } from 'node:http';
import path from 'node:path';
import { Faults, Throttle, type Failure, type ThrottleLimits } from './faults.js';
import { issueStandinToken, standinTokenIds, type StandinRequest } from './imds.js';
import { createPki, type Pki } from './pki.js';

export interface EntraApp {
  tenantId: string;
  clientId: string;
  clientSecret?: string;
  /** PEM certificate whose key signs client assertions. */
  certificatePem?: string;
}

/** A federated identity credential on an app registration: tokens of this issuer and subject are the app's. */
export interface FederatedCredential {
  tenantId: string;
  clientId: string;
  /** Compared with the assertion's iss exactly. */
  issuer: string;
  /** Compared with the assertion's sub exactly, e.g. system:serviceaccount:<namespace>:<name>. */
  subject: string;
  /** One of the assertion's aud must be this [api://AzureADTokenExchange]. */
  audience?: string;
}

export const tokenExchangeAudience = 'api://AzureADTokenExchange';

export interface EntraOptions {
  /** Where the serving certificate comes from; a fresh PKI (removed on close) when absent. */
  pki?: Pki;
  /** Token lifetime in seconds [3599, like Entra ID]. */
  expiresInSec?: number;
  /** Limits on token calls per tenant: 429 past them. */
  throttle?: ThrottleLimits;
  /** CA (PEM) trusted when fetching a federated issuer's discovery document and keys [the pki's]. */
  issuerCaPem?: string;
}

export interface EntraStandin {
  url: string;
  caPem: string;
  register(app: EntraApp): void;
  /** Adds a federated identity credential, creating the app (with no secret or certificate) if needed. */
  federate(credential: FederatedCredential): void;
  /** GETs made to federated issuers (discovery documents and JWKS), cache misses only. */
  readonly issuerFetches: number;
  /** Token calls so far (hung ones included). */
  readonly calls: number;
  /** Discovery and OIDC metadata calls so far. */
  readonly discoveryCalls: number;
  readonly requests: StandinRequest[];
  failNext(n: number, failure: Failure): void;
  /** While on, token calls wait; turning it off answers those still connected. */
  hang(on: boolean): void;
  expiresInSec: number;
  /** 429s answered for the throttle, all tenants, and the most calls one tenant had in flight at once. */
  throttled(): { count: number; peakConcurrent: number };
  close(): Promise<void>;
}

export const assertionType = 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer';

/** How far an assertion's exp and nbf may be off the stand-in's clock. */
const assertionSkewSec = 60;

/** How Entra ID's "no matching federated identity record" errors end, after "Please check" or "Check". */
const credentialHint = 'your federated identity credential Subject, Audience and Issuer against the presented assertion. https://learn.microsoft.com/entra/workload-id/workload-identity-federation';

type Refusal = { status: number; body: unknown };
/** An issuer's signing key as its JWKS document lists it (WebCrypto's JsonWebKey has no kid). */
type Jwk = JsonWebKey & { kid?: string };

export async function startEntra(options: EntraOptions = {}): Promise<EntraStandin> {
  const pki = options.pki ?? createPki('entra');
  const serving = pki.server('127.0.0.1', ['127.0.0.1', 'localhost']);
  const apps = new Map<string, EntraApp>();
  const requests: StandinRequest[] = [];
  const faults = new Faults();
  let calls = 0;
  let discoveryCalls = 0;
  let serial = 0;
  let base = '';
  const standin = { expiresInSec: options.expiresInSec ?? 3599 };
  const throttles = new Map<string, Throttle>();
  const federated = new Map<string, FederatedCredential[]>();
  // Per issuer, its JWKS keys: Entra ID caches them too, and fetches again for a kid it does not know.
  const issuerKeys = new Map<string, Jwk[]>();
  let issuerFetches = 0;
  const issuerAgent = new Agent({ ca: options.issuerCaPem ?? pki.caPem, keepAlive: false });

  const server: Server = createServer({ cert: serving.certPem, key: serving.keyPem }, async (req, res) => {
    const url = new URL(req.url ?? '/', 'https://entra');
    const chunks: Buffer[] = [];
    for await (const chunk of req) chunks.push(chunk as Buffer);
    const form = req.method === 'POST' ? Object.fromEntries(new URLSearchParams(Buffer.concat(chunks).toString('utf8'))) : {};
    // Both are credentials: a client assertion (a service account token) signs in as the app for as long as it lives.
    const recorded = { ...form, ...(form.client_secret ? { client_secret: '[redacted]' } : {}), ...(form.client_assertion ? { client_assertion: '[redacted]' } : {}) };
    requests.push({ method: req.method ?? '', path: url.pathname, query: Object.fromEntries(url.searchParams), headers: req.headers, form: recorded });
    if (requests.length > 100) requests.shift();

    const [, tenant, ...rest] = url.pathname.split('/');
    const route = rest.join('/');
    if (req.method === 'GET' && route === 'v2.0/.well-known/openid-configuration' && tenant) {
      discoveryCalls++;
      return send(res, 200, openIdConfiguration(base, tenant));
    }
    if (req.method === 'GET' && tenant === 'common' && route === 'discovery/instance') {
      discoveryCalls++;
      const host = new URL(base).host;
      return send(res, 200, {
        tenant_discovery_endpoint: `${base}/common/v2.0/.well-known/openid-configuration`,
        'api-version': '1.1',
        metadata: [{ preferred_network: host, preferred_cache: host, aliases: [host] }],
      });
    }
    if (req.method !== 'POST' || route !== 'oauth2/v2.0/token' || !tenant) {
      return send(res, 404, entraError('invalid_request', 90001, `no such endpoint ${req.method} ${url.pathname}`));
    }
    calls++;
    if (options.throttle) {
      let throttle = throttles.get(tenant);
      if (!throttle) throttles.set(tenant, (throttle = new Throttle(options.throttle)));
      if (!throttle.admit()) return send(res, 429, entraError('temporarily_unavailable', 50196, 'The server is temporarily throttling requests.'));
      throttle.until(res);
    }
    const answer = (): void => void answerToken(res, tenant, form, `${base}${url.pathname}`);
    const latency = options.throttle?.latencyMs ?? 0;
    faults.run(latency > 0 ? () => setTimeout(answer, latency) : answer);
  });

  async function answerToken(res: ServerResponse, tenant: string, form: Record<string, string>, tokenUrl: string): Promise<void> {
    if (res.destroyed) return;
    const failure = faults.next();
    if (failure) return send(res, failure.status, failure.body ?? entraError(failure.status === 429 ? 'temporarily_unavailable' : 'server_error', 50001, 'programmed failure'), failure.headers);
    const outcome = await grant(tenant, form, tokenUrl);
    if (res.destroyed) return;
    if ('status' in outcome) return send(res, outcome.status, outcome.body);
    const now = Math.floor(Date.now() / 1000);
    const access = issueStandinToken({
      aud: outcome.scope.slice(0, -'/.default'.length),
      appid: outcome.app.clientId,
      identity: outcome.identity,
      serial: ++serial,
      ...standinTokenIds(outcome.identity),
      iat: now,
      nbf: now,
      exp: now + standin.expiresInSec,
    });
    send(res, 200, { token_type: 'Bearer', expires_in: standin.expiresInSec, ext_expires_in: standin.expiresInSec, access_token: access });
  }

  async function grant(tenant: string, form: Record<string, string>, tokenUrl: string): Promise<{ app: EntraApp; scope: string; identity: string } | Refusal> {
    if (![...apps.values()].some((a) => a.tenantId === tenant)) {
      return { status: 400, body: entraError('invalid_request', 90002, `Tenant '${tenant}' not found.`) };
    }
    if (form.grant_type !== 'client_credentials') return { status: 400, body: entraError('unsupported_grant_type', 70003, 'The app requested an unsupported grant type.') };
    const app = apps.get(`${tenant}/${form.client_id ?? ''}`);
    if (!app) return { status: 400, body: entraError('unauthorized_client', 700016, `Application with identifier '${form.client_id}' was not found in the directory '${tenant}'.`) };
    const scope = form.scope ?? '';
    if (!scope.endsWith('/.default') || scope.includes(' ')) return { status: 400, body: entraError('invalid_scope', 1002012, `The provided value for scope ${scope} is not valid.`) };
    if (form.client_secret !== undefined) {
      if (form.client_secret !== app.clientSecret) return { status: 401, body: entraError('invalid_client', 7000215, 'Invalid client secret provided.') };
    } else if (form.client_assertion_type === assertionType && form.client_assertion) {
      const credentials = federated.get(`${tenant}/${app.clientId}`) ?? [];
      // An app's own certificate-signed assertion says iss = its client id; anything else is an external token.
      if (credentials.length > 0 && parsePart(form.client_assertion.split('.')[1] ?? '')?.iss !== app.clientId) {
        const checked = await checkFederated(form.client_assertion, credentials);
        if ('status' in checked) return checked;
        return { app, scope, identity: `fic:${tenant}/${app.clientId}/${checked.subject}` };
      }
      const problem = checkAssertion(form.client_assertion, app, tokenUrl);
      if (problem) return { status: 401, body: entraError('invalid_client', 700027, `Client assertion failed signature validation: ${problem}`) };
    } else {
      return { status: 401, body: entraError('invalid_client', 7000218, "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.") };
    }
    return { app, scope, identity: `sp:${tenant}/${app.clientId}` };
  }

  /** Workload ID federation: the external token checked against the app's federated credentials, in Entra ID's order. */
  async function checkFederated(assertion: string, credentials: FederatedCredential[]): Promise<{ subject: string } | Refusal> {
    const refuse = (status: number, error: string, code: number, description: string): Refusal => ({ status, body: entraError(error, code, description) });
    const malformed = refuse(400, 'invalid_request', 50027, 'JWT token is invalid or malformed.');
    const [headerPart = '', payloadPart = '', signaturePart = '', ...extra] = assertion.split('.');
    const header = parsePart(headerPart);
    const claims = parsePart(payloadPart);
    if (extra.length > 0 || !header || !claims || typeof claims.iss !== 'string' || typeof claims.exp !== 'number') return malformed;
    const { iss } = claims;
    const sub = typeof claims.sub === 'string' ? claims.sub : '';
    const aud = typeof claims.aud === 'string' ? [claims.aud] : Array.isArray(claims.aud) ? claims.aud.filter((a): a is string => typeof a === 'string') : [];

    const trusted = credentials.filter((c) => c.issuer === iss);
    if (trusted.length === 0) return refuse(401, 'invalid_client', 700211, `No matching federated identity record found for presented assertion issuer '${iss}'. Please check ${credentialHint}`);

    const kid = typeof header.kid === 'string' ? header.kid : '';
    const unreachable = refuse(400, 'invalid_request', 50166, 'Request to External OIDC endpoint failed.');
    let keys = issuerKeys.get(iss) ?? (await fetchIssuerKeys(iss));
    if (!keys) return unreachable;
    if (!keys.some((k) => k.kid === kid)) keys = await fetchIssuerKeys(iss);
    if (!keys) return unreachable;
    const jwk = keys.find((k) => k.kid === kid);
    if (!jwk) {
      return refuse(401, 'invalid_client', 7000272, `The certificate with identifier ${kid} used to sign the federated credential could not be found in the metadata of identity provider ${iss}. Please validate that your Identity Provider's metadata exposes the key used to sign the incoming token.`);
    }
    let valid = false;
    try {
      valid = header.alg === 'RS256' && verify('sha256', Buffer.from(`${headerPart}.${payloadPart}`), createPublicKey({ key: jwk, format: 'jwk' }), Buffer.from(signaturePart, 'base64url'));
    } catch {
      valid = false;
    }
    if (!valid) return refuse(401, 'invalid_client', 700027, 'Client assertion failed signature validation.');

    const now = Date.now() / 1000;
    const nbf = typeof claims.nbf === 'number' ? claims.nbf : 0;
    if (claims.exp + assertionSkewSec <= now || nbf - assertionSkewSec > now) {
      return refuse(
        401,
        'invalid_client',
        700024,
        `Client assertion is not within its valid time range. Current time: ${entraTime(now)}, assertion valid from ${entraTime(nbf)}, expiry time of assertion ${entraTime(claims.exp)}. Review the documentation at https://learn.microsoft.com/entra/identity-platform/certificate-credentials .`,
      );
    }

    const bySubject = trusted.filter((c) => c.subject === sub);
    if (bySubject.length === 0) return refuse(401, 'invalid_client', 700213, `No matching federated identity record found for presented assertion subject '${sub}'. Check ${credentialHint}`);
    if (!bySubject.some((c) => aud.includes(c.audience ?? tokenExchangeAudience))) {
      return refuse(401, 'invalid_client', 700212, `No matching federated identity record found for presented assertion audience '${aud.join(',')}'. Please check ${credentialHint}`);
    }
    return { subject: sub };
  }

  /** The issuer's keys from its discovery document's jwks_uri, or undefined when either cannot be had. */
  async function fetchIssuerKeys(iss: string): Promise<Jwk[] | undefined> {
    try {
      const configuration = await getJson(`${iss.replace(/\/$/, '')}/.well-known/openid-configuration`);
      // OpenID Connect Discovery 1.0 §4.3: the document must name the issuer it was fetched for.
      if (configuration.issuer !== iss || typeof configuration.jwks_uri !== 'string') return undefined;
      const jwks = await getJson(configuration.jwks_uri);
      if (!Array.isArray(jwks.keys)) return undefined;
      const keys = jwks.keys as Jwk[];
      issuerKeys.set(iss, keys);
      return keys;
    } catch {
      return undefined;
    }
  }

  function getJson(url: string): Promise<Record<string, unknown>> {
    issuerFetches++;
    return new Promise((resolve, reject) => {
      const req = get(url, { agent: issuerAgent, timeout: 5000 }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (chunk: Buffer) => chunks.push(chunk));
        res.on('error', reject);
        res.on('end', () => {
          if (res.statusCode !== 200) return reject(new Error(`${url} answered ${res.statusCode}`));
          try {
            const body = JSON.parse(Buffer.concat(chunks).toString('utf8')) as unknown;
            if (typeof body !== 'object' || body === null) return reject(new Error(`${url}: not a JSON object`));
            resolve(body as Record<string, unknown>);
          } catch (err) {
            reject(err instanceof Error ? err : new Error(String(err)));
          }
        });
      });
      req.on('timeout', () => req.destroy(new Error(`${url}: no answer in 5 s`)));
      req.on('error', reject);
    });
  }

  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  base = `https://127.0.0.1:${(server.address() as { port: number }).port}`;

  return {
    url: base,
    caPem: pki.caPem,
    register(app: EntraApp) {
      apps.set(`${app.tenantId}/${app.clientId}`, app);
    },
    federate(credential: FederatedCredential) {
      const key = `${credential.tenantId}/${credential.clientId}`;
      if (!apps.has(key)) apps.set(key, { tenantId: credential.tenantId, clientId: credential.clientId });
      federated.set(key, [...(federated.get(key) ?? []), { ...credential }]);
    },
    get issuerFetches() {
      return issuerFetches;
    },
    get calls() {
      return calls;
    },
    get discoveryCalls() {
      return discoveryCalls;
    },
    requests,
    get expiresInSec() {
      return standin.expiresInSec;
    },
    set expiresInSec(value: number) {
      standin.expiresInSec = value;
    },
    throttled() {
      const all = [...throttles.values()];
      return { count: all.reduce((n, t) => n + t.throttled, 0), peakConcurrent: Math.max(0, ...all.map((t) => t.peakConcurrent)) };
    },
    failNext: (n: number, failure: Failure) => faults.failNext(n, failure),
    hang: (on: boolean) => faults.hang(on),
    async close() {
      faults.clear();
      issuerAgent.destroy();
      server.closeAllConnections();
      server.close();
      await once(server, 'close');
      if (!options.pki) pki.remove();
    },
  };
}

/** Why the assertion is not acceptable, or undefined when it is. */
function checkAssertion(assertion: string, app: EntraApp, tokenUrl: string): string | undefined {
  if (!app.certificatePem) return 'no certificate registered';
  const [headerPart, payloadPart, signaturePart] = assertion.split('.');
  if (!headerPart || !payloadPart || signaturePart === undefined) return 'not a JWT';
  const header = parsePart(headerPart);
  const claims = parsePart(payloadPart);
  if (!header || !claims) return 'unreadable JWT';
  const cert = new X509Certificate(app.certificatePem);
  const thumbprint = (algorithm: 'sha1' | 'sha256'): string => createHash(algorithm).update(cert.raw).digest('base64url');
  if (header['x5t#S256'] !== undefined ? header['x5t#S256'] !== thumbprint('sha256') : header.x5t !== thumbprint('sha1')) return 'thumbprint does not match';
  const signed = Buffer.from(`${headerPart}.${payloadPart}`);
  const signature = Buffer.from(signaturePart, 'base64url');
  const key = cert.publicKey;
  const valid =
    header.alg === 'RS256'
      ? verify('sha256', signed, key, signature)
      : header.alg === 'PS256'
        ? verify('sha256', signed, { key, padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: constants.RSA_PSS_SALTLEN_AUTO }, signature)
        : false;
  if (!valid) return `bad ${String(header.alg)} signature`;
  const now = Math.floor(Date.now() / 1000);
  if (claims.aud !== tokenUrl) return `aud ${String(claims.aud)} is not ${tokenUrl}`;
  if (claims.iss !== app.clientId || claims.sub !== app.clientId) return 'iss and sub must be the client id';
  if (typeof claims.exp !== 'number' || claims.exp <= now) return 'expired';
  if (typeof claims.nbf === 'number' && claims.nbf > now + 300) return 'not yet valid';
  return undefined;
}

function parsePart(part: string): Record<string, unknown> | undefined {
  try {
    const value = JSON.parse(Buffer.from(part, 'base64url').toString('utf8')) as unknown;
    return typeof value === 'object' && value !== null && !Array.isArray(value) ? (value as Record<string, unknown>) : undefined;
  } catch {
    return undefined;
  }
}

/** Times as Entra ID's messages print them: 2024-10-02T22:05:03.6755165Z. */
function entraTime(sec: number): string {
  return new Date(Math.floor(sec * 1000)).toISOString().replace(/Z$/, '0000Z');
}

function openIdConfiguration(base: string, tenant: string): Record<string, unknown> {
  const authority = `${base}/${tenant}`;
  return {
    token_endpoint: `${authority}/oauth2/v2.0/token`,
    token_endpoint_auth_methods_supported: ['client_secret_post', 'private_key_jwt', 'client_secret_basic'],
    jwks_uri: `${authority}/discovery/v2.0/keys`,
    response_modes_supported: ['query', 'fragment', 'form_post'],
    subject_types_supported: ['pairwise'],
    id_token_signing_alg_values_supported: ['RS256'],
    response_types_supported: ['code', 'id_token', 'code id_token', 'id_token token'],
    scopes_supported: ['openid', 'profile', 'email', 'offline_access'],
    issuer: `${authority}/v2.0`,
    request_uri_parameter_supported: false,
    authorization_endpoint: `${authority}/oauth2/v2.0/authorize`,
    device_authorization_endpoint: `${authority}/oauth2/v2.0/devicecode`,
    http_logout_supported: true,
    frontchannel_logout_supported: true,
    end_session_endpoint: `${authority}/oauth2/v2.0/logout`,
    claims_supported: ['sub', 'iss', 'aud', 'exp', 'iat', 'nbf', 'tid'],
    tenant_region_scope: 'EU',
    cloud_instance_name: 'microsoftonline.com',
  };
}

function entraError(error: string, code: number, description: string): Record<string, unknown> {
  const traceId = randomUUID();
  const correlationId = randomUUID();
  return {
    error,
    error_description: `AADSTS${code}: ${description} Trace ID: ${traceId} Correlation ID: ${correlationId} Timestamp: ${new Date().toISOString()}`,
    error_codes: [code],
    timestamp: new Date().toISOString(),
    trace_id: traceId,
    correlation_id: correlationId,
  };
}

function send(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', ...headers });
  res.end(JSON.stringify(body));
}

export interface RsaCertificate {
  /** Certificate then private key, PEM: what a type-2 identity's secret `certificate` holds here. */
  bundlePem: string;
  certificatePem: string;
}

/** A self-signed RSA client certificate; with password the key is PKCS#8-encrypted (AES-256). */
export function createRsaCertificate(pki: Pki, cn: string, password?: string): RsaCertificate {
  const key = path.join(pki.dir, `rsa-${cn}.key`);
  const cert = path.join(pki.dir, `rsa-${cn}.crt`);
  const run = (args: string[], env?: Record<string, string>): void => {
    execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, ...env } });
  };
  run(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert, '-days', '2', '-subj', `/CN=${cn}`]);
  let keyPem = readFileSync(key, 'utf8');
  if (password) {
    const encrypted = `${key}.enc`;
    run(['pkcs8', '-topk8', '-v2', 'aes-256-cbc', '-in', key, '-out', encrypted, '-passout', 'env:NMI_TEST_KEY_PASSWORD'], { NMI_TEST_KEY_PASSWORD: password });
    keyPem = readFileSync(encrypted, 'utf8');
  }
  const certificatePem = readFileSync(cert, 'utf8');
  return { bundlePem: `${certificatePem}${keyPem}`, certificatePem };
}
