// Entra Workload ID federation between the two stand-ins, over real TLS: the API
// server's TokenRequest issues a signed service account token, Entra ID fetches the
// issuer's discovery document and JWKS anonymously and trades the token for its own.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, createPublicKey, generateKeyPairSync, sign, verify } from 'node:crypto';
import { request } from 'node:https';
import { ConfidentialClientApplication, ServerError } from '@azure/msal-node';
import { NetworkClient } from '../../src/tokens/network-client.js';
import { startApiServer, type ApiServer, type Jwk, type KubeObject } from './apiserver.js';
import { startEntra, assertionType, tokenExchangeAudience, type EntraStandin } from './entra.js';
import { decodeStandinToken } from './imds.js';
import { createPki, type Pki } from './pki.js';

const tenantId = '72f988bf-86f1-41af-91ab-2d7cd011db47';
const clientId = 'bbbbbbbb-0000-0000-0000-000000000001';
const subject = 'system:serviceaccount:apps:workload';
const vault = 'https://vault.azure.net/.default';

let pki: Pki;
let api: ApiServer;
let entra: EntraStandin;
let network: NetworkClient;
let web: KubeObject;
let workload: KubeObject;
let node: KubeObject;

interface Answer {
  status: number;
  body: Record<string, any>;
}

/** One HTTPS exchange trusting the test CA; the body is sent as is. */
function call(url: string, init: { method?: string; headers?: Record<string, string>; body?: string } = {}): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const req = request(url, { method: init.method ?? 'GET', headers: init.headers, ca: pki.caPem }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: JSON.parse(Buffer.concat(chunks).toString('utf8')) as Record<string, any> }));
    });
    req.on('error', reject);
    req.end(init.body);
  });
}

function tokenRequest(server: ApiServer, namespace: string, sa: string, spec: object, bearer: string | null = server.token): Promise<Answer> {
  return call(`${server.url}/api/v1/namespaces/${namespace}/serviceaccounts/${sa}/token`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...(bearer ? { authorization: `Bearer ${bearer}` } : {}) },
    body: JSON.stringify({ apiVersion: 'authentication.k8s.io/v1', kind: 'TokenRequest', spec }),
  });
}

/** A service account token for Entra ID, as the kubelet asks for a projected one. */
async function saToken(server: ApiServer, sa = 'workload', spec: object = { audiences: [tokenExchangeAudience] }): Promise<string> {
  const answer = await tokenRequest(server, 'apps', sa, spec);
  assert.equal(answer.status, 201, JSON.stringify(answer.body));
  return answer.body.status.token as string;
}

/** The client-credentials exchange azure-identity's WorkloadIdentityCredential makes. */
function exchange(assertion: string, client = clientId): Promise<Answer> {
  const form = new URLSearchParams({ client_id: client, scope: vault, grant_type: 'client_credentials', client_assertion_type: assertionType, client_assertion: assertion });
  return call(`${entra.url}/${tenantId}/oauth2/v2.0/token`, { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' }, body: form.toString() });
}

const jwtPart = (token: string, i: 0 | 1): Record<string, any> => JSON.parse(Buffer.from(token.split('.')[i] ?? '', 'base64url').toString('utf8')) as Record<string, any>;

function assertRefused(answer: Answer, status: number, error: string, code: number, description?: RegExp): void {
  assert.equal(answer.status, status, JSON.stringify(answer.body));
  assert.equal(answer.body.error, error);
  assert.deepEqual(answer.body.error_codes, [code]);
  assert.match(answer.body.error_description as string, new RegExp(`^AADSTS${code}: `));
  if (description) assert.match(answer.body.error_description as string, description);
  for (const field of ['timestamp', 'trace_id', 'correlation_id']) assert.equal(typeof answer.body[field], 'string');
}

const escape = (s: string): string => s.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&');

before(async () => {
  pki = createPki('federation-test');
  api = await startApiServer({ pki });
  entra = await startEntra({ pki });
  network = new NetworkClient({ ca: pki.caPem, headersTimeoutMs: 5_000 });
  node = api.put({ apiVersion: 'v1', kind: 'Node', metadata: { name: 'node1', uid: 'node1-uid' } });
  workload = api.put({ apiVersion: 'v1', kind: 'ServiceAccount', metadata: { name: 'workload', namespace: 'apps' } });
  api.put({ apiVersion: 'v1', kind: 'ServiceAccount', metadata: { name: 'other', namespace: 'apps' } });
  web = api.put({ apiVersion: 'v1', kind: 'Pod', metadata: { name: 'web', namespace: 'apps' }, spec: { serviceAccountName: 'workload', nodeName: 'node1' } });
  api.put({ apiVersion: 'v1', kind: 'Pod', metadata: { name: 'intruder', namespace: 'apps' }, spec: { serviceAccountName: 'other' } });
  entra.federate({ tenantId, clientId, issuer: api.issuer, subject });
});

after(async () => {
  await network.close();
  await entra.close();
  await api.close();
  pki.remove();
});

test('TokenRequest: a pod-bound RS256 token with the claims Kubernetes issues, verified against the JWKS fetched anonymously', async () => {
  const before = Math.floor(Date.now() / 1000);
  const ref = { kind: 'Pod', apiVersion: 'v1', name: 'web', uid: web.metadata.uid };
  const answer = await tokenRequest(api, 'apps', 'workload', { audiences: [tokenExchangeAudience], expirationSeconds: 3600, boundObjectRef: ref });
  assert.equal(answer.status, 201, JSON.stringify(answer.body));
  assert.equal(answer.body.apiVersion, 'authentication.k8s.io/v1');
  assert.equal(answer.body.kind, 'TokenRequest');
  assert.deepEqual(answer.body.spec, { audiences: [tokenExchangeAudience], expirationSeconds: 3600, boundObjectRef: ref });
  assert.equal(answer.body.metadata.uid, workload.metadata.uid);
  const token = answer.body.status.token as string;
  assert.match(answer.body.status.expirationTimestamp as string, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/);

  // Anonymous, as Entra ID asks: no bearer token.
  const configuration = await call(`${api.url}/.well-known/openid-configuration`);
  assert.equal(configuration.status, 200);
  assert.deepEqual(configuration.body, {
    issuer: api.issuer,
    jwks_uri: `${api.issuer}/openid/v1/jwks`,
    response_types_supported: ['id_token'],
    subject_types_supported: ['public'],
    id_token_signing_alg_values_supported: ['RS256'],
  });
  assert.equal(api.issuer, api.url);
  const jwks = await call(configuration.body.jwks_uri as string);
  assert.equal(jwks.status, 200);
  assert.deepEqual(jwks.body, api.jwks());

  const header = jwtPart(token, 0);
  assert.deepEqual(Object.keys(header), ['alg', 'kid']);
  assert.equal(header.alg, 'RS256');
  const jwk = (jwks.body.keys as Jwk[]).find((k) => k.kid === header.kid);
  assert.ok(jwk, 'the token names a key the JWKS lists');
  assert.deepEqual([jwk.kty, jwk.alg, jwk.use], ['RSA', 'RS256', 'sig']);
  const publicKey = createPublicKey({ key: { ...jwk } satisfies JsonWebKey, format: 'jwk' });
  assert.equal(createHash('sha256').update(publicKey.export({ type: 'spki', format: 'der' })).digest('base64url'), header.kid, 'kid: SHA-256 of the DER public key');
  const [h, p, s] = token.split('.') as [string, string, string];
  assert.ok(verify('sha256', Buffer.from(`${h}.${p}`), publicKey, Buffer.from(s, 'base64url')), 'RS256 signature');

  const claims = jwtPart(token, 1);
  assert.deepEqual(Object.keys(claims), ['aud', 'exp', 'iat', 'iss', 'jti', 'kubernetes.io', 'nbf', 'sub']);
  assert.deepEqual(claims.aud, [tokenExchangeAudience]);
  assert.equal(claims.iss, api.issuer);
  assert.equal(claims.sub, subject);
  assert.match(claims.jti as string, /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);
  assert.ok(claims.iat >= before && claims.iat <= before + 5);
  assert.equal(claims.nbf, claims.iat);
  assert.equal(claims.exp - claims.iat, 3600);
  assert.equal(answer.body.status.expirationTimestamp, new Date(claims.exp * 1000).toISOString().replace(/\.\d{3}Z$/, 'Z'));
  assert.deepEqual(claims['kubernetes.io'], {
    namespace: 'apps',
    node: { name: 'node1', uid: node.metadata.uid },
    pod: { name: 'web', uid: web.metadata.uid },
    serviceaccount: { name: 'workload', uid: workload.metadata.uid },
  });

  const recorded = api.tokenRequests.at(-1);
  assert.deepEqual(recorded, { namespace: 'apps', serviceAccount: 'workload', audiences: [tokenExchangeAudience], expirationSeconds: 3600, boundObjectRef: ref, status: 201, token });

  // Unbound, default lifetime: no pod in the claims, expirationSeconds filled in.
  const unbound = await tokenRequest(api, 'apps', 'workload', { audiences: ['a', 'b'] });
  assert.equal(unbound.status, 201);
  assert.equal(unbound.body.spec.expirationSeconds, 3600);
  assert.equal(unbound.body.spec.boundObjectRef, null);
  const plain = jwtPart(unbound.body.status.token as string, 1);
  assert.deepEqual(plain.aud, ['a', 'b']);
  assert.deepEqual(plain['kubernetes.io'], { namespace: 'apps', serviceaccount: { name: 'workload', uid: workload.metadata.uid } });
  assert.equal(api.tokenRequests.at(-1)?.expirationSeconds, undefined);
});

test('TokenRequest refusals, as the API server words them', async () => {
  const count = api.tokenRequests.length;
  const noSa = await tokenRequest(api, 'apps', 'ghost', { audiences: [tokenExchangeAudience] });
  assert.equal(noSa.status, 404);
  assert.equal(noSa.body.reason, 'NotFound');
  assert.equal(noSa.body.message, 'serviceaccounts "ghost" not found');

  const noPod = await tokenRequest(api, 'apps', 'workload', { audiences: [tokenExchangeAudience], boundObjectRef: { kind: 'Pod', apiVersion: 'v1', name: 'gone' } });
  assert.equal(noPod.status, 404);
  assert.equal(noPod.body.message, 'pods "gone" not found');

  const wrongUid = await tokenRequest(api, 'apps', 'workload', { audiences: [tokenExchangeAudience], boundObjectRef: { kind: 'Pod', apiVersion: 'v1', name: 'web', uid: 'recreated' } });
  assert.equal(wrongUid.status, 409);
  assert.equal(wrongUid.body.reason, 'Conflict');
  assert.match(wrongUid.body.message as string, /^Operation cannot be fulfilled on Pod "web": the UID in the bound object reference \(recreated\) does not match the UID in record/);

  const short = await tokenRequest(api, 'apps', 'workload', { audiences: [tokenExchangeAudience], expirationSeconds: 599 });
  assert.equal(short.status, 422);
  assert.equal(short.body.reason, 'Invalid');
  assert.equal(short.body.message, 'TokenRequest.authentication.k8s.io "" is invalid: spec.expirationSeconds: Invalid value: 599: may not specify a duration less than 10 minutes');
  assert.equal((await tokenRequest(api, 'apps', 'workload', { audiences: [tokenExchangeAudience], expirationSeconds: 600 })).status, 201, '600 s is the minimum, allowed');

  const otherSa = await tokenRequest(api, 'apps', 'workload', { audiences: [tokenExchangeAudience], boundObjectRef: { kind: 'Pod', apiVersion: 'v1', name: 'intruder' } });
  assert.equal(otherSa.status, 400);
  assert.equal(otherSa.body.message, 'cannot bind token for serviceaccount "workload" to pod running with different serviceaccount name.');

  const secret = await tokenRequest(api, 'apps', 'workload', { audiences: [tokenExchangeAudience], boundObjectRef: { kind: 'Secret', apiVersion: 'v1', name: 's' } });
  assert.equal(secret.status, 400);

  const anonymous = await tokenRequest(api, 'apps', 'workload', { audiences: [tokenExchangeAudience] }, null);
  assert.equal(anonymous.status, 401);
  assert.equal((await call(`${api.url}/api/v1/namespaces/apps/serviceaccounts/workload`)).status, 401, 'only discovery is anonymous');

  const refused = api.tokenRequests.slice(count).filter((r) => r.status !== 201);
  assert.deepEqual(
    refused.map((r) => [r.status, r.token]),
    [
      [404, undefined],
      [404, undefined],
      [409, undefined],
      [422, undefined],
      [400, undefined],
      [400, undefined],
    ],
  );
});

test('failNext reaches TokenRequests and discovery', async () => {
  api.failNext(1, 503, '/api/v1/namespaces/apps/serviceaccounts/workload/token');
  assert.equal((await tokenRequest(api, 'apps', 'workload', { audiences: [tokenExchangeAudience] })).status, 503);
  api.failNext(1, 500, '/openid/v1/jwks');
  assert.equal((await call(`${api.url}/openid/v1/jwks`)).status, 500);
  assert.equal((await call(`${api.url}/openid/v1/jwks`)).status, 200);
});

test('Pods and ServiceAccounts: uids kept across puts, one GET, a cluster-wide list with limit/continue, and watch', async () => {
  const first = api.put({ apiVersion: 'v1', kind: 'ServiceAccount', metadata: { name: 'temp', namespace: 'apps' } });
  assert.match(first.metadata.uid as string, /^[0-9a-f-]{36}$/);
  const again = api.put({ apiVersion: 'v1', kind: 'ServiceAccount', metadata: { name: 'temp', namespace: 'apps', labels: { a: 'b' } } });
  assert.equal(again.metadata.uid, first.metadata.uid);
  api.remove('ServiceAccount', 'apps', 'temp');
  const recreated = api.put({ apiVersion: 'v1', kind: 'ServiceAccount', metadata: { name: 'temp', namespace: 'apps' } });
  assert.notEqual(recreated.metadata.uid, first.metadata.uid);

  const auth = { authorization: `Bearer ${api.token}` };
  const one = await call(`${api.url}/api/v1/namespaces/apps/serviceaccounts/workload`, { headers: auth });
  assert.equal(one.status, 200);
  assert.equal(one.body.metadata.uid, workload.metadata.uid);
  const pod = await call(`${api.url}/api/v1/namespaces/apps/pods/web`, { headers: auth });
  assert.equal(pod.body.metadata.uid, web.metadata.uid);
  assert.equal((await call(`${api.url}/api/v1/namespaces/apps/pods/nope`, { headers: auth })).status, 404);

  const page1 = await call(`${api.url}/api/v1/serviceaccounts?limit=2`, { headers: auth });
  assert.equal(page1.body.apiVersion, 'v1');
  assert.equal(page1.body.kind, 'ServiceAccountList');
  assert.equal(page1.body.items.length, 2);
  const page2 = await call(`${api.url}/api/v1/serviceaccounts?limit=2&continue=${page1.body.metadata.continue as string}`, { headers: auth });
  const names = [...page1.body.items, ...page2.body.items].map((sa: KubeObject) => sa.metadata.name);
  assert.deepEqual(names, ['other', 'temp', 'workload']);
  assert.equal(page2.body.metadata.continue, undefined);

  const rv = page1.body.metadata.resourceVersion as string;
  const event = new Promise<Record<string, any>>((resolve, reject) => {
    const req = request(`${api.url}/api/v1/serviceaccounts?watch=1&resourceVersion=${rv}`, { headers: auth, ca: pki.caPem }, (res) => {
      res.once('data', (chunk: Buffer) => {
        resolve(JSON.parse(chunk.toString('utf8').split('\n')[0] ?? '') as Record<string, any>);
        req.destroy();
      });
    });
    req.on('error', (err) => (err.message === 'socket hang up' ? undefined : reject(err)));
    req.end();
  });
  await api.waitForWatches('serviceaccounts');
  api.put({ apiVersion: 'v1', kind: 'ServiceAccount', metadata: { name: 'late', namespace: 'kube-system' } });
  const seen = await event;
  assert.equal(seen.type, 'ADDED');
  assert.equal(seen.object.metadata.name, 'late');
  assert.equal(api.watches('serviceaccounts').length, 1);
  api.remove('ServiceAccount', 'kube-system', 'late');
  api.remove('ServiceAccount', 'apps', 'temp');
});

test('Entra ID trades the service account token for its own: the fic identity, the assertion never logged, the issuer cached', async () => {
  const fetches = entra.issuerFetches;
  const token = await saToken(api);
  const answer = await exchange(token);
  assert.equal(answer.status, 200, JSON.stringify(answer.body));
  assert.equal(answer.body.token_type, 'Bearer');
  const claims = decodeStandinToken(answer.body.access_token as string);
  assert.equal(claims.identity, `fic:${tenantId}/${clientId}/${subject}`);
  assert.equal(claims.appid, clientId);
  assert.equal(claims.aud, 'https://vault.azure.net');
  assert.equal(entra.issuerFetches, fetches + 2, 'discovery document, then JWKS');

  const recorded = entra.requests.at(-1);
  assert.equal(recorded?.form.client_assertion, '[redacted]');
  assert.equal(recorded?.form.client_assertion_type, assertionType);
  assert.ok(!JSON.stringify(entra.requests).includes(token.split('.')[2] ?? 'x'), 'no part of the token in the log');

  assert.equal((await exchange(await saToken(api))).status, 200);
  assert.equal(entra.issuerFetches, fetches + 2, 'keys cached per issuer');
});

test("another service account's token: AADSTS700213 naming its subject", async () => {
  const answer = await exchange(await saToken(api, 'other'));
  assertRefused(answer, 401, 'invalid_client', 700213, new RegExp(`presented assertion subject '${escape('system:serviceaccount:apps:other')}'`));
});

test('an issuer the app does not trust: AADSTS700211 naming it', async () => {
  const stranger = await startApiServer({ pki });
  try {
    stranger.put({ apiVersion: 'v1', kind: 'ServiceAccount', metadata: { name: 'workload', namespace: 'apps' } });
    const answer = await exchange(await saToken(stranger));
    assertRefused(answer, 401, 'invalid_client', 700211, new RegExp(`presented assertion issuer '${escape(stranger.issuer)}'`));
  } finally {
    await stranger.close();
  }
});

test('an audience the credential does not name: AADSTS700212', async () => {
  const answer = await exchange(await saToken(api, 'workload', { audiences: ['https://kubernetes.default.svc'] }));
  assertRefused(answer, 401, 'invalid_client', 700212, /presented assertion audience 'https:\/\/kubernetes\.default\.svc'/);
});

test('an expired token (the API server clock two hours back): AADSTS700024', async () => {
  api.tokenClockSkewSec = -7200;
  let token: string;
  try {
    token = await saToken(api);
  } finally {
    api.tokenClockSkewSec = 0;
  }
  assert.ok(jwtPart(token, 1).exp < Date.now() / 1000 - 3000);
  const answer = await exchange(token);
  assertRefused(answer, 401, 'invalid_client', 700024, /not within its valid time range\. Current time: \S+Z, assertion valid from \S+Z, expiry time of assertion \S+Z\./);
});

test('a tampered token: AADSTS700027, whether the signature or the claims were changed', async () => {
  const token = await saToken(api);
  const [h, p, s] = token.split('.') as [string, string, string];
  const flipped = `${h}.${p}.${s.startsWith('A') ? 'B' : 'A'}${s.slice(1)}`;
  assertRefused(await exchange(flipped), 401, 'invalid_client', 700027, /Client assertion failed signature validation/);
  // Another service account's genuine token, its subject rewritten to the trusted one.
  const [oh, op, os] = (await saToken(api, 'other')).split('.') as [string, string, string];
  const forged = Buffer.from(JSON.stringify({ ...jwtPart(`${oh}.${op}`, 1), sub: subject })).toString('base64url');
  assertRefused(await exchange(`${oh}.${forged}.${os}`), 401, 'invalid_client', 700027);
});

test('a key the issuer does not list: AADSTS7000272; a rotated key: fetched again and accepted', async () => {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const real = jwtPart(await saToken(api), 1);
  const part = (v: object): string => Buffer.from(JSON.stringify(v)).toString('base64url');
  const signed = `${part({ alg: 'RS256', kid: 'not-listed' })}.${part(real)}`;
  const own = `${signed}.${sign('sha256', Buffer.from(signed), privateKey).toString('base64url')}`;
  assertRefused(await exchange(own), 401, 'invalid_client', 7000272, new RegExp(`identifier not-listed used to sign the federated credential could not be found in the metadata of identity provider ${escape(api.issuer)}`));

  const kid = api.rotateSigningKey();
  assert.equal(api.jwks().keys.length, 2);
  const token = await saToken(api);
  assert.equal(jwtPart(token, 0).kid, kid);
  const fetches = entra.issuerFetches;
  assert.equal((await exchange(token)).status, 200);
  assert.equal(entra.issuerFetches, fetches + 2, 'an unknown kid fetches the keys again');
});

test('not a JWT: AADSTS50027', async () => {
  assertRefused(await exchange('not-a-jwt'), 400, 'invalid_request', 50027, /JWT token is invalid or malformed/);
});

test('discovery out of reach: AADSTS50166, not remembered once it answers again', async () => {
  const flaky = await startApiServer({ pki });
  const flakyClient = 'bbbbbbbb-0000-0000-0000-000000000002';
  try {
    flaky.put({ apiVersion: 'v1', kind: 'ServiceAccount', metadata: { name: 'workload', namespace: 'apps' } });
    entra.federate({ tenantId, clientId: flakyClient, issuer: flaky.issuer, subject });
    const token = await saToken(flaky);
    flaky.failNext(1, 503, '/.well-known/openid-configuration');
    assertRefused(await exchange(token, flakyClient), 400, 'invalid_request', 50166, /Request to External OIDC endpoint failed/);
    assert.equal((await exchange(token, flakyClient)).status, 200);
  } finally {
    await flaky.close();
  }
});

test('msal-node with a clientAssertion callback, through nmi network client: the token, and a refusal as ServerError', async () => {
  const app = (assertion: () => Promise<string>): ConfidentialClientApplication =>
    new ConfidentialClientApplication({
      auth: { clientId, authority: `${entra.url}/${tenantId}`, clientAssertion: assertion, knownAuthorities: [entra.url] },
      system: { networkClient: network },
    });
  const result = await app(() => saToken(api)).acquireTokenByClientCredential({ scopes: [vault], skipCache: true });
  assert.ok(result);
  assert.equal(decodeStandinToken(result.accessToken).identity, `fic:${tenantId}/${clientId}/${subject}`);

  const err = await app(() => saToken(api, 'other'))
    .acquireTokenByClientCredential({ scopes: [vault], skipCache: true })
    .then(() => assert.fail('expected a refusal'), (e: unknown) => e);
  assert.ok(err instanceof ServerError, String(err));
  assert.equal(err.errorCode, 'invalid_client');
  assert.match(err.errorMessage, /AADSTS700213/);
});
