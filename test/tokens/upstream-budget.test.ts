// The token cache inside the upstream budget, over the real msal provider and
// a stand-in IMDS that throttles as IMDS documents (429 past 5 concurrent or
// 20 per second), on real time.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as wait } from 'node:timers/promises';
import { IdentityType, type AzureIdentity } from '../../src/bindings/model.js';
import { BudgetError } from '../../src/budget/budget.js';
import { Budgets } from '../../src/budget/budgets.js';
import { MsalTokenProvider } from '../../src/tokens/msal-provider.js';
import { NetworkClient } from '../../src/tokens/network-client.js';
import type { PodRef } from '../../src/tokens/pod-bounds.js';
import { TokenCache, type TokenCacheOptions } from '../../src/tokens/token-cache.js';
import { decodeStandinToken, startImds, type ImdsStandin } from '../standins/imds.js';
import { freshMsi } from '../harness/identities.js';
import { captureLogs } from '../harness/log-capture.js';
import { startEntra, type EntraStandin } from '../standins/entra.js';
import { createPki } from '../standins/pki.js';

const imdsLimits = { maxConcurrent: 5, ratePerSec: 20 };
let imds: ImdsStandin;
let network: NetworkClient;
let provider: MsalTokenProvider;

const msi = freshMsi;

const pod = (name: string): PodRef => ({ key: `uid-${name}`, name: `apps/${name}` });

function budgeted(options: Partial<TokenCacheOptions> & { maxPendingPerPod?: number } = {}): { tokens: TokenCache; budgets: Budgets } {
  const { maxPendingPerPod = 1000, ...rest } = options;
  const budgets = new Budgets({ imds: imdsLimits, imdsMetadata: imdsLimits, entra: imdsLimits, maxPendingPerPod, maxWaitMs: 60_000 });
  const tokens = new TokenCache({ provider, budgetFor: () => budgets.imds, onThrottled: (reason) => budgets.throttled(reason), ...rest });
  return { tokens, budgets };
}

before(async () => {
  imds = await startImds({ expiresInSec: 10, throttle: { maxConcurrent: 5, perSecond: 20, latencyMs: 30 } });
  network = new NetworkClient({ headersTimeoutMs: 2000 });
  provider = new MsalTokenProvider({ upstreamImds: imds.url, aadAuthorityHost: 'https://login.microsoftonline.com', network });
});

after(async () => {
  await network.close();
  await imds.close();
});

test("a flood of distinct resources from one pod never makes IMDS throttle, and another pod's first token goes past it", async () => {
  const { tokens, budgets } = budgeted();
  const identity = msi();
  const throttledBefore = imds.throttle!.throttled;
  let floodDone = 0;
  const flood = Array.from({ length: 60 }, (_, i) =>
    tokens.get(identity, `https://flood-${i}.example`, undefined, pod('flood')).then(() => floodDone++),
  );
  await wait(300);
  const other = await tokens.get(msi(), 'https://vault.azure.net', undefined, pod('other'));
  const doneWhenOtherGotIts = floodDone;
  assert.ok(other.accessToken);
  await Promise.all(flood);
  assert.equal(imds.throttle!.throttled - throttledBefore, 0, 'IMDS answered 429');
  assert.ok(imds.throttle!.peakConcurrent <= 5);
  assert.ok(doneWhenOtherGotIts < 30, `the other pod waited for ${doneWhenOtherGotIts} of the flood's 60 calls`);
  assert.equal(budgets.imds.stats().throttled, 0);
});

test('a token in use is refreshed before it expires while a flood runs', async () => {
  const { tokens } = budgeted({ random: () => 0.5 });
  const used = msi();
  const first = await tokens.get(used, 'https://vault.azure.net', undefined, pod('user'));
  const firstSerial = decodeStandinToken(first.accessToken).serial;
  const expiresAtMs = first.expiresOn * 1000;
  // Starts before the refresh point (about 7.75 s of 10) and lasts past expiry: 240 keys at 20 per second.
  await wait(Math.max(0, expiresAtMs - 10_000 + 6_500 - Date.now()));
  const identity = msi();
  const flood = Array.from({ length: 240 }, (_, i) => tokens.get(identity, `https://flood-${i}.example`, undefined, pod('flood')).catch(() => undefined));
  let refreshedSerial: number | undefined;
  while (Date.now() < expiresAtMs - 200) {
    // The pod keeps using its token, as it would through the fast path's window.
    const served = tokens.peek(used, 'https://vault.azure.net');
    assert.ok(served, `no token served ${expiresAtMs - Date.now()} ms before expiry`);
    const serial = decodeStandinToken(served.accessToken).serial;
    if (serial !== firstSerial) {
      refreshedSerial = serial;
      break;
    }
    await wait(50);
  }
  assert.ok(refreshedSerial !== undefined, 'the token in use was not refreshed before it expired');
  await Promise.all(flood);
});

test('a pod over its tokens or its waiting calls gets 429s; another pod does not; said once a minute', async () => {
  const { log, lines } = captureLogs('warn');
  const { tokens, budgets } = budgeted({ maxTokensPerPod: 3, maxPendingPerPod: 2, logger: log });
  const identity = msi();
  for (let i = 0; i < 3; i++) await tokens.get(identity, `https://held-${i}.example`, undefined, pod('greedy'));
  const refused = await tokens.get(identity, 'https://held-3.example', undefined, pod('greedy')).then(
    () => assert.fail('a fourth key was served'),
    (err: unknown) => err,
  );
  assert.ok(refused instanceof BudgetError && refused.reason === 'pod-tokens' && refused.retryAfterS > 0);
  // Its held keys still answer, and another pod gets the refused key.
  assert.ok(await tokens.get(identity, 'https://held-0.example', undefined, pod('greedy')));
  assert.ok(await tokens.get(identity, 'https://held-3.example', undefined, pod('modest')));

  imds.hang(true);
  let pending: Promise<unknown>[] = [];
  try {
    const busy = msi();
    pending = [0, 1, 2].map((i) => tokens.get(busy, `https://wait-${i}.example`, undefined, pod('impatient')).catch((err: unknown) => err));
    const modest = tokens.get(busy, 'https://wait-modest.example', undefined, pod('modest2'));
    const outcomes = await Promise.race([Promise.all(pending.slice(2)), wait(500).then(() => undefined)]);
    assert.ok(outcomes, 'the call past the pod\'s waiting bound was not refused at once');
    const [fourth] = outcomes;
    assert.ok(fourth instanceof BudgetError && fourth.reason === 'pod-pending', String(fourth));
    pending.push(modest);
  } finally {
    imds.hang(false);
  }
  const results = await Promise.all(pending);
  assert.equal(results.filter((r) => r instanceof BudgetError).length, 1);
  assert.deepEqual(budgets.throttles(), { 'pod-tokens': 1, 'pod-pending': 1, 'queue-timeout': 0 });
  const said = lines().filter((l) => l.msg.startsWith('pod over its upstream bounds'));
  assert.deepEqual(said.map((l) => l.pod), ['apps/greedy', 'apps/impatient']);
  // Refused again within the minute: not said again.
  await tokens.get(identity, 'https://held-4.example', undefined, pod('greedy')).catch(() => undefined);
  assert.equal(lines().filter((l) => l.msg.startsWith('pod over its upstream bounds')).length, 2);
  // A pod gone from the node leaves nothing behind: its uid starts afresh.
  tokens.retainPods([]);
  assert.ok(await tokens.get(identity, 'https://held-5.example', undefined, pod('greedy')));
});

test("IMDS's 410 then 200 is retried into a 200, each attempt taking its turn", async () => {
  const { tokens, budgets } = budgeted();
  imds.failNext(1, { status: 410 });
  const granted = budgets.imds.stats().granted;
  assert.ok((await tokens.get(msi(), 'https://vault.azure.net', undefined, pod('patient'))).accessToken);
  assert.equal(budgets.imds.stats().granted - granted, 2);
});

test('a key a pod retries after IMDS refused it costs the budget once', async () => {
  const { tokens, budgets } = budgeted();
  const identity = msi();
  imds.failNext(1, { status: 400, body: { error: 'invalid_request', error_description: 'Identity not found' } });
  const granted = budgets.imds.stats().granted;
  for (let i = 0; i < 5; i++) await tokens.get(identity, 'https://vault.azure.net', undefined, pod('retrier')).catch(() => undefined);
  assert.equal(budgets.imds.stats().granted - granted, 1);
});

test("each Entra ID tenant has its own budget: a flood toward one never draws a 429 from it, and another tenant's first token does not wait for it", async () => {
  const pki = createPki('entra-budget');
  const entra: EntraStandin = await startEntra({ pki, throttle: { maxConcurrent: 3, perSecond: 10, latencyMs: 20 } });
  const entraNetwork = new NetworkClient({ ca: entra.caPem, headersTimeoutMs: 2000 });
  try {
    const apps = ['tenant-one', 'tenant-two'].map((tenantId, i) => ({ tenantId, clientId: `aaaaaaaa-0000-0000-0000-00000000000${i}`, clientSecret: `secret-${i}` }));
    for (const app of apps) entra.register(app);
    const entraProvider = new MsalTokenProvider({ upstreamImds: imds.url, aadAuthorityHost: entra.url, network: entraNetwork });
    const limits = { maxConcurrent: 3, ratePerSec: 10 };
    const budgets = new Budgets({ imds: imdsLimits, imdsMetadata: imdsLimits, entra: limits, maxPendingPerPod: 1000, maxWaitMs: 60_000 });
    const sp = (i: number): AzureIdentity => ({ ...msi(), type: IdentityType.ServicePrincipal, clientID: apps[i]!.clientId, tenantID: apps[i]!.tenantId });
    const tokens = new TokenCache({ provider: entraProvider, budgetFor: (identity) => budgets.entra(`${entra.url}/${identity.tenantID}`) });
    const [one, two] = [sp(0), sp(1)];
    let floodDone = 0;
    const flood = Array.from({ length: 30 }, (_, i) =>
      tokens.get(one, `https://flood-${i}.example`, { clientSecret: apps[0]!.clientSecret }, pod('flood')).then(() => floodDone++),
    );
    await wait(200);
    assert.ok(await tokens.get(two, 'https://vault.azure.net', { clientSecret: apps[1]!.clientSecret }, pod('other')));
    const doneWhenOtherGotIts = floodDone;
    await Promise.all(flood);
    assert.equal(entra.throttled().count, 0, 'Entra ID answered 429');
    assert.ok(doneWhenOtherGotIts < 15, `the other tenant's call waited for ${doneWhenOtherGotIts} of the flood's 30`);
    assert.equal([...budgets.all()].filter(([upstream]) => upstream === 'entra').length, 2);
  } finally {
    await entraNetwork.close();
    await entra.close();
    pki.remove();
  }
});
