// The servers that answer hits from tables (native, and js with its worker's
// tables) against the js server without tables, where every request goes
// through the token core: the same raw bytes to all three, the same in-test pod
// index, bindings and tokens behind them, and the answers compared status line,
// header names, values and order (Date aside), and body. Then what only the
// native side has: pipelining across C++ and JavaScript, and table swaps under load.
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { once } from 'node:events';
import type { AzureIdentity, PodIdentities } from '../../src/bindings/model.js';
import type { Pod } from '../../src/kubelet/pod.js';
import { silentLogger } from '../../src/log/logger.js';
import type { Token } from '../../src/tokens/token.js';
import type { TokenServerDeps } from '../../src/server/core.js';
import { createTokenServer, type TokenServer } from '../../src/server/token-server.js';
import { createNativeTokenServer, type NativeTokenServer } from '../../src/server/native-server.js';
import type { MultipleIdentities } from '../../src/config/commands.js';
import { attachTables, type Tables } from '../../src/server/tables.js';
import { FIXED_REPLY, startImds, type ImdsStandin } from '../standins/imds.js';

const TOKEN = '/metadata/identity/oauth2/token';
const RESOURCE = 'https://vault.azure.net';
const QUERY = `api-version=2018-02-01&resource=${encodeURIComponent(RESOURCE)}`;

const pod: Pod = { uid: 'u1', namespace: 'default', name: 'app', labels: { aadpodidbinding: 'app' }, ips: ['127.0.0.1'], hostNetwork: false, phase: 'Running', nodeName: 'n1' };
const exceptionPod: Pod = { ...pod, uid: 'u3', name: 'legacy', ips: ['127.0.0.3'] };

function identity(name: string, clientID: string, resourceID: string): AzureIdentity {
  return { name, namespace: 'default', type: 0, clientID, resourceID, tenantID: '', namespaced: false, version: '1' };
}
const idA = identity('a', 'AAAA-1111', '/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a');
const idB = identity('b', 'bbbb-2222', '/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/b');
const expiresOn = Math.floor(Date.now() / 1000) + 3600;

function tokenFor(id: AzureIdentity, resource: string): Token {
  return { accessToken: `token-for-${id.name}`, clientId: id.clientID, expiresOn, extExpiresIn: 3600, notBefore: expiresOn - 3900, resource, tokenType: 'Bearer' };
}

const world = {
  bound: { exception: false, identities: [idA] } as PodIdentities,
  tokenCalls: 0,
};

let upstream: ImdsStandin;
/** Every request through the token core: the reference. */
let js: TokenServer;
let jsTabled: TokenServer;
let native: NativeTokenServer;
let tables: Tables[];
let jsPort: number;
let jsTabledPort: number;
let nativePort: number;

function deps(multipleIdentities: MultipleIdentities = 'first'): TokenServerDeps {
  const pods = new Map([[pod.ips[0]!, pod], [exceptionPod.ips[0]!, exceptionPod]]);
  return {
    callers: { lookup: async (ip) => pods.get(ip) },
    identitiesFor: (p) => (p === exceptionPod ? { exception: true, identities: [] } : world.bound),
    getToken: async (id, resource) => {
      world.tokenCalls++;
      return tokenFor(id, resource);
    },
    upstreamImds: new URL(upstream.url),
    options: { metadataHeaderRequired: true, blockInstanceMetadata: false, retryAfter: false, multipleIdentities: multipleIdentities, proxyTimeoutMs: 2_000 },
    log: silentLogger,
  };
}

before(async () => {
  upstream = await startImds({ reply: FIXED_REPLY });
  js = createTokenServer(deps());
  await js.listen('127.0.0.1', 0);
  jsPort = js.port!;
  jsTabled = createTokenServer(deps());
  await jsTabled.listen('127.0.0.1', 0);
  jsTabledPort = jsTabled.port!;
  native = createNativeTokenServer(deps());
  await native.listen('127.0.0.1', 0);
  nativePort = native.port!;
  tables = [native, jsTabled].map((server) =>
    attachTables(server, {
      pods: () => [pod, exceptionPod],
      identitiesFor: (p) => (p === exceptionPod ? { exception: true, identities: [] } : world.bound),
    }),
  );
});

after(async () => {
  for (const t of tables) t.stop();
  await native.close(1_000);
  await jsTabled.close(1_000);
  await js.close(1_000);
  await upstream.close();
});

function setBound(identities: AzureIdentity[]): void {
  world.bound = { exception: false, identities };
  for (const t of tables) t.refresh();
}

interface Parsed {
  statusLine: string;
  headers: Array<[string, string]>;
  body: string;
}

/** Every complete answer in text, in order; the rest (an incomplete one) is ignored. */
function parseAnswers(text: string): Parsed[] {
  const answers: Parsed[] = [];
  let at = 0;
  while (at < text.length) {
    const end = text.indexOf('\r\n\r\n', at);
    if (end < 0) break;
    const [statusLine = '', ...lines] = text.slice(at, end).split('\r\n');
    const headers = lines.map((line): [string, string] => [line.slice(0, line.indexOf(':')), line.slice(line.indexOf(':') + 1).trim()]);
    const get = (name: string) => headers.find(([n]) => n.toLowerCase() === name)?.[1];
    let body = '';
    at = end + 4;
    if (get('transfer-encoding') === 'chunked') {
      for (;;) {
        const lineEnd = text.indexOf('\r\n', at);
        if (lineEnd < 0) return answers;
        const size = parseInt(text.slice(at, lineEnd), 16);
        at = lineEnd + 2 + size + 2;
        if (size === 0) break;
        body += text.slice(lineEnd + 2, lineEnd + 2 + size);
      }
    } else {
      const length = Number(get('content-length') ?? 0);
      if (text.length < at + length) break;
      body = text.slice(at, at + length);
      at += length;
    }
    answers.push({ statusLine, headers, body });
  }
  return answers;
}

/** Writes the pieces one by one, reads until `count` answers arrived or the server hung up. */
async function exchange(port: number, pieces: string[], count: number, localAddress?: string): Promise<Parsed[]> {
  const socket = net.connect({ port, host: '127.0.0.1', localAddress });
  await once(socket, 'connect');
  let text = '';
  let closed = false;
  socket.on('data', (chunk: Buffer) => (text += chunk.toString('latin1')));
  socket.on('close', () => (closed = true));
  for (const piece of pieces) {
    socket.write(piece);
    if (pieces.length > 1) await new Promise((resolve) => setImmediate(resolve));
  }
  while (!closed && parseAnswers(text).length < count) await new Promise((resolve) => setTimeout(resolve, 5));
  socket.destroy();
  return parseAnswers(text);
}

/** Date differs by when it was written; expires_in by the second it was counted in (checked for range). */
function normalize(answers: Parsed[]): Parsed[] {
  return answers.map((a) => {
    const body = a.body.replace(/"expires_in":"(\d+)"/, (_, n: string) => {
      assert.ok(Number(n) <= 3600 && Number(n) >= 3000, `expires_in ${n}`);
      return '"expires_in":"N"';
    });
    return { statusLine: a.statusLine, headers: a.headers.filter(([name]) => name.toLowerCase() !== 'date'), body };
  });
}

/** The three servers' ports: the suite's, or others started with other options. */
interface Ports {
  js: number;
  native: number;
  jsTabled: number;
}

async function same(pieces: string[] | string, count = 1, localAddress?: string, ports: Ports = { js: jsPort, native: nativePort, jsTabled: jsTabledPort }): Promise<Parsed[]> {
  const list = typeof pieces === 'string' ? [pieces] : pieces;
  const fromJs = await exchange(ports.js, list, count, localAddress);
  const fromNative = await exchange(ports.native, list, count, localAddress);
  const fromTables = await exchange(ports.jsTabled, list, count, localAddress);
  assert.equal(fromJs.length, count, `js answered ${fromJs.length} of ${count}: ${JSON.stringify(list)}`);
  assert.deepEqual(normalize(fromNative), normalize(fromJs), `native: ${JSON.stringify(list)}`);
  assert.deepEqual(normalize(fromTables), normalize(fromJs), `js with tables: ${JSON.stringify(list)}`);
  for (const [i, a] of fromNative.entries()) {
    const date = a.headers.find(([name]) => name.toLowerCase() === 'date');
    if (date && fromJs[i]!.headers.some(([name]) => name === 'Date')) assert.match(date[1], /^[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT$/);
  }
  return fromNative;
}

function req(target: string, headers: Record<string, string> = { Metadata: 'true' }, method = 'GET', version = '1.1'): string {
  const lines = Object.entries(headers).map(([name, value]) => `${name}: ${value}\r\n`).join('');
  return `${method} ${target} HTTP/${version}\r\nHost: 169.254.169.254\r\n${lines}\r\n`;
}

/** Makes sure the token tables hold idA's token for RESOURCE (the token core puts it there). */
async function warm(): Promise<void> {
  await exchange(nativePort, [req(`${TOKEN}?${QUERY}`)], 1);
  await exchange(jsTabledPort, [req(`${TOKEN}?${QUERY}`)], 1);
}

test('the contract error cases answer byte for byte as the js server does', async () => {
  setBound([idA]);
  const v = 'api-version=2019-08-01';
  const cases = [
    ...['POST', 'PUT', 'DELETE'].map((m) => req(`${TOKEN}?${QUERY}`, { Metadata: 'true', 'Content-Length': '0' }, m)),
    ...([{}, { Metadata: 'false' }, { Metadata: '1' }, { Metadata: '' }, { 'X-Metadata': 'true' }] as Array<Record<string, string>>).map((h) => req(`${TOKEN}?${QUERY}`, h)),
    ...['X-Forwarded-For', 'Forwarded', 'Via'].map((h) => req(`${TOKEN}?${QUERY}`, { Metadata: 'true', [h]: '10.0.0.9' })),
    req(`${TOKEN}?resource=r`),
    ...['2017-09-01', '2018-02-02', 'garbage', ''].map((ver) => req(`${TOKEN}?resource=r&api-version=${ver}`)),
    req(`${TOKEN}?${v}`),
    req(`${TOKEN}?${v}&resource=`),
    ...[`${QUERY}&resource=r2`, `${QUERY}&reso%75rce=r2`, `${QUERY}&api-version=2019-08-01`, `${QUERY}&client_id=a&client_id=a`].map((q) => req(`${TOKEN}?${q}`)),
    ...['client_id=a&msi_res_id=b', 'client_id=a&object_id=b', 'msi_res_id=a&mi_res_id=a', 'object_id=a&mi_res_id=b'].map((ids) => req(`${TOKEN}?${QUERY}&${ids}`)),
    req(`${TOKEN}?${QUERY}&a=%zz`),
    req(`${TOKEN}?${QUERY}&client_id=`),
    req(`${TOKEN}?${QUERY}&object_id=${idA.clientID}`),
    req(`${TOKEN}?${QUERY}&client_id=cccc`),
    ...[
      '/metadata\\identity\\oauth2\\token', '/metadata/identity/oauth2/x/../token', '/metadata/identity/./oauth2/token',
      '/metadata/identity/oauth2/x/%2e%2e/token', '/metadata/identity%2foauth2/token', '/metadata//identity/oauth2/token',
    ].map((path) => req(`${path}?${QUERY}`)),
    ...['/', '/foo', '/metadata', '/metadata/identity/oauth2/tokens', '/metadata/INSTANCE'].map((path) => req(path)),
    req(`http://169.254.169.254${TOKEN}?${QUERY}`),
    'NOT HTTP AT ALL\r\n\r\n',
    `GET ${TOKEN}?${QUERY} HTTP/1.1\r\nMetadata: true\r\n\r\n`,
    req(`${TOKEN}?${QUERY}`, { 'Metadata ': 'true' }),
    req(`${TOKEN}?${QUERY}`, { Metadata: 'true', 'X-Big': 'x'.repeat(20 * 1024) }),
  ];
  for (const bytes of cases) await same(bytes);
  await same(req(`${TOKEN}?${QUERY}`), 1, '127.0.0.2');
});

test('a HEAD request gets the same head and no body', async () => {
  const head = req(`${TOKEN}?${QUERY}`, { Metadata: 'true', Connection: 'close' }, 'HEAD');
  const read = async (port: number) => {
    const socket = net.connect({ port, host: '127.0.0.1' });
    await once(socket, 'connect');
    socket.write(head);
    let text = '';
    socket.on('data', (chunk: Buffer) => (text += chunk.toString('latin1')));
    await once(socket, 'close');
    return text.replace(/\r\nDate: [^\r]*/, '');
  };
  const fromJs = await read(jsPort);
  assert.match(fromJs, /^HTTP\/1.1 405 [^]*Content-Length: 94\r\n[^]*\r\n\r\n$/);
  assert.equal(await read(nativePort), fromJs);
});

test('identity selection, multiple identities and the exception pod agree', async () => {
  setBound([idA, idB]);
  await same(req(`${TOKEN}?${QUERY}`));
  // --multiple-identities first (the default): no id asked is the first identity's token, from the tables too.
  const hits = native.stats()!.hits;
  const [first] = await same(req(`${TOKEN}?${QUERY}`));
  assert.match(first?.body ?? '', /"access_token":"token-for-a"/);
  assert.equal(native.stats()!.hits, hits + 1, 'answered by C++ from the tables');
  await warm();
  for (const id of ['client_id=BBBB-2222', 'client_id=aaaa-1111', `msi_res_id=${encodeURIComponent(idB.resourceID.toUpperCase())}`, `mi_res_id=${encodeURIComponent(idA.resourceID)}`]) {
    await same(req(`${TOKEN}?${QUERY}&${id}`));
    await same(req(`${TOKEN}?${QUERY}&${id}`));
  }
  setBound([]);
  await same(req(`${TOKEN}?${QUERY}`));
  setBound([idA]);
  upstream.requests = [];
  await same(req(`${TOKEN}/?${QUERY}&client_id=Whatever`), 1, '127.0.0.3');
  assert.equal(upstream.requests.length, 3, 'all three passed the exception pod through');
  await same(req('/metadata/instance/compute?api-version=2021-02-01', { Metadata: 'true', 'X-Custom': 'kept' }));
  assert.deepEqual(upstream.requests[4]!.headers, upstream.requests[3]!.headers);
  assert.deepEqual(upstream.requests[5]!.headers, upstream.requests[3]!.headers);
});

test('--multiple-identities refuse: several identities and no id is IMDS\'s 400 from all three; a named one is still a hit', async () => {
  const refusing = { js: createTokenServer(deps('refuse')), jsTabled: createTokenServer(deps('refuse')), native: createNativeTokenServer(deps('refuse')) };
  const servers = Object.values(refusing);
  const refusingTables = [refusing.native, refusing.jsTabled].map((server) => attachTables(server, { pods: () => [pod], identitiesFor: () => world.bound }));
  try {
    for (const server of servers) await server.listen('127.0.0.1', 0);
    const ports = { js: refusing.js.port!, native: refusing.native.port!, jsTabled: refusing.jsTabled.port! };
    setBound([idA, idB]);
    for (const t of refusingTables) t.refresh();
    for (const id of ['', '&client_id=aaaa-1111']) await same(req(`${TOKEN}?${QUERY}${id}`), 1, undefined, ports);
    const hits = refusing.native.stats()!.hits;
    const [refused] = await same(req(`${TOKEN}?${QUERY}`), 1, undefined, ports);
    const [named] = await same(req(`${TOKEN}?${QUERY}&client_id=aaaa-1111`), 1, undefined, ports);
    assert.match(refused?.statusLine ?? '', /^HTTP\/1.1 400 /);
    assert.match(refused?.body ?? '', /Multiple user assigned identities exist/);
    assert.match(named?.body ?? '', /"access_token":"token-for-a"/);
    assert.equal(refusing.native.stats()!.hits, hits + 1, 'only the named one was a native hit');
  } finally {
    for (const t of refusingTables) t.stop();
    for (const server of servers) await server.close(1_000);
  }
});

test('a hit is answered from the tables, by C++ or the js worker, as the token core answers it', async () => {
  setBound([idA]);
  await warm();
  const calls = world.tokenCalls;
  const hitsBefore = native.stats()!.hits;
  const variants = [
    req(`${TOKEN}?${QUERY}`),
    req(`${TOKEN}/?${QUERY}`),
    req(`${TOKEN}?resource=${RESOURCE}&api-version=2025-04-07`),
    req(`${TOKEN}?${QUERY}`, { mEtAdAtA: 'TRUE' }),
    `GET ${TOKEN}?${QUERY} HTTP/1.1\r\nhost:x\r\nmetadata:true   \r\n\r\n`,
    req(`${TOKEN}?${QUERY}`, { Metadata: 'true', Connection: 'close' }),
    req(`${TOKEN}?${QUERY}&client_id=aaaa-1111`),
  ];
  for (const bytes of variants) await same(bytes);
  // Each variant was one native hit, and only the js server without tables called getToken, once per variant.
  assert.equal(native.stats()!.hits - hitsBefore, variants.length);
  assert.equal(world.tokenCalls - calls, variants.length, 'only the js server without tables asked for tokens');
});

test('what the native side leaves to js is still answered alike: HTTP/1.0, duplicate Metadata, odd characters', async () => {
  setBound([idA]);
  await warm();
  await same(req(`${TOKEN}?${QUERY}`, { Metadata: 'true' }, 'GET', '1.0'));
  await same(req(`${TOKEN}?${QUERY}`, { Metadata: 'true', Connection: 'keep-alive' }, 'GET', '1.0'));
  await same(`GET ${TOKEN}?${QUERY} HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nMetadata: true\r\n\r\n`);
  await same(req(`${TOKEN}?${QUERY}&x=%C3%A9`));
  await same(req(`${TOKEN}?${QUERY}&x="<>`));
  await same(req(`${TOKEN}?${QUERY}`, { Metadata: 'true', 'Content-Length': '3' }).replace(/\r\n$/, '\r\nabc'));
  // The fuzzer's finding: a raw NUL in the target or a header name was once a native hit; node refuses both.
  const hits = native.stats()!.hits;
  const [nulTarget] = await same(req(`${TOKEN}?${QUERY}&\0`));
  const [nulHeader] = await same(`GET ${TOKEN}?${QUERY} HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nX\0y: 1\r\n\r\n`);
  assert.match(nulTarget?.statusLine ?? '', /^HTTP\/1.1 400 /);
  assert.match(nulHeader?.statusLine ?? '', /^HTTP\/1.1 400 /);
  assert.equal(native.stats()!.hits, hits, 'neither was answered natively');
});

test('pipelined requests mixing hits and misses are answered in order', async () => {
  setBound([idA]);
  await warm();
  const three = req(`${TOKEN}?${QUERY}`) + req('/nope') + req(`${TOKEN}?${QUERY}`);
  const answers = await same(three, 3);
  assert.deepEqual(answers.map((a) => a.statusLine), ['HTTP/1.1 200 OK', 'HTTP/1.1 404 Not Found', 'HTTP/1.1 200 OK']);
  // A miss that waits on the upstream holds back the hit behind it.
  const slow = req('/metadata/versions') + req(`${TOKEN}?${QUERY}`) + req(`${TOKEN}?${QUERY}`, { Metadata: 'true', Connection: 'close' });
  const ordered = await same(slow, 3);
  assert.deepEqual(ordered.map((a) => a.body.startsWith('{"compute"')), [true, false, false]);
});

test('native only: what follows a Connection: close request is not answered, what precedes it is', async () => {
  // node:http drops the whole connection here (its parser errors on the extra request); nmi answers what it owes.
  setBound([idA]);
  await warm();
  const bytes = req('/metadata/versions') + req(`${TOKEN}?${QUERY}`, { Metadata: 'true', Connection: 'close' }) + req('/never');
  const answers = await exchange(nativePort, [bytes], 3);
  assert.deepEqual(answers.map((a) => a.statusLine), ['HTTP/1.1 200 OK', 'HTTP/1.1 200 OK']);
  assert.ok(answers[1]!.headers.some(([name, value]) => name === 'Connection' && value === 'close'));
});

test('a request split byte by byte is answered as a whole', async () => {
  setBound([idA]);
  await warm();
  const bytes = req(`${TOKEN}?${QUERY}`) + req('/metadata/identity/oauth2/tokens');
  await same([...bytes], 2);
});

test('table swaps under load: once an identity leaves the caller table, no further 200 for it', async () => {
  setBound([idA]);
  await warm();
  const request = req(`${TOKEN}?${QUERY}`);
  let removed = false;
  let okAfterRemoval = 0;
  let answered = 0;
  async function client(): Promise<void> {
    const socket = net.connect({ port: nativePort, host: '127.0.0.1' });
    await once(socket, 'connect');
    let text = '';
    socket.on('data', (chunk: Buffer) => (text += chunk.toString('latin1')));
    for (let i = 0; i < 40; i++) {
      const sentAfterRemoval = removed;
      const before = parseAnswers(text).length;
      socket.write(request);
      while (parseAnswers(text).length === before) await new Promise((resolve) => setImmediate(resolve));
      const answer = parseAnswers(text)[before]!;
      answered++;
      if (sentAfterRemoval && answer.statusLine.includes(' 200 ')) okAfterRemoval++;
    }
    socket.destroy();
  }
  const clients = Array.from({ length: 64 }, () => client());
  for (let swap = 0; swap < 20; swap++) {
    await new Promise((resolve) => setTimeout(resolve, 2));
    setBound(swap % 2 === 0 ? [idA, idB] : [idA]);
  }
  setBound([]);
  removed = true;
  await Promise.all(clients);
  assert.equal(answered, 64 * 40);
  assert.equal(okAfterRemoval, 0);
});

test('a token whose serving window ended is served from the tables again once the core has answered it', async () => {
  world.bound = { exception: false, identities: [idA] };
  // As in the daemon: the core answers a cached token through peekToken without getToken.
  const cache = new Map<string, Token>();
  let coreAnswers = 0;
  const base = deps();
  const cached: TokenServerDeps = {
    ...base,
    callers: {
      lookup: base.callers.lookup,
      known: (ip) => {
        coreAnswers++;
        return ip === pod.ips[0] ? pod : undefined;
      },
    },
    peekToken: (id, resource) => cache.get(`${id.name} ${resource}`),
    getToken: async (id, resource, caller) => {
      const token = await base.getToken(id, resource, caller);
      cache.set(`${id.name} ${resource}`, token);
      return token;
    },
  };
  const servers = [createNativeTokenServer(cached), createTokenServer(cached)];
  const windows: Tables[] = [];
  try {
    for (const server of servers) {
      await server.listen('127.0.0.1', 0);
      windows.push(attachTables(server, { pods: () => [pod], identitiesFor: () => world.bound, serveWindowMs: 150, pollMs: 25 }));
      const ask = async () => {
        const [answer] = await exchange(server.port!, [req(`${TOKEN}?${QUERY}`)], 1);
        assert.equal(answer?.statusLine, 'HTTP/1.1 200 OK');
        // The js server's tables follow a message behind the answer.
        await new Promise((resolve) => setTimeout(resolve, 20));
      };
      const name = 'stats' in server ? 'native' : 'js';
      await ask();
      const first = coreAnswers;
      await ask();
      assert.equal(coreAnswers, first, `${name}: served from the tables`);
      await new Promise((resolve) => setTimeout(resolve, 250));
      await ask();
      assert.equal(coreAnswers, first + 1, `${name}: the window ended, the core answered from the cache`);
      await ask();
      await ask();
      assert.equal(coreAnswers, first + 1, `${name}: back in the tables`);
    }
  } finally {
    for (const t of windows) t.stop();
    await Promise.all(servers.map((server) => server.close(1_000)));
  }
});
