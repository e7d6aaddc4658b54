// Service principals (types 1 and 2) through msal-node against a stand-in Entra ID over real TLS.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer } from 'node:net';
import { IdentityType, type AzureIdentity } from '../../src/bindings/model.js';
import { codes, isNmiError } from '../../src/errors/errors.js';
import { MsalTokenProvider, scopeForResource } from '../../src/tokens/msal-provider.js';
import type { NetworkRequestOptions, NetworkResponse } from '@azure/msal-node';
import { NetworkClient } from '../../src/tokens/network-client.js';
import { TokenCache } from '../../src/tokens/token-cache.js';
import { UpstreamError } from '../../src/tokens/upstream-error.js';
import { createRsaCertificate, startEntra, type EntraStandin, type RsaCertificate } from '../standins/entra.js';
import { decodeStandinToken } from '../standins/imds.js';
import { createPki, type Pki } from '../standins/pki.js';

const tenantId = '72f988bf-86f1-41af-91ab-2d7cd011db47';
const secretApp = { tenantId, clientId: 'aaaaaaaa-0000-0000-0000-000000000001', clientSecret: 's3cret-value' };
const certClientId = 'aaaaaaaa-0000-0000-0000-000000000002';
const plainCertClientId = 'aaaaaaaa-0000-0000-0000-000000000003';
const password = 'pfx-pass phrase';

/** Remembers every URL msal asks for, to show only the stand-in is contacted. */
class RecordingNetworkClient extends NetworkClient {
  readonly urls: string[] = [];
  override sendGetRequestAsync<T>(url: string, ...rest: [NetworkRequestOptions?, number?]): Promise<NetworkResponse<T>> {
    this.urls.push(url);
    return super.sendGetRequestAsync<T>(url, ...rest);
  }
  override sendPostRequestAsync<T>(url: string, options?: NetworkRequestOptions): Promise<NetworkResponse<T>> {
    this.urls.push(url);
    return super.sendPostRequestAsync<T>(url, options);
  }
}

let pki: Pki;
let entra: EntraStandin;
let network: RecordingNetworkClient;
let provider: MsalTokenProvider;
let encrypted: RsaCertificate;
let plain: RsaCertificate;

function sp(overrides: Partial<AzureIdentity> = {}): AzureIdentity {
  return { name: 'sp', namespace: 'apps', type: IdentityType.ServicePrincipal, clientID: secretApp.clientId, resourceID: '', tenantID: tenantId, namespaced: false, version: '1', ...overrides };
}

before(async () => {
  pki = createPki('entra-test');
  entra = await startEntra({ pki });
  encrypted = createRsaCertificate(pki, 'encrypted', password);
  plain = createRsaCertificate(pki, 'plain');
  entra.register(secretApp);
  entra.register({ tenantId, clientId: certClientId, certificatePem: encrypted.certificatePem });
  entra.register({ tenantId, clientId: plainCertClientId, certificatePem: plain.certificatePem });
  network = new RecordingNetworkClient({ ca: entra.caPem, headersTimeoutMs: 300 });
  provider = new MsalTokenProvider({ upstreamImds: 'http://127.0.0.1:9', aadAuthorityHost: entra.url, network });
});

after(async () => {
  await entra.close();
  await network.close();
  pki.remove();
});

async function rejection(promise: Promise<unknown>): Promise<unknown> {
  return promise.then(
    () => assert.fail('expected a rejection'),
    (err: unknown) => err,
  );
}

test('scopes: <resource>/.default, keeping a trailing slash so the audience is the resource as asked', () => {
  assert.equal(scopeForResource('https://vault.azure.net'), 'https://vault.azure.net/.default');
  assert.equal(scopeForResource('https://management.azure.com/'), 'https://management.azure.com//.default');
  assert.equal(scopeForResource('https://graph.microsoft.com/.default'), 'https://graph.microsoft.com/.default');
});

test('type 1 with a secret: client_credentials to the tenant, no discovery calls', async () => {
  const calls = entra.calls;
  network.urls.length = 0;
  const token = await provider.fetch(sp(), 'https://management.azure.com/', { clientSecret: secretApp.clientSecret });
  assert.equal(entra.calls, calls + 1);
  assert.equal(entra.discoveryCalls, 0);
  assert.deepEqual(network.urls.map((u) => u.split('?')[0]), [`${entra.url}/${tenantId}/oauth2/v2.0/token`]);
  const request = entra.requests.at(-1);
  assert.equal(request?.path, `/${tenantId}/oauth2/v2.0/token`);
  assert.equal(request?.form.grant_type, 'client_credentials');
  assert.equal(request?.form.scope, 'https://management.azure.com//.default');
  assert.equal(request?.form.client_id, secretApp.clientId);

  const claims = decodeStandinToken(token.accessToken);
  assert.equal(claims.identity, `sp:${tenantId}/${secretApp.clientId}`);
  assert.equal(claims.aud, 'https://management.azure.com/');
  assert.equal(token.clientId, secretApp.clientId);
  assert.equal(token.resource, 'https://management.azure.com/');
  assert.equal(token.tokenType, 'Bearer');
  assert.ok(Math.abs(token.expiresOn - claims.exp) <= 2);
  assert.equal(token.extExpiresIn, 3599);
});

test('type 1: msal-node keeps no token between fetches', async () => {
  const credential = { clientSecret: secretApp.clientSecret };
  const first = await provider.fetch(sp(), 'https://vault.azure.net', credential);
  const second = await provider.fetch(sp(), 'https://vault.azure.net', credential);
  assert.notEqual(decodeStandinToken(first.accessToken).serial, decodeStandinToken(second.accessToken).serial);
});

test('a wrong secret: 401 invalid_client passed on with its body', async () => {
  const err = await rejection(provider.fetch(sp(), 'https://vault.azure.net', { clientSecret: 'wrong' }));
  assert.ok(err instanceof UpstreamError, String(err));
  assert.equal(err.kind, 'client');
  assert.equal(err.status, 401);
  assert.equal(err.body?.error, 'invalid_client');
  assert.match(err.body?.error_description ?? '', /^AADSTS7000215: Invalid client secret/);
  assert.doesNotMatch(err.message, /wrong/);
});

test('an unknown tenant: 400 passed on', async () => {
  const err = await rejection(provider.fetch(sp({ tenantID: 'contoso.onmicrosoft.com' }), 'https://vault.azure.net', { clientSecret: 'x' }));
  assert.ok(err instanceof UpstreamError);
  assert.equal(err.status, 400);
  assert.equal(err.body?.error, 'invalid_request');
});

test('type 2 with an encrypted key and its password: a signed client assertion', async () => {
  const identity = sp({ type: IdentityType.ServicePrincipalCertificate, clientID: certClientId });
  const credential = { certificate: encrypted.bundlePem, password };
  const token = await provider.fetch(identity, 'https://vault.azure.net', credential);
  assert.equal(decodeStandinToken(token.accessToken).identity, `sp:${tenantId}/${certClientId}`);
  const form = entra.requests.at(-1)?.form;
  assert.equal(form?.client_assertion_type, 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer');
  assert.equal(form?.client_secret, undefined);
});

test("spec.adEndpoint: the identity's own Entra ID (another cloud) is asked, never --aad-authority-host's", async () => {
  // Another cloud: a second stand-in with the same apps, at another address.
  const sovereign = await startEntra({ pki });
  try {
    sovereign.register(secretApp);
    sovereign.register({ tenantId, clientId: plainCertClientId, certificatePem: plain.certificatePem });
    const before = entra.calls;
    network.urls.length = 0;
    // A stand-in's host is no Entra ID authority host: the operator allows it, as for a cloud nmi does not know.
    const provider = new MsalTokenProvider({ upstreamImds: 'http://127.0.0.1:9', aadAuthorityHost: entra.url, adEndpointAllow: [new URL(sovereign.url).host], network });
    const secret = await provider.fetch(sp({ adEndpoint: sovereign.url }), 'https://vault.usgovcloudapi.net', { clientSecret: secretApp.clientSecret });
    // A certificate's signed assertion names the token endpoint it is for: the stand-in checks it is its own.
    const cert = sp({ type: IdentityType.ServicePrincipalCertificate, clientID: plainCertClientId, adEndpoint: sovereign.url });
    const signed = await provider.fetch(cert, 'https://vault.usgovcloudapi.net', { certificate: plain.bundlePem });
    assert.equal(decodeStandinToken(secret.accessToken).appid, secretApp.clientId);
    assert.equal(decodeStandinToken(signed.accessToken).appid, plainCertClientId);
    assert.equal(sovereign.calls, 2);
    assert.equal(sovereign.discoveryCalls, 0);
    assert.equal(entra.calls, before, "the default authority host is not asked");
    assert.deepEqual(new Set(network.urls.map((u) => u.split('?')[0])), new Set([`${sovereign.url}/${tenantId}/oauth2/v2.0/token`]));
    // And an identity without one still goes to the default.
    await provider.fetch(sp(), 'https://vault.azure.net', { clientSecret: secretApp.clientSecret });
    assert.equal(entra.calls, before + 1);
  } finally {
    await sovereign.close();
  }
});

test("spec.adEndpoint on a host no one allowed: refused before any credential leaves, never asked; Entra ID's own hosts pass", async () => {
  const elsewhere = await startEntra({ pki });
  try {
    elsewhere.register(secretApp);
    network.urls.length = 0;
    const assertion = { assertion: async () => assert.fail('the service-account token was requested for a host nobody allowed') };
    for (const [identity, credential] of [
      [sp({ adEndpoint: elsewhere.url }), { clientSecret: secretApp.clientSecret }],
      [sp({ type: IdentityType.Federated, adEndpoint: elsewhere.url }), assertion],
    ] as const) {
      const err = await rejection(provider.fetch(identity, 'https://vault.azure.net', credential));
      assert.ok(isNmiError(err, codes.TOKEN), String(err));
      assert.match(err.message, new RegExp(`is not an Entra ID authority host nor --aad-authority-host's; --aad-endpoint-allow ${new URL(elsewhere.url).host} would allow it$`));
    }
    assert.equal(elsewhere.calls, 0);
    assert.deepEqual(network.urls, []);
    // Entra ID's US Government host passes the check (then fails to connect: this machine has no route there).
    const gov = await rejection(provider.fetch(sp({ adEndpoint: 'https://login.microsoftonline.us' }), 'https://vault.usgovcloudapi.net', { clientSecret: 'x' }));
    assert.ok(gov instanceof UpstreamError, String(gov));
  } finally {
    await elsewhere.close();
  }
});

test('type 2 with an unencrypted key', async () => {
  const identity = sp({ type: IdentityType.ServicePrincipalCertificate, clientID: plainCertClientId });
  const token = await provider.fetch(identity, 'https://vault.azure.net', { certificate: plain.bundlePem });
  assert.equal(decodeStandinToken(token.accessToken).appid, plainCertClientId);
});

test('type 2 signed with another certificate: 401 from Entra ID', async () => {
  const identity = sp({ type: IdentityType.ServicePrincipalCertificate, clientID: plainCertClientId });
  const err = await rejection(provider.fetch(identity, 'https://vault.azure.net', { certificate: encrypted.bundlePem, password }));
  assert.ok(err instanceof UpstreamError);
  assert.equal(err.status, 401);
  assert.equal(err.body?.error, 'invalid_client');
});

test('type 2 with a wrong password, or no certificate: refused before any call', async () => {
  const identity = sp({ type: IdentityType.ServicePrincipalCertificate, clientID: certClientId });
  const calls = entra.calls;
  const wrong = await rejection(provider.fetch(identity, 'https://vault.azure.net', { certificate: encrypted.bundlePem, password: 'nope' }));
  assert.ok(isNmiError(wrong, codes.TOKEN), String(wrong));
  assert.doesNotMatch((wrong as Error).message, /nope/);
  const missing = await rejection(provider.fetch(identity, 'https://vault.azure.net', { certificate: 'not a pem' }));
  assert.ok(isNmiError(missing, codes.TOKEN));
  const noCredential = await rejection(provider.fetch(sp(), 'https://vault.azure.net'));
  assert.ok(isNmiError(noCredential, codes.TOKEN));
  assert.equal(entra.calls, calls);
});

test('503 with Retry-After from Entra ID: a server error carrying the delay', async () => {
  entra.failNext(1, { status: 503, headers: { 'retry-after': '3' } });
  const err = await rejection(provider.fetch(sp(), 'https://vault.azure.net', { clientSecret: secretApp.clientSecret }));
  assert.ok(err instanceof UpstreamError);
  assert.equal(err.kind, 'server');
  assert.equal(err.retryAfterMs, 3000);
  assert.equal(err.body?.error, 'server_error');
});

test("Entra ID's 404 is the client's (IMDS's means updating): passed on, not retried", async () => {
  entra.failNext(1, { status: 404 });
  const err = await rejection(provider.fetch(sp(), 'https://vault.azure.net', { clientSecret: secretApp.clientSecret }));
  assert.ok(err instanceof UpstreamError);
  assert.equal(err.kind, 'client');
  assert.equal(err.retryable, false);
});

test('Entra ID not answering: timeout', async () => {
  entra.hang(true);
  try {
    const err = await rejection(provider.fetch(sp(), 'https://vault.azure.net', { clientSecret: secretApp.clientSecret }));
    assert.ok(err instanceof UpstreamError, String(err));
    assert.equal(err.kind, 'timeout');
  } finally {
    entra.hang(false);
  }
});

test('an authority host nobody listens on: network error', async () => {
  const closed = createServer();
  closed.listen(0, '127.0.0.1');
  await once(closed, 'listening');
  const { port } = closed.address() as { port: number };
  closed.close();
  await once(closed, 'close');
  const down = new MsalTokenProvider({ upstreamImds: 'http://127.0.0.1:9', aadAuthorityHost: `https://127.0.0.1:${port}`, network });
  const err = await rejection(down.fetch(sp(), 'https://vault.azure.net', { clientSecret: 'x' }));
  assert.ok(err instanceof UpstreamError, String(err));
  assert.equal(err.kind, 'network');

  // Through the cache: a bounded number of attempts, then the network error.
  const sleeps: number[] = [];
  const tokens = new TokenCache({ provider: down, retry: { attempts: 3 }, sleep: async (ms) => void sleeps.push(ms) });
  const cached = await rejection(tokens.get(sp(), 'https://vault.azure.net', { clientSecret: 'x' }));
  assert.ok(cached instanceof UpstreamError);
  assert.equal(cached.kind, 'network');
  assert.equal(tokens.stats().upstreamRequests.entra, 3);
  assert.equal(tokens.stats().upstreamErrors.network, 3);
  assert.equal(sleeps.length, 2);
});

test('the cache hands the credential to the provider and keeps service principal tokens', async () => {
  const tokens = new TokenCache({ provider });
  const calls = entra.calls;
  const first = await tokens.get(sp(), 'https://vault.azure.net', { clientSecret: secretApp.clientSecret });
  const second = await tokens.get(sp(), 'https://vault.azure.net', { clientSecret: secretApp.clientSecret });
  assert.equal(second.accessToken, first.accessToken);
  assert.equal(entra.calls, calls + 1);
});

test('the TLS certificate of the authority is checked', async () => {
  const untrusting = new NetworkClient();
  try {
    const strict = new MsalTokenProvider({ upstreamImds: 'http://127.0.0.1:9', aadAuthorityHost: entra.url, network: untrusting });
    const err = await rejection(strict.fetch(sp(), 'https://vault.azure.net', { clientSecret: secretApp.clientSecret }));
    assert.ok(err instanceof UpstreamError);
    assert.equal(err.kind, 'network');
  } finally {
    await untrusting.close();
  }
});

test('a tenant id that is not one is refused', async () => {
  const err = await rejection(provider.fetch(sp({ tenantID: '../common' }), 'https://vault.azure.net', { clientSecret: 'x' }));
  assert.ok(isNmiError(err, codes.TOKEN));
});
