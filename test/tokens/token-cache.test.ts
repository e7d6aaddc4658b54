// The token cache over the real msal provider and a stand-in IMDS, with a fake
// clock for token ages and recorded (not slept) retry delays.
import { after, before, beforeEach, test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as wait } from 'node:timers/promises';
import { Registry } from 'prom-client';
import { identityKey } from '../../src/bindings/model.js';
import { UpstreamBudget } from '../../src/budget/budget.js';
import { codes, NmiError } from '../../src/errors/errors.js';
import { limits } from '../../src/config/limits.js';
import { registerTokenMetrics } from '../../src/tokens/metrics.js';
import { MsalTokenProvider } from '../../src/tokens/msal-provider.js';
import { NetworkClient } from '../../src/tokens/network-client.js';
import { TokenCache, type TokenCacheOptions } from '../../src/tokens/token-cache.js';
import type { Token } from '../../src/tokens/token.js';
import { UpstreamError } from '../../src/tokens/upstream-error.js';
import { freshMsi } from '../harness/identities.js';
import { waitFor } from '../harness/wait-for.js';
import { decodeStandinToken, startImds, type ImdsStandin } from '../standins/imds.js';

const lifetimeSec = 1000;
let nowMs = Date.now();
const clock = { now: () => nowMs, advanceSec: (s: number) => (nowMs += s * 1000) };
let sleeps: number[] = [];

let imds: ImdsStandin;
let network: NetworkClient;
let provider: MsalTokenProvider;

const msi = freshMsi;

function cache(options: Partial<TokenCacheOptions> = {}): TokenCache {
  return new TokenCache({
    provider,
    now: clock.now,
    sleep: async (ms) => {
      sleeps.push(ms);
    },
    random: () => 0.5,
    ...options,
  });
}

const serial = (token: Token | undefined): number | undefined => token && decodeStandinToken(token.accessToken).serial;

async function rejection(promise: Promise<unknown>): Promise<unknown> {
  return promise.then(
    () => assert.fail('expected a rejection'),
    (err: unknown) => err,
  );
}

before(async () => {
  imds = await startImds({ expiresInSec: lifetimeSec, nowSec: () => Math.floor(clock.now() / 1000) });
  network = new NetworkClient({ headersTimeoutMs: 200 });
  provider = new MsalTokenProvider({ upstreamImds: imds.url, aadAuthorityHost: 'https://login.microsoftonline.com', network });
});

beforeEach(() => {
  sleeps = [];
});

after(async () => {
  await imds.close();
  await network.close();
});

test('a hit is answered from memory without a call', async () => {
  const tokens = cache();
  const identity = msi();
  const calls = imds.calls;
  const first = await tokens.get(identity, 'https://vault.azure.net');
  for (let i = 0; i < 10; i++) assert.deepEqual(await tokens.get(identity, 'https://vault.azure.net'), first);
  assert.deepEqual(tokens.peek(identity, 'https://vault.azure.net'), first);
  assert.equal(imds.calls, calls + 1);
  const stats = tokens.stats();
  assert.equal(stats.misses, 1);
  assert.equal(stats.hits, 11);
  assert.equal(stats.upstreamRequests.imds, 1);
  assert.equal(tokens.size, 1);
});

test('1000 concurrent gets for a cold key make exactly one upstream call', async () => {
  const tokens = cache();
  const identity = msi();
  const calls = imds.calls;
  const all = await Promise.all(Array.from({ length: 1000 }, () => tokens.get(identity, 'https://storage.azure.com')));
  assert.equal(imds.calls, calls + 1);
  assert.equal(new Set(all.map((t) => t.accessToken)).size, 1);
  assert.equal(decodeStandinToken(all[0]!.accessToken).identity, `client_id:${identity.clientID}`);
});

test('peek does not fetch', () => {
  const tokens = cache();
  const calls = imds.calls;
  assert.equal(tokens.peek(msi(), 'https://vault.azure.net'), undefined);
  assert.equal(imds.calls, calls);
});

test('different resources and identity versions are different entries', async () => {
  const tokens = cache();
  const identity = msi();
  const calls = imds.calls;
  const vault = await tokens.get(identity, 'https://vault.azure.net');
  const arm = await tokens.get(identity, 'https://management.azure.com/');
  const changed = await tokens.get({ ...identity, version: '2' }, 'https://vault.azure.net');
  assert.equal(imds.calls, calls + 3);
  assert.equal(decodeStandinToken(arm.accessToken).aud, 'https://management.azure.com/');
  assert.notEqual(serial(vault), serial(changed));
});

test('refresh ahead: once, near 80% of the lifetime, serving the old token meanwhile', async () => {
  const tokens = cache();
  const identity = msi();
  const resource = 'https://vault.azure.net';
  const calls = imds.calls;
  const old = await tokens.get(identity, resource);

  clock.advanceSec(lifetimeSec * 0.7);
  assert.equal(serial(await tokens.get(identity, resource)), serial(old));
  assert.equal(imds.calls, calls + 1, 'no refresh at 70%');

  clock.advanceSec(lifetimeSec * 0.11); // 81%
  assert.equal(serial(await tokens.get(identity, resource)), serial(old), 'the old token is served while refreshing');
  await waitFor('the refreshed token replaces the old one', () => serial(tokens.peek(identity, resource)) !== serial(old), 2_000, 5);
  assert.equal(imds.calls, calls + 2);
  for (let i = 0; i < 5; i++) await tokens.get(identity, resource);
  assert.equal(imds.calls, calls + 2, 'one refresh only');
  assert.equal(tokens.stats().refreshes, 1);
  assert.equal(tokens.stats().misses, 1);
});

test('a token past its serving time is fetched again, the caller waiting', async () => {
  const tokens = cache();
  const identity = msi();
  const old = await tokens.get(identity, 'https://vault.azure.net');
  clock.advanceSec(lifetimeSec * 0.95); // within the last tenth: not served any more
  assert.equal(tokens.peek(identity, 'https://vault.azure.net'), undefined);
  const fresh = await tokens.get(identity, 'https://vault.azure.net');
  assert.notEqual(serial(fresh), serial(old));
  assert.equal(tokens.stats().misses, 2);
});

test('a failed background refresh keeps serving the token and retries later', async () => {
  const tokens = cache({ retry: { attempts: 1 }, refreshRetryMs: 30_000 });
  const identity = msi();
  const resource = 'https://vault.azure.net';
  const old = await tokens.get(identity, resource);
  clock.advanceSec(lifetimeSec * 0.81);
  imds.failNext(1, { status: 500 });
  const calls = imds.calls;
  assert.equal(serial(await tokens.get(identity, resource)), serial(old));
  await waitFor('the refresh failed', () => tokens.stats().upstreamErrors.server === 1, 2_000, 5);
  await waitFor('settled', () => tokens.peek(identity, resource) !== undefined, 2_000, 5);
  assert.equal(serial(tokens.peek(identity, resource)), serial(old));
  assert.equal(imds.calls, calls + 1);
  clock.advanceSec(10); // before refreshRetryMs
  await tokens.get(identity, resource);
  assert.equal(imds.calls, calls + 1);
  clock.advanceSec(25); // past it
  await tokens.get(identity, resource);
  await waitFor('the second refresh succeeded', () => serial(tokens.peek(identity, resource)) !== serial(old), 2_000, 5);
  assert.equal(imds.calls, calls + 2);
});

test('429 with Retry-After, then success: the retries wait as told', async () => {
  const tokens = cache();
  imds.failNext(2, { status: 429, headers: { 'retry-after': '2' } });
  const calls = imds.calls;
  const token = await tokens.get(msi(), 'https://vault.azure.net');
  assert.ok(token.accessToken);
  assert.equal(imds.calls, calls + 3);
  assert.deepEqual(sleeps, [2000, 2000]);
  assert.equal(tokens.stats().upstreamErrors.throttled, 2);
});

test('500s, then success: exponential backoff with jitter', async () => {
  const tokens = cache({ retry: { baseDelayMs: 100, maxDelayMs: 1000 }, random: () => 0 });
  imds.failNext(3, { status: 500 });
  const calls = imds.calls;
  await tokens.get(msi(), 'https://vault.azure.net');
  assert.equal(imds.calls, calls + 4);
  assert.deepEqual(sleeps, [50, 100, 200]); // half of 100, 200, 400 with random() = 0
  assert.equal(tokens.stats().upstreamErrors.server, 3);
});

test('an upstream that stays down: bounded attempts, then the last error', async () => {
  const tokens = cache({ retry: { attempts: 3 } });
  imds.failNext(3, { status: 503, headers: { 'retry-after': '1' } });
  const calls = imds.calls;
  const err = await rejection(tokens.get(msi(), 'https://vault.azure.net'));
  assert.ok(err instanceof UpstreamError);
  assert.equal(err.kind, 'server');
  assert.equal(err.retryAfterMs, 1000);
  assert.equal(imds.calls, calls + 3);
  assert.deepEqual(sleeps, [1000, 1000]);
  assert.equal(tokens.size, 0, 'a failure is not cached');
});

test('a Retry-After beyond the retry budget ends the retries at once', async () => {
  const tokens = cache({ retry: { retryWindowMs: 5_000 } });
  imds.failNext(1, { status: 429, headers: { 'retry-after': '60' } });
  const calls = imds.calls;
  const err = await rejection(tokens.get(msi(), 'https://vault.azure.net'));
  assert.ok(err instanceof UpstreamError);
  assert.equal(err.kind, 'throttled');
  assert.equal(err.retryAfterMs, 60_000);
  assert.equal(imds.calls, calls + 1);
  assert.deepEqual(sleeps, []);
});

test("an issuer's Retry-After of a day is taken as limits.maxRetryAfterMs: the budget pauses that long, not a day", async () => {
  const budget = new UpstreamBudget('IMDS', { maxConcurrent: 1, ratePerSec: 100 }, { now: clock.now });
  const tokens = cache({ budgetFor: () => budget });
  imds.failNext(1, { status: 429, headers: { 'retry-after': '86400' } });
  const err = await rejection(tokens.get(msi(), 'https://vault.azure.net'));
  assert.ok(err instanceof UpstreamError);
  assert.equal(err.kind, 'throttled');
  assert.equal(err.retryAfterMs, limits.maxRetryAfterMs);
  assert.deepEqual(sleeps, [], 'beyond the retry budget: no retry');
  assert.equal(budget.stats().throttled, 1);
  clock.advanceSec(limits.maxRetryAfterMs / 1000);
  const next = tokens.get(msi(), 'https://vault.azure.net');
  const ended = await Promise.race([next.then(() => 'token'), wait(2_000).then(() => 'still paused')]);
  assert.equal(ended, 'token', 'a minute later the budget lets calls go');
});

test('an IMDS that hangs: timeouts, retried a bounded number of times', async () => {
  const tokens = cache({ retry: { attempts: 2 } });
  imds.hang(true);
  const calls = imds.calls;
  try {
    const err = await rejection(tokens.get(msi(), 'https://vault.azure.net'));
    assert.ok(err instanceof UpstreamError, String(err));
    assert.equal(err.kind, 'timeout');
    assert.equal(imds.calls, calls + 2);
    assert.equal(tokens.stats().upstreamErrors.timeout, 2);
  } finally {
    imds.hang(false);
  }
});

test("IMDS's 410 and 404 (being updated): retried with backoff for up to 70 s, then the last error", async () => {
  // Sleeps move the clock, so the budget is spent as it would be.
  const moving = { sleep: async (ms: number) => { sleeps.push(ms); clock.advanceSec(ms / 1000); } };
  for (const status of [410, 404]) {
    sleeps = [];
    const tokens = cache({ ...moving, random: () => 0 });
    imds.failNext(5, { status });
    const calls = imds.calls;
    assert.ok((await tokens.get(msi(), 'https://vault.azure.net')).accessToken, `${status} then a token`);
    assert.equal(imds.calls, calls + 6, 'more than the 4 attempts other errors get');
    assert.deepEqual(sleeps, [125, 250, 500, 1000, 2000]);
    assert.equal(tokens.stats().upstreamErrors.updating, 5);
    assert.equal(tokens.stats().upstreamErrors.client, 0);

    sleeps = [];
    imds.failNext(100, { status });
    const before = imds.calls;
    const err = await rejection(tokens.get(msi(), 'https://vault.azure.net'));
    imds.failNext(0, { status });
    assert.ok(err instanceof UpstreamError);
    assert.equal(err.kind, 'updating');
    assert.equal(err.status, status);
    const waited = sleeps.reduce((a, b) => a + b, 0);
    assert.ok(waited <= 70_000 && waited > 60_000, `waited ${waited} ms`);
    assert.equal(imds.calls - before, sleeps.length + 1);
  }
});

test('a 400 is passed on, not retried, and answered again without asking until it expires', async () => {
  const tokens = cache({ rememberMs: 30_000 });
  const identity = msi();
  const body = { error: 'invalid_request', error_description: 'Identity not found' };
  imds.failNext(1, { status: 400, body });
  const calls = imds.calls;
  const err = await rejection(tokens.get(identity, 'https://vault.azure.net'));
  assert.ok(err instanceof UpstreamError);
  assert.equal(err.kind, 'client');
  assert.deepEqual(err.body, body);
  assert.deepEqual(sleeps, []);
  assert.equal(imds.calls, calls + 1);
  assert.equal(tokens.size, 0);
  // Within the time the refusal is remembered: the same answer, IMDS not asked.
  clock.advanceSec(29);
  assert.equal(await rejection(tokens.get(identity, 'https://vault.azure.net')), err);
  assert.equal(imds.calls, calls + 1);
  assert.equal(tokens.stats().rememberedHits, 1);
  // Another resource of the same identity is its own key.
  assert.ok((await tokens.get(identity, 'https://storage.azure.com')).accessToken);
  clock.advanceSec(2);
  assert.ok((await tokens.get(identity, 'https://vault.azure.net')).accessToken);
  assert.equal(imds.calls, calls + 3);
});

test('a remembered refusal goes with its identity, and retries, timeouts and 5xx are never remembered', async () => {
  const tokens = cache();
  const identity = msi();
  imds.failNext(1, { status: 400 });
  await rejection(tokens.get(identity, 'https://vault.azure.net'));
  tokens.invalidate(identityKey(identity));
  const calls = imds.calls;
  assert.ok((await tokens.get(identity, 'https://vault.azure.net')).accessToken);
  assert.equal(imds.calls, calls + 1);
  const other = msi();
  imds.failNext(4, { status: 500 });
  await rejection(tokens.get(other, 'https://vault.azure.net'));
  assert.ok((await tokens.get(other, 'https://vault.azure.net')).accessToken);
});

test('an identity its Secret or certificate makes unusable is tried once, its refusal answered again for 30 s, and dropped with the identity', async () => {
  const resource = 'https://vault.azure.net';
  let fetched = 0;
  const unusable = new NmiError(codes.TOKEN, 'identity default/sp: cannot read the private key (wrong or missing password?)');
  const broken = cache({ provider: { fetch: async () => { fetched++; throw unusable; } } });
  const identity = msi();
  for (let i = 0; i < 200; i++) assert.equal(await rejection(broken.get(identity, resource)), unusable);
  assert.equal(fetched, 1);
  assert.equal(broken.stats().rememberedHits, 199);
  assert.equal(broken.describe(new Set([identityKey(identity)]))[0]?.state, 'refused');
  clock.advanceSec(31);
  await rejection(broken.get(identity, resource));
  assert.equal(fetched, 2, 'asked again once the refusal expires');

  // A credential given as how to build it is built only when a call is to be made: a missing Secret is read once.
  let built = 0;
  const noSecret = new NmiError(codes.BINDINGS, 'AzureIdentity default/sp: secret default/sp not found');
  const credential = () => {
    built++;
    throw noSecret;
  };
  const tokens = cache();
  const sp = msi();
  const calls = imds.calls;
  for (let i = 0; i < 200; i++) assert.equal(await rejection(tokens.get(sp, resource, credential)), noSecret);
  assert.equal(built, 1);
  assert.equal(imds.calls, calls, 'nothing went upstream');
  // The identity or its Secret changed: the refusal goes with the entry.
  tokens.invalidate(identityKey(sp));
  assert.ok((await tokens.get(sp, resource, () => undefined)).accessToken);
  assert.equal(built, 1);
  assert.equal(imds.calls, calls + 1);
});

test('invalidate during an in-flight fetch: the waiter gets the token, the cache does not keep it', async () => {
  const tokens = cache();
  const identity = msi();
  imds.hang(true);
  const calls = imds.calls;
  const pending = tokens.get(identity, 'https://vault.azure.net');
  try {
    await waitFor('the fetch reached IMDS', () => imds.calls === calls + 1, 2_000, 5);
    tokens.invalidate(identityKey(identity));
  } finally {
    imds.hang(false);
  }
  const token = await pending;
  assert.ok(token.accessToken);
  assert.equal(tokens.peek(identity, 'https://vault.azure.net'), undefined);
  assert.equal(tokens.size, 0);
  const again = await tokens.get(identity, 'https://vault.azure.net');
  assert.equal(imds.calls, calls + 2);
  assert.notEqual(serial(again), serial(token));
});

test('invalidate drops every resource of one identity and nothing else', async () => {
  const tokens = cache();
  const a = msi();
  const b = msi();
  await tokens.get(a, 'https://vault.azure.net');
  await tokens.get(a, 'https://storage.azure.com');
  await tokens.get(b, 'https://vault.azure.net');
  tokens.invalidate(identityKey(a));
  assert.equal(tokens.size, 1);
  assert.equal(tokens.peek(a, 'https://vault.azure.net'), undefined);
  assert.equal(tokens.peek(a, 'https://storage.azure.com'), undefined);
  assert.ok(tokens.peek(b, 'https://vault.azure.net'));
});

test('retainOnly keeps the identities still in use', async () => {
  const tokens = cache();
  const [a, b, c] = [msi(), msi(), msi()];
  for (const identity of [a, b, c]) await tokens.get(identity, 'https://vault.azure.net');
  tokens.retainOnly([identityKey(b)]);
  assert.equal(tokens.size, 1);
  assert.ok(tokens.peek(b, 'https://vault.azure.net'));
  assert.equal(tokens.peek(a, 'https://vault.azure.net'), undefined);
  assert.equal(tokens.peek(c, 'https://vault.azure.net'), undefined);
});

test('the size is bounded: the least recently used entry goes', async () => {
  const tokens = cache({ max: 3 });
  const identity = msi();
  const resources = ['https://a.example', 'https://b.example', 'https://c.example', 'https://d.example'];
  for (const resource of resources) await tokens.get(identity, resource);
  assert.equal(tokens.size, 3);
  assert.equal(tokens.peek(identity, 'https://a.example'), undefined);
  assert.ok(tokens.peek(identity, 'https://d.example'));
});

test('a hit makes its entry the most recently used, and an equal identity object finds the same entry', async () => {
  const tokens = cache({ max: 3 });
  const identity = msi();
  for (const resource of ['https://a.example', 'https://b.example', 'https://c.example']) await tokens.get(identity, resource);
  const a = tokens.peek(identity, 'https://a.example');
  assert.ok(a);
  await tokens.get(identity, 'https://d.example');
  assert.equal(tokens.peek({ ...identity }, 'https://a.example'), a);
  assert.equal(tokens.peek(identity, 'https://b.example'), undefined);
  assert.equal(tokens.stats().upstreamRequests.imds, 4);
});

test('metrics read the counters at scrape time', async () => {
  const tokens = cache();
  const registry = new Registry();
  registerTokenMetrics(registry, tokens);
  const identity = msi();
  await tokens.get(identity, 'https://vault.azure.net');
  await tokens.get(identity, 'https://vault.azure.net');
  imds.failNext(1, { status: 400 });
  await rejection(tokens.get(msi(), 'https://vault.azure.net'));
  const text = await registry.metrics();
  assert.match(text, /^nmi_tokens_cached 1$/m);
  assert.match(text, /^nmi_token_cache_requests_total\{result="hit"\} 1$/m);
  assert.match(text, /^nmi_token_cache_requests_total\{result="miss"\} 2$/m);
  assert.match(text, /^nmi_token_cache_requests_total\{result="refusal"\} 0$/m);
  assert.match(text, /^nmi_upstream_requests_total\{kind="imds"\} 2$/m);
  assert.match(text, /^nmi_upstream_errors_total\{kind="client"\} 1$/m);
  assert.match(text, /^nmi_token_refreshes_total 0$/m);
});
