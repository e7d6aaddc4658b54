// The js token server over real sockets: every check with its exact status and
// body, the caller → identity → token flow, the proxy against a real upstream
// stand-in, and the connection limits and lifecycle. The pod index, bindings
// and token cache are small in-test implementations of their interfaces.
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import net from 'node:net';
import { once } from 'node:events';
import { Client, request } from 'undici';
import { Registry } from 'prom-client';
import type { Pod } from '../../src/kubelet/pod.js';
import { codes, NmiError } from '../../src/errors/errors.js';
import { captureLogs } from '../harness/log-capture.js';
import { silentLogger } from '../../src/log/logger.js';
import type { Token } from '../../src/tokens/token.js';
import { checkedHeaders, type RequestHeaders } from '../../src/server/request.js';
import type { TokenServerDeps, TokenServerOptions } from '../../src/server/core.js';
import { UpstreamBudget } from '../../src/budget/budget.js';
import { TokenCache } from '../../src/tokens/token-cache.js';
import { limits } from '../../src/config/limits.js';
import { createTokenServer, type TokenServer } from '../../src/server/token-server.js';
import { FIXED_REPLY, startImds, type ImdsStandin } from '../standins/imds.js';
import { assertProblem, idA, idB, newWorld, parseAnswer, pod, QUERY, TOKEN, tokenFor, worldDeps, type RawAnswer, type World } from './token-world.js';

let upstream: ImdsStandin;
let world: World;
const servers: TokenServer[] = [];

/** With `cached`, the server also gets the synchronous hit path: known callers and a peek into these tokens. */
async function startServer(options: Partial<TokenServerOptions> = {}, registry?: Registry, upstreamUrl?: URL, cached?: Map<string, Token>, log = silentLogger, extra: Partial<TokenServerDeps> = {}) {
  const server = createTokenServer(worldDeps(() => world, upstreamUrl ?? new URL(upstream.url), { options, registry, cached, log, extra }));
  await server.listen('127.0.0.1', 0);
  servers.push(server);
  return { server, port: server.port! };
}

let port: number;
before(async () => {
  upstream = await startImds({ reply: FIXED_REPLY });
  world = newWorld();
  ({ port } = await startServer());
});
after(async () => {
  for (const s of servers) await s.close(1_000);
  await upstream.close();
});

function reset(): void {
  world = newWorld();
  upstream.requests = [];
  upstream.reply = FIXED_REPLY;
}

/** One request written byte for byte (undici would refuse or rewrite the malformed ones), answer read to EOF. */
async function raw(text: string, opts: { port?: number; localAddress?: string } = {}): Promise<RawAnswer> {
  const socket = net.connect({ port: opts.port ?? port, host: '127.0.0.1', localAddress: opts.localAddress });
  await once(socket, 'connect');
  socket.write(text);
  const chunks: Buffer[] = [];
  socket.on('data', (chunk: Buffer) => chunks.push(chunk));
  await once(socket, 'close');
  return parseAnswer(Buffer.concat(chunks).toString('latin1'));
}

/** A one-shot request with Connection: close. */
function get(target: string, headers: Record<string, string> = { Metadata: 'true' }, opts: { method?: string; port?: number; localAddress?: string } = {}) {
  const lines = Object.entries(headers).map(([name, value]) => `${name}: ${value}\r\n`).join('');
  return raw(`${opts.method ?? 'GET'} ${target} HTTP/1.1\r\nHost: 169.254.169.254\r\n${lines}Connection: close\r\n\r\n`, opts);
}

// ---- checks 1–5 ----

test('1: a non-GET token request is 405 with Allow: GET, before any lookup', async () => {
  reset();
  for (const method of ['POST', 'PUT', 'DELETE', 'HEAD']) {
    const answer = await get(`${TOKEN}?${QUERY}`, { Metadata: 'true', 'Content-Length': '0' }, { method });
    assert.equal(answer.status, 405, method);
    assert.equal(answer.headers['allow'], 'GET');
    if (method !== 'HEAD') assertProblem(answer, 405, 'method_not_allowed', 'Only GET is allowed on the token endpoint');
  }
  assert.deepEqual(world.lookups, []);
});

test('2: a missing or wrong Metadata header is 400 before any lookup', async () => {
  reset();
  for (const headers of [{}, { Metadata: 'false' }, { Metadata: '1' }, { Metadata: '' }, { 'X-Metadata': 'true' }] as Array<Record<string, string>>) {
    assertProblem(await get(`${TOKEN}?${QUERY}`, headers), 400, 'invalid_request', 'Required metadata header not specified');
  }
  assert.deepEqual(world.lookups, []);
  assert.deepEqual(world.tokenCalls, []);
  // Header name and value compare case-insensitively.
  assert.equal((await get(`${TOKEN}?${QUERY}`, { mEtAdAtA: 'True' })).status, 200);
});

test('2-3: the headers are read as node:http joins them: a repeated Metadata header is refused, an empty Via counts', async () => {
  reset();
  const head = `GET ${TOKEN}?${QUERY} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n`;
  assertProblem(await raw(`${head}Metadata: true\r\nmetadata: true\r\n\r\n`), 400, 'invalid_request', 'Required metadata header not specified');
  assertProblem(await raw(`${head}Metadata: true\r\nvia:\r\n\r\n`), 400, 'invalid_request', 'Forwarded requests are not allowed: X-Forwarded-For, Forwarded or Via header present');
  assert.equal((await raw(`${head}Metadata:   TRUE  \r\nVia-Proxy: x\r\nMetadatas: false\r\n\r\n`)).status, 200);
  assert.deepEqual(world.tokenCalls.length, 1);
});

test('checkedHeaders gives what req.headers holds for the checked names, for the same bytes', async () => {
  const seen: Array<[RequestHeaders, RequestHeaders]> = [];
  const plain = http.createServer((req, res) => {
    const fromNode = Object.fromEntries(['metadata', 'x-forwarded-for', 'forwarded', 'via'].filter((n) => req.headers[n] !== undefined).map((n) => [n, req.headers[n]]));
    seen.push([fromNode, checkedHeaders(req.rawHeaders)]);
    res.end();
  });
  plain.listen(0, '127.0.0.1');
  await once(plain, 'listening');
  const blocks = [
    'Metadata: true\r\nMETADATA: True\r\nmetadata:\r\n',
    'X-Forwarded-For: 10.0.0.1\r\nx-forwarded-for: 10.0.0.2\r\nForwarded: for=10.0.0.3\r\nVIA: 1.1 a\r\nVia: 1.1 b\r\n',
    'Metadatx: true\r\nVix: x\r\nForwardes: x\r\nX-Forwarded-Fox: x\r\nUser-Agent: t\r\n',
    'metadata: \ttrue \r\n',
    '',
  ];
  try {
    for (const block of blocks) {
      const answer = await raw(`GET / HTTP/1.1\r\nHost: x\r\n${block}Connection: close\r\n\r\n`, { port: (plain.address() as net.AddressInfo).port });
      assert.equal(answer.status, 200);
    }
  } finally {
    plain.close();
  }
  assert.equal(seen.length, blocks.length);
  for (const [fromNode, checked] of seen) assert.deepEqual(checked, fromNode);
  assert.deepEqual(seen[0]![1], { metadata: 'true, True, ' });
});

test('2: with --metadata-header-required=false the header is not needed', async () => {
  reset();
  const lax = await startServer({ metadataHeaderRequired: false });
  assert.equal((await get(`${TOKEN}?${QUERY}`, {}, { port: lax.port })).status, 200);
});

test('3: X-Forwarded-For, Forwarded and Via are each refused with 400', async () => {
  reset();
  for (const header of ['X-Forwarded-For', 'Forwarded', 'Via']) {
    const answer = await get(`${TOKEN}?${QUERY}`, { Metadata: 'true', [header]: '10.0.0.9' });
    assertProblem(answer, 400, 'invalid_request', 'Forwarded requests are not allowed: X-Forwarded-For, Forwarded or Via header present');
  }
  assert.deepEqual(world.lookups, []);
});

test('4: a missing or unknown api-version is 400 bad_request', async () => {
  reset();
  assertProblem(await get(`${TOKEN}?resource=r`), 400, 'bad_request', 'Required api-version parameter not specified');
  for (const version of ['2017-09-01', '2018-02-02', 'garbage', '']) {
    assertProblem(await get(`${TOKEN}?resource=r&api-version=${version}`), 400, 'bad_request', 'Invalid or bad API version specified');
  }
  assert.equal((await get(`${TOKEN}?resource=r&api-version=2025-04-07`)).status, 200);
  assert.deepEqual(world.lookups, ['127.0.0.1']);
});

test('5: a missing resource, a repeated parameter, or two ids is 400', async () => {
  reset();
  const v = 'api-version=2019-08-01';
  assertProblem(await get(`${TOKEN}?${v}`), 400, 'invalid_request', 'Required audience parameter not specified');
  assertProblem(await get(`${TOKEN}?${v}&resource=`), 400, 'invalid_request', 'Required audience parameter not specified');
  for (const query of [`${QUERY}&resource=r2`, `${QUERY}&reso%75rce=r2`, `${QUERY}&api-version=2019-08-01`, `${QUERY}&client_id=a&client_id=a`]) {
    assertProblem(await get(`${TOKEN}?${query}`), 400, 'invalid_request', 'A query parameter is specified more than once');
  }
  for (const ids of ['client_id=a&msi_res_id=b', 'client_id=a&object_id=b', 'msi_res_id=a&mi_res_id=a', 'object_id=a&mi_res_id=b']) {
    assertProblem(await get(`${TOKEN}?${QUERY}&${ids}`), 400, 'invalid_request', 'Only one of client_id, object_id, msi_res_id or mi_res_id may be specified');
  }
  assertProblem(await get(`${TOKEN}?${QUERY}&a=%zz`), 400, 'invalid_request', 'Malformed query string');
  assert.deepEqual(world.lookups, []);
});

// ---- path hygiene and routing ----

test('backslashes, dot segments (also %2e), encoded slashes and doubled slashes are 400', async () => {
  reset();
  const cases: Array<[string, string]> = [
    ['/metadata\\identity\\oauth2\\token', 'backslashes are not allowed'],
    ['/metadata/identity/oauth2/x/../token', 'dot segments are not allowed'],
    ['/metadata/identity/./oauth2/token', 'dot segments are not allowed'],
    ['/metadata/identity/oauth2/x/%2e%2e/token', 'dot segments are not allowed'],
    ['/metadata/identity/oauth2/x/%2E./token', 'dot segments are not allowed'],
    ['/metadata/instance/%2e', 'dot segments are not allowed'],
    ['/metadata/identity%2foauth2/token', 'encoded slashes are not allowed'],
    ['/metadata/identity/oauth2%5Ctoken', 'encoded slashes are not allowed'],
    ['/metadata//identity/oauth2/token', 'doubled slashes are not allowed'],
    ['//metadata/instance', 'doubled slashes are not allowed'],
  ];
  for (const [path, why] of cases) {
    assertProblem(await get(`${path}?${QUERY}`), 400, 'invalid_request', `Invalid request path: ${why}`);
  }
  assert.deepEqual(world.lookups, []);
  assert.deepEqual(upstream.requests, [], 'nothing reached the upstream');
});

test('unknown paths are 404 JSON', async () => {
  reset();
  for (const path of ['/', '/foo', '/metadata', '/metadata/identity/oauth2/tokens', '/metadata/INSTANCE', '/metadata/identity/info']) {
    assertProblem(await get(path), 404, 'not_found', 'The requested metadata path was not found');
  }
  assert.deepEqual(upstream.requests, []);
});

test('an absolute-form target and a malformed request are 400 JSON', async () => {
  reset();
  assertProblem(await get(`http://169.254.169.254${TOKEN}?${QUERY}`), 400, 'invalid_request', 'Invalid request target: only an absolute path is accepted');
  assertProblem(await raw('NOT HTTP AT ALL\r\n\r\n'), 400, 'invalid_request', 'Malformed HTTP request');
});

// ---- steps 6–8 ----

test('6: an address no pod owns is 404 not_found, after asking the lookup for that address', async () => {
  reset();
  const answer = await get(`${TOKEN}?${QUERY}`, { Metadata: 'true' }, { localAddress: '127.0.0.2' });
  assertProblem(answer, 404, 'not_found', 'No pod of this node owns the source address of the request');
  assert.deepEqual(world.lookups, ['127.0.0.2']);
  assert.deepEqual(world.tokenCalls, []);
});

test('7: no bound identity, or none matching, is 400 Identity not found', async () => {
  reset();
  world.bound = { exception: false, identities: [] };
  assertProblem(await get(`${TOKEN}?${QUERY}`), 400, 'invalid_request', 'Identity not found');
  world.bound = { exception: false, identities: [idA, idB] };
  for (const id of ['client_id=cccc', `msi_res_id=${encodeURIComponent(idA.resourceID)}x`, `object_id=${idA.clientID}`]) {
    assertProblem(await get(`${TOKEN}?${QUERY}&${id}`), 400, 'invalid_request', 'Identity not found');
  }
  assert.deepEqual(world.tokenCalls, []);
});

test('7: with --retry-after a missing identity is 503 with Retry-After: 20', async () => {
  reset();
  world.bound = { exception: false, identities: [] };
  const { port: retryPort } = await startServer({ retryAfter: true });
  const answer = await get(`${TOKEN}?${QUERY}`, { Metadata: 'true' }, { port: retryPort });
  assertProblem(answer, 503, 'invalid_request', 'Identity not found');
  assert.equal(answer.headers['retry-after'], '20');
});

test('7: several identities and none requested, --multiple-identities first: the first, said once in the log', async () => {
  reset();
  const logs = captureLogs('info');
  const { port: firstPort } = await startServer({}, undefined, undefined, undefined, logs.log);
  world.bound = { exception: false, identities: [idB, idA] };
  for (let i = 0; i < 3; i++) {
    const answer = await get(`${TOKEN}?${QUERY}`, { Metadata: 'true' }, { port: firstPort });
    assert.equal(answer.status, 200, answer.body);
    assert.equal(JSON.parse(answer.body).access_token, 'token-for-b', 'the first of the list, as bindings/match.ts ordered it');
  }
  // A request naming one is not the policy's business.
  assert.equal(JSON.parse((await get(`${TOKEN}?${QUERY}&client_id=aaaa-1111`, { Metadata: 'true' }, { port: firstPort })).body).access_token, 'token-for-a');
  const said = logs.lines().filter((line) => /several identities bound/.test(line.msg));
  assert.deepEqual(said.map(({ namespace, pod: name, served, bound }) => ({ namespace, pod: name, served, bound })), [
    { namespace: 'default', pod: 'app', served: 'default/b', bound: ['default/b', 'default/a'] },
  ]);
  // A new list (the bindings changed) is said again.
  world.bound = { exception: false, identities: [idA, idB] };
  assert.equal(JSON.parse((await get(`${TOKEN}?${QUERY}`, { Metadata: 'true' }, { port: firstPort })).body).access_token, 'token-for-a');
  assert.equal(logs.lines().filter((line) => /several identities bound/.test(line.msg)).length, 2);
});

test('7: several identities and none requested, --multiple-identities refuse: 400 Multiple user assigned identities exist', async () => {
  reset();
  world.bound = { exception: false, identities: [idA, idB] };
  const { port: refusePort } = await startServer({ multipleIdentities: 'refuse' });
  assertProblem(
    await get(`${TOKEN}?${QUERY}`, { Metadata: 'true' }, { port: refusePort }),
    400,
    'invalid_request',
    'Multiple user assigned identities exist, please specify the clientId / resourceId of the identity in the token request',
  );
  assert.deepEqual(world.tokenCalls, []);
});

test('7: client_id, msi_res_id and mi_res_id select the identity, case-insensitively', async () => {
  reset();
  world.bound = { exception: false, identities: [idA, idB] };
  const cases: Array<[string, string]> = [
    ['client_id=BBBB-2222', 'b'],
    ['client_id=aaaa-1111', 'a'],
    [`msi_res_id=${encodeURIComponent(idB.resourceID.toUpperCase())}`, 'b'],
    [`mi_res_id=${encodeURIComponent(idA.resourceID)}`, 'a'],
  ];
  for (const [id, name] of cases) {
    world.tokenCalls = [];
    const answer = await get(`${TOKEN}?${QUERY}&${id}`);
    assert.equal(answer.status, 200, answer.body);
    assert.deepEqual(world.tokenCalls, [{ identity: name, resource: 'https://vault.azure.net' }], id);
    assert.equal(JSON.parse(answer.body).access_token, `token-for-${name}`);
  }
});

test('8: a token answer has IMDS keys in order, every value a string, expires_in counted now', async () => {
  reset();
  const now = Math.floor(Date.now() / 1000);
  world.getToken = async (id, resource) => ({ ...tokenFor(id, resource), expiresOn: now + 1000, notBefore: now - 5 });
  const answer = await get(`${TOKEN}/?${QUERY}`);
  assert.equal(answer.status, 200);
  assert.equal(answer.headers['content-type'], 'application/json; charset=utf-8');
  assert.equal(answer.headers['content-length'], String(Buffer.byteLength(answer.body)));
  assert.equal(answer.headers['cache-control'], 'no-store');
  const body = JSON.parse(answer.body) as Record<string, unknown>;
  assert.deepEqual(Object.keys(body), ['access_token', 'client_id', 'expires_in', 'expires_on', 'ext_expires_in', 'not_before', 'resource', 'token_type']);
  for (const [key, value] of Object.entries(body)) assert.equal(typeof value, 'string', key);
  assert.equal(body['access_token'], 'token-for-a');
  assert.equal(body['client_id'], idA.clientID);
  assert.equal(body['expires_on'], String(now + 1000));
  assert.equal(body['not_before'], String(now - 5));
  assert.equal(body['resource'], 'https://vault.azure.net');
  assert.equal(body['token_type'], 'Bearer');
  const expiresIn = Number(body['expires_in']);
  assert.ok(expiresIn <= 1000 && expiresIn >= 990, `expires_in ${expiresIn}`);
});

function upstreamError(fields: Record<string, unknown>): Error {
  return Object.assign(new Error('upstream failed'), { code: 'NMI_ERR_UPSTREAM', ...fields });
}

test('8: an upstream 4xx is passed on with its status and body', async () => {
  reset();
  const body = { error: 'invalid_resource', error_description: 'AADSTS500011: The resource principal named x was not found.' };
  world.getToken = async () => { throw upstreamError({ kind: 'client', status: 400, body }); };
  assertProblem(await get(`${TOKEN}?${QUERY}`), 400, body.error, body.error_description);
  world.getToken = async () => { throw upstreamError({ kind: 'client', status: 403, body: { error: 'forbidden', error_description: 'no' } }); };
  assertProblem(await get(`${TOKEN}?${QUERY}`), 403, 'forbidden', 'no');
});

test('8: an upstream that stays unavailable is 503 with Retry-After in whole seconds, at least 1', async () => {
  reset();
  const description = 'The token service is temporarily unavailable, retry later';
  const cases: Array<[Record<string, unknown>, string]> = [
    [{ kind: 'network' }, '5'],
    [{ kind: 'server', status: 500, retryAfterMs: 1_500 }, '2'],
    [{ kind: 'throttled', status: 429, retryAfterMs: 10 }, '1'],
    [{ kind: 'timeout', retryAfterMs: 30_000 }, '30'],
  ];
  for (const [fields, retryAfter] of cases) {
    world.getToken = async () => { throw upstreamError(fields); };
    const answer = await get(`${TOKEN}?${QUERY}`);
    assertProblem(answer, 503, 'temporarily_unavailable', description);
    assert.equal(answer.headers['retry-after'], retryAfter, JSON.stringify(fields));
  }
});

test('a failure that is not the upstream is 500 and the server keeps serving', async () => {
  reset();
  world.getToken = async () => { throw new Error('secret default/sp not found'); };
  assertProblem(await get(`${TOKEN}?${QUERY}`), 500, 'internal_error', 'The token request could not be completed');
  world.getToken = newWorld().getToken;
  assert.equal((await get(`${TOKEN}?${QUERY}`)).status, 200);
});

test("an identity its Secret or certificate makes unusable: 500 saying so to the pod, the reason (never a value) in the log", async () => {
  reset();
  const logs = captureLogs('info');
  const { port: logged } = await startServer({}, undefined, undefined, undefined, logs.log);
  for (const [id, err] of [
    [idA, new NmiError(codes.BINDINGS, 'AzureIdentity default/a: secret vault/sp has 2 keys and none is clientSecret')],
    [idB, new NmiError(codes.TOKEN, 'identity default/b: cannot read the private key (wrong or missing password?)')],
  ] as const) {
    world.bound = { exception: false, identities: [id] };
    world.getToken = async () => { throw err; };
    assertProblem(await get(`${TOKEN}?${QUERY}`, { Metadata: 'true' }, { port: logged }), 500, 'internal_error', "The identity bound to this pod cannot be used as configured; the node agent's log says why");
    const line = logs.lines().at(-1)!;
    assert.equal(line.msg, 'the bound identity cannot be used');
    assert.deepEqual([line.namespace, line.pod, line.identity, (line.err as { message: string }).message], ['default', 'app', `default/${id.name}`, err.message]);
  }
});

test('a pod looping on an unusable identity: every request answered, the identity tried once, the warning said once a minute per pod and identity', async () => {
  reset();
  // A pod of its own: the warning's memory is the process's, shared by every server and test here.
  world.pods.set('127.0.0.1', { ...pod, uid: 'u-looping', name: 'looping' });
  const logs = captureLogs('info');
  const refusals: string[] = [];
  const sink = { refused: (p: Pod, kind: string) => refusals.push(`${p.name} ${kind}`), unknownCaller: () => {} };
  const { port: p } = await startServer({}, undefined, undefined, undefined, logs.log, { refusals: sink });
  let tried = 0;
  const tokens = new TokenCache({
    provider: {
      fetch: async () => {
        tried++;
        throw new NmiError(codes.TOKEN, 'identity default/a: cannot read the private key (wrong or missing password?)');
      },
    },
  });
  world.getToken = (id, resource) => tokens.get(id, resource);
  for (let i = 0; i < 200; i++) assert.equal((await get(`${TOKEN}?${QUERY}`, { Metadata: 'true' }, { port: p })).status, 500);
  assert.equal(tried, 1, 'the refusal is remembered, not built again per request');
  const said = () => logs.lines().filter((line) => line.msg === 'the bound identity cannot be used');
  assert.deepEqual(said().map((line) => [line.pod, line.identity]), [['looping', 'default/a']]);
  assert.equal(refusals.length, 200, 'each refusal is still told');
  // Another identity of the same pod is news.
  world.bound = { exception: false, identities: [idB] };
  assert.equal((await get(`${TOKEN}?${QUERY}`, { Metadata: 'true' }, { port: p })).status, 500);
  assert.equal(said().length, 2);
});

// ---- proxy and pass-through ----

test('/metadata/instance is proxied unchanged, without forwarding headers or hop-by-hop ones', async () => {
  reset();
  const target = '/metadata/instance/compute?api-version=2021-02-01&format=json';
  const answer = await get(target, { Metadata: 'true', 'X-Custom': 'kept', 'Keep-Alive': 'timeout=5', 'X-Hop': 'dropped', Connection: 'X-Hop' });
  assert.equal(answer.status, 200);
  assert.equal(answer.body, FIXED_REPLY.body);
  assert.equal(answer.headers['x-upstream'], 'imds-standin');
  assert.equal(upstream.requests.length, 1);
  const seen = upstream.requests[0]!;
  assert.equal(seen.method, 'GET');
  assert.equal(seen.url, target);
  assert.equal(seen.headers['metadata'], 'true');
  assert.equal(seen.headers['x-custom'], 'kept');
  for (const name of ['x-forwarded-for', 'forwarded', 'via', 'x-hop', 'keep-alive']) assert.equal(seen.headers[name], undefined, name);
  assert.equal(seen.headers['host'], new URL(upstream.url).host);
  assert.deepEqual(world.lookups, ['127.0.0.1'], 'the caller is a pod of this node, as for a token');
});

test('6: the proxied categories answer an address no pod owns 404 not_found, and nothing reaches IMDS; a pod of this node is proxied', async () => {
  reset();
  const refusedAddresses: string[] = [];
  const { port: p } = await startServer({}, undefined, undefined, undefined, silentLogger, { refusals: { refused: () => {}, unknownCaller: (address) => refusedAddresses.push(address) } });
  const stranger = { port: p, localAddress: '127.0.0.2' };
  const body = '{"StartRequests":[{"EventId":"e1"}]}';
  const post = (opts: { port: number; localAddress?: string }) =>
    raw(`POST /metadata/scheduledevents?api-version=2020-07-01 HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`, opts);
  const paths = ['/metadata/instance?api-version=2021-02-01', '/metadata/instance/compute?api-version=2021-02-01', '/metadata/scheduledevents?api-version=2020-07-01', '/metadata/versions', '/metadata/attested/document?api-version=2020-09-01', '/metadata/loadbalancer?api-version=2020-10-01'];
  for (const path of paths) assertProblem(await get(path, { Metadata: 'true' }, stranger), 404, 'not_found', 'No pod of this node owns the source address of the request');
  assertProblem(await post(stranger), 404, 'not_found', 'No pod of this node owns the source address of the request');
  assert.equal(upstream.requests.length, 0, 'IMDS saw nothing of a stranger');
  assert.deepEqual(world.lookups, Array(paths.length + 1).fill('127.0.0.2'), 'after asking the lookup, as for a token');
  assert.deepEqual(refusedAddresses, Array(paths.length + 1).fill('127.0.0.2'), 'counted as refused unknown callers');

  // The pod of this node at 127.0.0.1 gets IMDS's answers.
  const instance = await get('/metadata/instance?api-version=2021-02-01', { Metadata: 'true' }, { port: p });
  assert.equal(instance.status, 200);
  assert.equal(instance.body, FIXED_REPLY.body);
  assert.equal((await post({ port: p })).status, 200);
  assert.deepEqual(upstream.requests.map((r) => [r.method, r.url, r.body]), [
    ['GET', '/metadata/instance?api-version=2021-02-01', ''],
    ['POST', '/metadata/scheduledevents?api-version=2020-07-01', body],
  ]);
});

test('6: with attestation the proxied categories refuse a spoofed or unattested caller 403, as a token request, and nothing reaches IMDS', async () => {
  reset();
  for (const [verdict, description] of [
    ['spoof', 'The calling socket does not belong to the pod that owns the source address'],
    ['unattested', 'The calling socket could not be attested to a pod of this node'],
  ] as const) {
    const attestation = { resolve: async () => verdict, resolveNow: () => undefined };
    const { port: p } = await startServer({}, undefined, undefined, undefined, silentLogger, { attestation });
    for (const path of ['/metadata/instance?api-version=2021-02-01', `${TOKEN}?${QUERY}`]) {
      assertProblem(await get(path, { Metadata: 'true' }, { port: p }), 403, 'access_denied', description);
    }
  }
  assert.deepEqual(upstream.requests, []);
  assert.deepEqual(world.tokenCalls, []);
});

test("proxied calls wait their turn in IMDS's budgets: categories in the general one, exception pods' tokens in the identity one", async () => {
  reset();
  const metadata = new UpstreamBudget('IMDS metadata', { maxConcurrent: 5, ratePerSec: 5 }, { maxQueuedPerPod: 6 });
  const identity = new UpstreamBudget('IMDS', { maxConcurrent: 5, ratePerSec: 20 }, { maxQueuedPerPod: 6 });
  const { port: budgeted } = await startServer({}, undefined, undefined, undefined, silentLogger, { proxyBudgets: { metadata, identity } });
  const started = Date.now();
  const answers = await Promise.all(Array.from({ length: 6 }, () => get('/metadata/instance?api-version=2021-02-01', { Metadata: 'true' }, { port: budgeted })));
  const elapsed = Date.now() - started;
  assert.deepEqual(answers.map((a) => a.status), [200, 200, 200, 200, 200, 200]);
  // Five at once into an idle budget, the sixth one paced interval (a fifth of a second) later.
  assert.ok(elapsed >= 190, `six calls at 5/s took ${elapsed} ms`);
  assert.equal(upstream.requests.length, 6);
  assert.equal(metadata.stats().granted, 6);
  world.bound = { exception: true, identities: [] };
  const passed = await get('/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net', { Metadata: 'true' }, { port: budgeted });
  assert.equal(passed.status, 200);
  assert.equal(identity.stats().granted, 1);
  assert.equal(metadata.stats().granted, 6);
});

test('a caller with as many proxied calls under way or waiting as it may gets 429 with Retry-After', async () => {
  reset();
  const metadata = new UpstreamBudget('IMDS metadata', { maxConcurrent: 5, ratePerSec: 5 }, { maxQueuedPerPod: 6 });
  const identity = new UpstreamBudget('IMDS', { maxConcurrent: 5, ratePerSec: 20 });
  const { port: budgeted } = await startServer({ proxyTimeoutMs: 500 }, undefined, undefined, undefined, silentLogger, { proxyBudgets: { metadata, identity } });
  upstream.reply = 'hang';
  const held = Array.from({ length: 6 }, () => get('/metadata/instance?api-version=2021-02-01', { Metadata: 'true' }, { port: budgeted }));
  for (let i = 0; i < 100 && upstream.requests.length < 5; i++) await new Promise((resolve) => setTimeout(resolve, 10));
  assert.equal(upstream.requests.length, 5);
  const refused = await get('/metadata/instance?api-version=2021-02-01', { Metadata: 'true' }, { port: budgeted });
  assert.equal(refused.status, 429);
  assert.equal(refused.headers['retry-after'], '1');
  assert.equal(JSON.parse(refused.body).error, 'too_many_requests');
  // The held ones end in the proxy's timeout, and free their places.
  assert.ok((await Promise.all(held)).every((a) => a.status === 504));
  upstream.reply = FIXED_REPLY;
  assert.equal((await get('/metadata/instance?api-version=2021-02-01', { Metadata: 'true' }, { port: budgeted })).status, 200);
});

test("a proxied 429 is passed on, and the budget holds every later call for the upstream's Retry-After", async () => {
  reset();
  const metadata = new UpstreamBudget('IMDS metadata', { maxConcurrent: 5, ratePerSec: 50 });
  const identity = new UpstreamBudget('IMDS', { maxConcurrent: 5, ratePerSec: 20 });
  const { port: budgeted } = await startServer({}, undefined, undefined, undefined, silentLogger, { proxyBudgets: { metadata, identity } });
  // 2 s, not the budget's own 1 s pause, so the wait below tells which was used.
  upstream.reply = { status: 429, headers: { 'Content-Type': 'application/json', 'Retry-After': '2' }, body: '{"error":"Too many requests"}' };
  const refused = await get('/metadata/instance?api-version=2021-02-01', { Metadata: 'true' }, { port: budgeted });
  assert.equal(refused.status, 429);
  assert.equal(refused.headers['retry-after'], '2');
  assert.equal(metadata.stats().throttled, 1);
  upstream.reply = FIXED_REPLY;
  const started = Date.now();
  assert.equal((await get('/metadata/instance?api-version=2021-02-01', { Metadata: 'true' }, { port: budgeted })).status, 200);
  const waited = Date.now() - started;
  assert.ok(waited >= 1_900, `the next call went upstream ${waited} ms after a 429 with Retry-After: 2`);
});

test('method, body and upstream status pass through the proxy', async () => {
  reset();
  upstream.reply = { status: 400, headers: { 'Content-Type': 'application/json' }, body: '{"error":"Bad request"}' };
  const body = '{"StartRequests":[{"EventId":"e1"}]}';
  const answer = await raw(
    `POST /metadata/scheduledevents?api-version=2020-07-01 HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`,
  );
  assert.equal(answer.status, 400);
  assert.equal(answer.body, '{"error":"Bad request"}');
  assert.equal(upstream.requests[0]?.method, 'POST');
  assert.equal(upstream.requests[0]?.body, body);
  for (const path of ['/metadata/versions', '/metadata/attested/document?api-version=2020-09-01', '/metadata/loadbalancer?api-version=2020-10-01']) {
    upstream.reply = FIXED_REPLY;
    assert.equal((await get(path)).status, 200, path);
  }
  assert.deepEqual(upstream.requests.map((r) => r.url).slice(1), ['/metadata/versions', '/metadata/attested/document?api-version=2020-09-01', '/metadata/loadbalancer?api-version=2020-10-01']);
});

test('a proxied body over 16 KiB is refused with 413 JSON without being read, and never reaches the upstream; 16 KiB and a chunked one pass', async () => {
  reset();
  const head = 'POST /metadata/scheduledevents?api-version=2020-07-01 HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nConnection: close\r\n';
  // Only the head is sent: the refusal must not wait for a body.
  assertProblem(await raw(`${head}Content-Length: ${limits.maxBodyBytes + 1}\r\n\r\n`), 413, 'invalid_request', 'Request body too large');
  assert.equal(upstream.requests.length, 0);
  const exactly = 'x'.repeat(limits.maxBodyBytes);
  assert.equal((await raw(`${head}Content-Length: ${exactly.length}\r\n\r\n${exactly}`)).status, 200, 'exactly 16 KiB passes');
  assert.equal(upstream.requests[0]?.body.length, exactly.length);
  const chunked = await raw(`${head}Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n`);
  assert.equal(chunked.status, 200);
  assert.equal(upstream.requests[1]?.body, 'hello world');
});

test('a proxied answer over 1 MiB is 502 JSON, exactly 1 MiB passes', async () => {
  reset();
  const mib = 1024 * 1024;
  upstream.reply = { status: 200, headers: { 'Content-Type': 'application/octet-stream' }, body: 'x'.repeat(mib + 1) };
  assertProblem(await get('/metadata/instance?api-version=2021-02-01'), 502, 'bad_gateway', 'The instance metadata service answered more than the node agent passes on');
  upstream.reply = { status: 200, headers: { 'Content-Type': 'application/octet-stream' }, body: 'x'.repeat(mib) };
  const exactly = await get('/metadata/instance?api-version=2021-02-01');
  assert.equal(exactly.status, 200);
  assert.equal(exactly.body.length, mib);
});

test('a proxied answer that streams on without a length is read no further than 1 MiB: 502, the upstream cut off', async () => {
  reset();
  const chunk = Buffer.alloc(64 * 1024, 'x');
  const total = 32 * 1024 * 1024;
  let written = 0;
  let finished: boolean | undefined;
  const endless = http.createServer((_req, res) => {
    res.writeHead(200, { 'Content-Type': 'application/octet-stream' });
    res.on('close', () => (finished = res.writableFinished));
    const more = (): void => {
      while (written < total && !res.destroyed) {
        written += chunk.length;
        if (!res.write(chunk)) return void res.once('drain', more);
      }
      res.end();
    };
    more();
  });
  endless.listen(0, '127.0.0.1');
  await once(endless, 'listening');
  try {
    const { port: p } = await startServer({}, undefined, new URL(`http://127.0.0.1:${(endless.address() as net.AddressInfo).port}`));
    assertProblem(await get('/metadata/instance?api-version=2021-02-01', { Metadata: 'true' }, { port: p }), 502, 'bad_gateway', 'The instance metadata service answered more than the node agent passes on');
    for (let i = 0; i < 200 && finished === undefined; i++) await new Promise((resolve) => setTimeout(resolve, 10));
    assert.equal(finished, false, 'the upstream connection was closed before its answer ended');
    assert.ok(written < total / 2, `the upstream wrote ${written} bytes of ${total}`);
  } finally {
    endless.closeAllConnections();
    endless.close();
  }
});

test('an upstream that does not answer in time is 504 JSON', async () => {
  reset();
  upstream.reply = 'hang';
  const { port: quick } = await startServer({ proxyTimeoutMs: 200 });
  assertProblem(await get('/metadata/instance?api-version=2021-02-01', { Metadata: 'true' }, { port: quick }), 504, 'gateway_timeout', 'The instance metadata service did not answer in time');
});

test('an unreachable upstream is 502 JSON', async () => {
  reset();
  const closed = net.createServer();
  closed.listen(0, '127.0.0.1');
  await once(closed, 'listening');
  const deadPort = (closed.address() as net.AddressInfo).port;
  closed.close();
  await once(closed, 'close');
  const { port: p } = await startServer({}, undefined, new URL(`http://127.0.0.1:${deadPort}`));
  assertProblem(await get('/metadata/instance', { Metadata: 'true' }, { port: p }), 502, 'bad_gateway', 'The instance metadata service could not be reached');
});

test('--block-instance-metadata answers 403 for /metadata/instance* only', async () => {
  reset();
  const { port: blocked } = await startServer({ blockInstanceMetadata: true });
  for (const path of ['/metadata/instance', '/metadata/instance/compute?api-version=2021-02-01']) {
    assertProblem(await get(path, { Metadata: 'true' }, { port: blocked }), 403, 'forbidden', 'Access to instance metadata is blocked on this node');
  }
  assert.deepEqual(upstream.requests, []);
  assert.equal((await get('/metadata/versions', { Metadata: 'true' }, { port: blocked })).status, 200);
  assert.equal((await get(`${TOKEN}?${QUERY}`, { Metadata: 'true' }, { port: blocked })).status, 200);
});

test('an exception pod is passed through to the upstream verbatim, with no token from nmi', async () => {
  reset();
  world.bound = { exception: true, identities: [idA] };
  upstream.reply = { status: 200, headers: { 'Content-Type': 'application/json' }, body: '{"access_token":"from-real-imds"}' };
  const target = `${TOKEN}/?${QUERY}&client_id=Whatever`;
  const answer = await get(target);
  assert.equal(answer.status, 200);
  assert.equal(answer.body, '{"access_token":"from-real-imds"}');
  assert.deepEqual(world.tokenCalls, []);
  assert.equal(upstream.requests.length, 1);
  assert.equal(upstream.requests[0]!.url, target);
  assert.equal(upstream.requests[0]!.headers['metadata'], 'true');
  assert.equal(upstream.requests[0]!.headers['x-forwarded-for'], undefined);
});

// ---- connections and lifecycle ----

test('keep-alive: several requests share one connection', async () => {
  reset();
  const { port: p } = await startServer();
  // One client connection, and the server answers each request on it without hanging up.
  const client = new Client(`http://127.0.0.1:${p}`);
  let connects = 0;
  client.on('connect', () => connects++);
  try {
    for (let i = 0; i < 3; i++) {
      const res = await client.request({ method: 'GET', path: `${TOKEN}?${QUERY}`, headers: { Metadata: 'true' } });
      assert.equal(res.statusCode, 200);
      assert.equal(res.headers['connection'], 'keep-alive');
      await res.body.text();
    }
  } finally {
    await client.close();
  }
  assert.equal(connects, 1, 'connected once');
});

test('oversized headers are refused with 431 JSON and the server keeps serving', async () => {
  reset();
  const answer = await get(`${TOKEN}?${QUERY}`, { Metadata: 'true', 'X-Big': 'x'.repeat(20 * 1024) });
  assertProblem(answer, 431, 'invalid_request', 'Request header fields too large');
  assert.deepEqual(world.lookups, []);
  assert.equal((await get(`${TOKEN}?${QUERY}`)).status, 200);
});

test('close() finishes an in-flight request, then stops', async () => {
  reset();
  const { server, port: p } = await startServer();
  let release!: () => void;
  const held = new Promise<void>((resolve) => (release = resolve));
  let asked!: () => void;
  const reached = new Promise<void>((resolve) => (asked = resolve));
  world.getToken = async (id, resource) => {
    asked();
    await held;
    return tokenFor(id, resource);
  };
  const pending = request(`http://127.0.0.1:${p}${TOKEN}?${QUERY}`, { headers: { Metadata: 'true' } });
  await reached;
  const closing = server.close(5_000);
  // The worker stops accepting as soon as it reads the close; from then on connecting is refused while the held request drains.
  for (let tries = 0; ; tries++) {
    const error = await request(`http://127.0.0.1:${p}${TOKEN}?${QUERY}`, { headers: { Metadata: 'true' } }).then(
      () => 'answered',
      (err: { code?: string }) => err.code,
    );
    if (error === 'ECONNREFUSED') break;
    assert.ok(tries < 50 && error !== 'answered', `a new request while draining: ${error}`);
  }
  release();
  const res = await pending;
  assert.equal(res.statusCode, 200);
  assert.equal(res.headers['connection'], 'close');
  assert.equal((JSON.parse(await res.body.text()) as { access_token: string }).access_token, 'token-for-a');
  await closing;
  await assert.rejects(request(`http://127.0.0.1:${p}${TOKEN}?${QUERY}`, { headers: { Metadata: 'true' } }), { code: 'ECONNREFUSED' });
});

test('metrics count answers by code and route and time them', async () => {
  reset();
  const registry = new Registry();
  const { port: p } = await startServer({}, registry);
  await get(`${TOKEN}?${QUERY}`, { Metadata: 'true' }, { port: p });
  await get(`${TOKEN}?${QUERY}`, {}, { port: p });
  await get('/metadata/instance', { Metadata: 'true' }, { port: p });
  await get('/nope', {}, { port: p });
  const text = await registry.metrics();
  assert.match(text, /nmi_http_requests_total\{code="200",route="token"\} 1/);
  assert.match(text, /nmi_http_requests_total\{code="400",route="token"\} 1/);
  assert.match(text, /nmi_http_requests_total\{code="200",route="instance"\} 1/);
  assert.match(text, /nmi_http_requests_total\{code="404",route="other"\} 1/);
  assert.match(text, /nmi_http_request_duration_seconds_bucket\{le="0.0001",route="token"\}/);
  assert.match(text, /nmi_http_request_duration_seconds_count\{route="token"\} 2/);
});

test('the synchronous hit path answers a cached token without lookup or getToken, and only for a bound identity', async () => {
  const cached = new Map<string, Token>([[`${idA.name} https://vault.azure.net`, tokenFor(idA, 'https://vault.azure.net')]]);
  const { port: p } = await startServer({}, undefined, undefined, cached);
  const lookups = world.lookups.length;
  const calls = world.tokenCalls.length;
  const hit = await request(`http://127.0.0.1:${p}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net`, { headers: { Metadata: 'true' } });
  assert.equal(hit.statusCode, 200);
  assert.equal(((await hit.body.json()) as { access_token: string }).access_token, `token-for-${idA.name}`);
  assert.equal(world.lookups.length, lookups, 'no async caller lookup');
  assert.equal(world.tokenCalls.length, calls, 'no getToken');
  // Not cached: the ordinary path fetches it.
  const miss = await request(`http://127.0.0.1:${p}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fstorage.azure.com`, { headers: { Metadata: 'true' } });
  assert.equal(miss.statusCode, 200);
  await miss.body.dump();
  assert.equal(world.tokenCalls.length, calls + 1);
  // The binding is gone: the cached token is never served.
  const bound = world.bound;
  world.bound = { exception: false, identities: [] };
  const gone = await request(`http://127.0.0.1:${p}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net`, { headers: { Metadata: 'true' } });
  assert.equal(gone.statusCode, 400);
  assert.deepEqual(await gone.body.json(), { error: 'invalid_request', error_description: 'Identity not found' });
  world.bound = bound;
});
