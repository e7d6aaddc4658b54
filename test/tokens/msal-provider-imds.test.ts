// User-assigned managed identities (type 0) through msal-node against a stand-in IMDS.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { IdentityType, type AzureIdentity } from '../../src/bindings/model.js';
import { codes, isNmiError } from '../../src/errors/errors.js';
import { MsalTokenProvider } from '../../src/tokens/msal-provider.js';
import { NetworkClient } from '../../src/tokens/network-client.js';
import { toAnswer } from '../../src/tokens/token.js';
import { UpstreamError } from '../../src/tokens/upstream-error.js';
import { decodeStandinToken, startImds, type ImdsStandin } from '../standins/imds.js';

const clientId = '11111111-1111-1111-1111-111111111111';
const resourceId = '/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/by-res';
const resourceClientId = '22222222-2222-2222-2222-222222222222';

function msi(overrides: Partial<AzureIdentity> = {}): AzureIdentity {
  return { name: 'msi', namespace: 'apps', type: IdentityType.UserAssignedMSI, clientID: clientId, resourceID: '', tenantID: '', namespaced: false, version: '1', ...overrides };
}

let imds: ImdsStandin;
let network: NetworkClient;
let provider: MsalTokenProvider;

before(async () => {
  imds = await startImds({ identities: [{ clientId }, { clientId: resourceClientId, resourceId }] });
  // Short header timeout so the hang test finishes quickly.
  network = new NetworkClient({ headersTimeoutMs: 300 });
  provider = new MsalTokenProvider({ upstreamImds: `${imds.url}/`, aadAuthorityHost: 'https://login.microsoftonline.com', network });
});

after(async () => {
  await imds.close();
  await network.close();
});

async function rejection(promise: Promise<unknown>): Promise<unknown> {
  return promise.then(
    () => assert.fail('expected a rejection'),
    (err: unknown) => err,
  );
}

test('type 0 by client id: one IMDS call with Metadata and client_id, mapped to an IMDS answer', async () => {
  const calls = imds.calls;
  const token = await provider.fetch(msi(), 'https://vault.azure.net');
  assert.equal(imds.calls, calls + 1);
  const request = imds.requests.at(-1);
  assert.ok(request);
  assert.match(request.path, /^\/metadata\/identity\/oauth2\/token\/?$/);
  assert.equal(request.headers.metadata, 'true');
  assert.equal(request.query.client_id, clientId);
  assert.equal(request.query.resource, 'https://vault.azure.net');
  assert.ok(request.query['api-version']);

  const claims = decodeStandinToken(token.accessToken);
  assert.equal(claims.identity, `client_id:${clientId}`);
  assert.equal(claims.aud, 'https://vault.azure.net');
  assert.equal(token.clientId, clientId);
  assert.equal(token.resource, 'https://vault.azure.net');
  assert.equal(token.tokenType, 'Bearer');
  assert.equal(token.notBefore, claims.nbf);
  assert.ok(Math.abs(token.expiresOn - claims.exp) <= 2, `expiresOn ${token.expiresOn} vs exp ${claims.exp}`);
  assert.ok(Math.abs(token.extExpiresIn - 86399) <= 2, `extExpiresIn ${token.extExpiresIn}`);

  const answer = toAnswer(token);
  for (const value of Object.values(answer)) assert.equal(typeof value, 'string');
});

test('type 0 by resource id: msi_res_id is sent and the client id comes from the token', async () => {
  const token = await provider.fetch(msi({ clientID: '', resourceID: resourceId }), 'https://management.azure.com/');
  const request = imds.requests.at(-1);
  assert.equal(request?.query.msi_res_id, resourceId);
  assert.equal(request?.query.client_id, undefined);
  assert.equal(decodeStandinToken(token.accessToken).identity, `msi_res_id:${resourceId}`);
  assert.equal(token.clientId, resourceClientId);
  assert.equal(token.resource, 'https://management.azure.com/');
});

test('every fetch goes to IMDS: msal-node keeps no token between calls', async () => {
  const first = await provider.fetch(msi(), 'https://storage.azure.com');
  const second = await provider.fetch(msi(), 'https://storage.azure.com');
  assert.notEqual(decodeStandinToken(first.accessToken).serial, decodeStandinToken(second.accessToken).serial);
});

test('an IMDS 400 becomes a client UpstreamError with the body as IMDS sent it, not retried', async () => {
  const body = { error: 'invalid_request', error_description: 'Identity not found' };
  imds.failNext(1, { status: 400, body });
  const calls = imds.calls;
  const err = await rejection(provider.fetch(msi(), 'https://vault.azure.net'));
  assert.ok(err instanceof UpstreamError, String(err));
  assert.equal(err.code, codes.UPSTREAM);
  assert.equal(err.kind, 'client');
  assert.equal(err.status, 400);
  assert.deepEqual(err.body, body);
  assert.equal(imds.calls, calls + 1);
});

test('an identity IMDS does not know is a client error too', async () => {
  const err = await rejection(provider.fetch(msi({ clientID: '99999999-9999-9999-9999-999999999999' }), 'https://vault.azure.net'));
  assert.ok(err instanceof UpstreamError);
  assert.equal(err.kind, 'client');
  assert.equal(err.body?.error_description, 'Identity not found');
});

test('429 is throttled with Retry-After, and msal does not retry on its own', async () => {
  imds.failNext(1, { status: 429, headers: { 'retry-after': '7' } });
  const calls = imds.calls;
  const err = await rejection(provider.fetch(msi(), 'https://vault.azure.net'));
  assert.ok(err instanceof UpstreamError);
  assert.equal(err.kind, 'throttled');
  assert.equal(err.status, 429);
  assert.equal(err.retryAfterMs, 7000);
  assert.equal(imds.calls, calls + 1);
});

test('404 and 410 are IMDS being updated: retryable, not the client\'s', async () => {
  for (const status of [404, 410]) {
    imds.failNext(1, { status });
    const err = await rejection(provider.fetch(msi(), 'https://vault.azure.net'));
    assert.ok(err instanceof UpstreamError);
    assert.equal(err.kind, 'updating', String(status));
    assert.equal(err.status, status);
    assert.equal(err.retryable, true);
  }
});

test('500 is a server error', async () => {
  imds.failNext(1, { status: 500 });
  const err = await rejection(provider.fetch(msi(), 'https://vault.azure.net'));
  assert.ok(err instanceof UpstreamError);
  assert.equal(err.kind, 'server');
  assert.equal(err.status, 500);
  assert.equal(err.retryable, true);
});

test('a 502 without a JSON body is a server error', async () => {
  imds.failNext(1, { status: 502, body: 'not json' });
  const err = await rejection(provider.fetch(msi(), 'https://vault.azure.net'));
  assert.ok(err instanceof UpstreamError);
  assert.equal(err.kind, 'server');
  assert.equal(err.status, 502);
});

test('an IMDS that does not answer is a timeout', async () => {
  imds.hang(true);
  const calls = imds.calls;
  try {
    const err = await rejection(provider.fetch(msi(), 'https://vault.azure.net'));
    assert.ok(err instanceof UpstreamError, String(err));
    assert.equal(err.kind, 'timeout');
    assert.equal(err.status, undefined);
    assert.equal(imds.calls, calls + 1);
  } finally {
    imds.hang(false);
  }
});

test('a type 0 identity without clientID or resourceID is refused before any call', async () => {
  const calls = imds.calls;
  const err = await rejection(provider.fetch(msi({ clientID: '', resourceID: '' }), 'https://vault.azure.net'));
  assert.ok(isNmiError(err, codes.TOKEN));
  assert.equal(imds.calls, calls);
});

test('msal-node allows one IMDS per process: a second, different upstream is refused', async () => {
  const other = new MsalTokenProvider({ upstreamImds: 'http://127.0.0.1:9', aadAuthorityHost: 'https://login.microsoftonline.com', network });
  const err = await rejection(other.fetch(msi(), 'https://vault.azure.net'));
  assert.ok(isNmiError(err, codes.TOKEN));
  assert.match((err as Error).message, /already fetches managed-identity tokens/);
  // The same upstream, spelled without the slash, is fine.
  const same = new MsalTokenProvider({ upstreamImds: imds.url, aadAuthorityHost: 'https://login.microsoftonline.com', network });
  assert.ok((await same.fetch(msi(), 'https://vault.azure.net')).accessToken);
});
