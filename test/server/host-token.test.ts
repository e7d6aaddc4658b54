// The host token socket over real unix sockets, as root: who can connect
// (mode, owner, a real `nobody` process), how the path is prepared (directory,
// stale socket, files that are not its own), every answer of /host/token, and
// that no TCP listener is ever opened. Pods, bindings and the token cache are
// small in-test implementations of the deps.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { chmod, chown, lstat, mkdir, mkdtemp, readdir, readFile, readlink, rm, stat, symlink, writeFile } from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type { AzureIdentity, PodIdentities } from '../../src/bindings/model.js';
import { codes, isNmiError } from '../../src/errors/errors.js';
import type { Pod } from '../../src/kubelet/pod.js';
import { silentLogger } from '../../src/log/logger.js';
import { createHostTokenServer, hostChecks, type HostTokenServer } from '../../src/server/host-token.js';
import { problems } from '../../src/server/answers.js';
import { checks } from '../../src/server/request.js';
import type { Token } from '../../src/tokens/token.js';
import { UpstreamError } from '../../src/tokens/upstream-error.js';
import type { MultipleIdentities } from '../../src/config/commands.js';
import { captureLogs } from '../harness/log-capture.js';

const NOBODY = 65534;
const RESOURCE = 'https://vault.azure.net';
const QUERY = `resource=${encodeURIComponent(RESOURCE)}`;

function pod(namespace: string, name: string): Pod {
  return { uid: `${namespace}-${name}`, namespace, name, labels: {}, ips: [], hostNetwork: false, phase: 'Running', nodeName: 'n1' };
}
function identity(name: string, clientID: string, resourceID: string): AzureIdentity {
  return { name, namespace: 'default', type: 0, clientID, resourceID, tenantID: '', namespaced: false, version: '1' };
}
const idA = identity('a', 'AAAA-1111', '/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a');
const idB = identity('b', 'bbbb-2222', '/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/b');

/** Pod key `namespace/name` → its identities. */
const bindings = new Map<string, AzureIdentity[]>([
  ['default/app', [idA]],
  ['other/app', [idB]],
  ['default/multi', [idA, idB]],
  ['default/lonely', []],
]);
const pods = [...bindings.keys()].map((key) => pod(...(key.split('/') as [string, string])));

function tokenFor(id: AzureIdentity, resource: string): Token {
  const now = Math.floor(Date.now() / 1000);
  return { accessToken: `token-for-${id.name}`, clientId: id.clientID, expiresOn: now + 3600, extExpiresIn: 3600, notBefore: now - 300, resource, tokenType: 'Bearer' };
}

let getToken: (id: AzureIdentity, resource: string) => Promise<Token>;
const tokenCalls: Array<{ identity: string; resource: string }> = [];
const servers: HostTokenServer[] = [];
const logs = captureLogs();

function startServer(socketPath: string, log = silentLogger, multipleIdentities: MultipleIdentities = 'refuse'): HostTokenServer {
  const server = createHostTokenServer({
    socketPath,
    findPod: async (namespace, name) => pods.find((p) => p.namespace === namespace && p.name === name),
    identitiesFor: (p): PodIdentities => ({ exception: false, identities: bindings.get(`${p.namespace}/${p.name}`) ?? [] }),
    getToken: (id, resource) => {
      tokenCalls.push({ identity: id.name, resource });
      return getToken(id, resource);
    },
    multipleIdentities,
    log,
  });
  servers.push(server);
  return server;
}

let root: string;
let socketPath: string;
before(async () => {
  root = await mkdtemp(path.join(os.tmpdir(), 'nmi-host-token-'));
  socketPath = path.join(root, 'run', 'host-token.sock');
  await startServer(socketPath, logs.log).listen();
});
after(async () => {
  for (const server of servers) await server.close();
  await rm(root, { recursive: true, force: true });
});

function reset(): void {
  getToken = async (id, resource) => tokenFor(id, resource);
  tokenCalls.length = 0;
}

interface Reply {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: string;
}

/** One request over the unix socket. */
async function ask(target: string, headers: Record<string, string> = {}, method = 'GET', via = socketPath): Promise<Reply> {
  const req = http.request({ socketPath: via, path: target, method, headers, agent: false });
  req.end();
  const [res] = (await once(req, 'response')) as [http.IncomingMessage];
  const chunks: Buffer[] = [];
  for await (const chunk of res) chunks.push(chunk as Buffer);
  return { status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks).toString() };
}

/** A request written byte for byte (http.request cannot repeat a header); the status and body read to EOF. */
async function askRaw(text: string): Promise<Reply> {
  const socket = net.connect(socketPath);
  await once(socket, 'connect');
  socket.end(text);
  const chunks: Buffer[] = [];
  for await (const chunk of socket) chunks.push(chunk as Buffer);
  const [head = '', body = ''] = Buffer.concat(chunks).toString().split('\r\n\r\n');
  const [statusLine = '', ...lines] = head.split('\r\n');
  const headers = Object.fromEntries(lines.map((line) => [line.slice(0, line.indexOf(':')).toLowerCase(), line.slice(line.indexOf(':') + 1).trim()]));
  return { status: Number(statusLine.split(' ')[1]), headers, body };
}

function forPod(namespace: string, name: string): Record<string, string> {
  return { podns: namespace, podname: name };
}

function assertProblem(reply: Reply, status: number, error: string, description: string | RegExp): void {
  assert.equal(reply.status, status, reply.body);
  assert.equal(reply.headers['content-type'], 'application/json; charset=utf-8');
  const body = JSON.parse(reply.body) as { error: string; error_description: string };
  assert.deepEqual(Object.keys(body), ['error', 'error_description']);
  assert.equal(body.error, error);
  if (typeof description === 'string') assert.equal(body.error_description, description);
  else assert.match(body.error_description, description);
}

async function expectRefused(server: HostTokenServer, message: RegExp): Promise<void> {
  await assert.rejects(server.listen(), (err: unknown) => {
    assert.ok(isNmiError(err, codes.USAGE), `not a usage error: ${String(err)}`);
    assert.match(err.message, /^--host-token-socket: /);
    assert.match(err.message, message);
    return true;
  });
}

/** A fresh directory for one test, root-owned, with the given mode. */
async function directory(mode: number): Promise<string> {
  const dir = await mkdtemp(path.join(root, 'dir-'));
  await chmod(dir, mode);
  return dir;
}

test('a token for the pod the headers name, on /host/token and /host/token/', async () => {
  reset();
  const reply = await ask(`/host/token/?${QUERY}`, forPod('other', 'app'));
  assert.equal(reply.status, 200, reply.body);
  assert.equal(reply.headers['content-type'], 'application/json; charset=utf-8');
  assert.equal(reply.headers['cache-control'], 'no-store');
  const body = JSON.parse(reply.body) as Record<string, unknown>;
  assert.deepEqual(Object.keys(body), ['access_token', 'client_id', 'expires_in', 'expires_on', 'ext_expires_in', 'not_before', 'resource', 'token_type']);
  assert.ok(Object.values(body).every((value) => typeof value === 'string'));
  assert.equal(body['access_token'], 'token-for-b');
  assert.equal(body['client_id'], idB.clientID);
  assert.equal(body['resource'], RESOURCE);
  assert.ok(Number(body['expires_in']) > 3500 && Number(body['expires_in']) <= 3600);

  const noSlash = await ask(`/host/token?${QUERY}`, forPod('default', 'app'));
  assert.equal(noSlash.status, 200, noSlash.body);
  assert.equal((JSON.parse(noSlash.body) as Record<string, string>)['access_token'], 'token-for-a');
  assert.deepEqual(tokenCalls, [
    { identity: 'b', resource: RESOURCE },
    { identity: 'a', resource: RESOURCE },
  ]);
});

test('the socket is exactly 0600, owned by root, in a directory made 0700', async () => {
  const info = await lstat(socketPath);
  assert.ok(info.isSocket());
  assert.equal(info.mode & 0o7777, 0o600);
  assert.equal(info.uid, 0);
  const dir = await stat(path.dirname(socketPath));
  assert.equal(dir.mode & 0o7777, 0o700);
  assert.equal(dir.uid, 0);
});

test('missing parents are made 0700; the umask is restored; close() leaves the socket file, where nothing answers any more', async () => {
  const umask = process.umask(0o022);
  process.umask(umask);
  const nested = path.join(root, 'made', 'deeper', 'host.sock');
  const server = startServer(nested);
  await server.listen();
  assert.equal(process.umask(umask), umask);
  for (const dir of [path.join(root, 'made'), path.join(root, 'made', 'deeper')]) assert.equal((await stat(dir)).mode & 0o7777, 0o700, dir);
  assert.equal((await ask(`/host/token?${QUERY}`, forPod('default', 'app'), 'GET', nested)).status, 200);

  await server.close();
  await server.close(); // idempotent
  // A restart's nmi takes the file over (systemd's store holds the socket meanwhile); without one, a stale socket refuses.
  assert.ok((await lstat(nested)).isSocket());
  await assert.rejects(ask(`/host/token?${QUERY}`, forPod('default', 'app'), 'GET', nested), /ECONNREFUSED/);
  await startServer(nested).listen();
  assert.equal((await ask(`/host/token?${QUERY}`, forPod('default', 'app'), 'GET', nested)).status, 200, 'the next one removes the stale file');
});

test('a group- or world-writable parent, or one not owned by root, is refused before anything is created', async () => {
  for (const mode of [0o777, 0o770, 0o1777]) {
    const dir = await directory(mode);
    await expectRefused(startServer(path.join(dir, 'host.sock')), /group- or world-writable/);
    assert.deepEqual(await readdir(dir), []);
  }
  const foreign = await directory(0o755);
  await chown(foreign, NOBODY, NOBODY);
  await expectRefused(startServer(path.join(foreign, 'host.sock')), new RegExp(`owned by uid ${NOBODY}, not root`));
  assert.deepEqual(await readdir(foreign), []);
});

test('a stale socket file is replaced', async () => {
  const dir = await directory(0o700);
  const stale = path.join(dir, 'host.sock');
  // A process killed while listening leaves its socket file behind.
  const child = spawnSync(process.execPath, ['-e', "require('net').createServer().listen(process.argv[1], () => process.kill(process.pid, 'SIGKILL'))", stale]);
  assert.equal(child.signal, 'SIGKILL');
  assert.equal(await connectAs(undefined, stale), 'true ECONNREFUSED');

  await startServer(stale).listen();
  assert.equal((await lstat(stale)).mode & 0o7777, 0o600);
  reset();
  assert.equal((await ask(`/host/token?${QUERY}`, forPod('default', 'app'), 'GET', stale)).status, 200);
});

test('a socket another process still serves is refused, and keeps working', async () => {
  const dir = await directory(0o700);
  const live = path.join(dir, 'host.sock');
  const other = http.createServer((_req, res) => res.end('other'));
  other.listen(live);
  await once(other, 'listening');
  try {
    await expectRefused(startServer(live), /in use by another process/);
    assert.equal((await ask('/', {}, 'GET', live)).body, 'other');
  } finally {
    other.close();
    await once(other, 'close');
  }
});

test('a regular file, a directory or a symlink at the path is refused and left alone', async () => {
  const dir = await directory(0o700);
  const file = path.join(dir, 'file.sock');
  await writeFile(file, 'keep me');
  await expectRefused(startServer(file), /is not a socket; not removing it/);
  assert.equal(await readFile(file, 'utf8'), 'keep me');

  const folder = path.join(dir, 'folder.sock');
  await mkdir(folder);
  await expectRefused(startServer(folder), /is not a socket/);
  assert.ok((await lstat(folder)).isDirectory());

  const link = path.join(dir, 'link.sock');
  await symlink(file, link);
  await expectRefused(startServer(link), /is not a socket/);
  assert.equal(await readlink(link), file);
});

test('podns, podname and resource are required, once each', async () => {
  reset();
  assertProblem(await ask(`/host/token?${QUERY}`, { podname: 'app' }), 400, 'invalid_request', 'Required header podns not specified');
  assertProblem(await ask(`/host/token?${QUERY}`, { podns: 'default' }), 400, 'invalid_request', 'Required header podname not specified');
  assertProblem(await ask(`/host/token?${QUERY}`, { podns: '', podname: 'app' }), 400, 'invalid_request', 'Required header podns not specified');
  assertProblem(await askRaw(`GET /host/token?${QUERY} HTTP/1.1\r\nHost: x\r\npodns: default\r\npodns: other\r\npodname: app\r\nConnection: close\r\n\r\n`), 400, 'invalid_request', 'Header podns is specified more than once');
  assertProblem(await ask('/host/token', forPod('default', 'app')), 400, checks.resourceMissing.error, checks.resourceMissing.error_description);
  assertProblem(await ask(`/host/token?${QUERY}&${QUERY}`, forPod('default', 'app')), 400, 'invalid_request', checks.duplicate.error_description);
  assertProblem(await ask(`/host/token?${QUERY}&client_id=x&mi_res_id=y`, forPod('default', 'app')), 400, 'invalid_request', checks.twoIds.error_description);
  assertProblem(await ask(`/host/token?${QUERY}&client_id=`, forPod('default', 'app')), 400, 'invalid_request', checks.emptyId.error_description);
  assertProblem(await ask('/host/token?resource=%zz', forPod('default', 'app')), 400, 'invalid_request', checks.badQuery.error_description);
  assert.deepEqual(tokenCalls, []);
});

test('an unknown pod is 404 not_found', async () => {
  reset();
  assertProblem(await ask(`/host/token?${QUERY}`, forPod('default', 'ghost')), 404, 'not_found', 'Pod default/ghost not found on this node');
  assertProblem(await ask(`/host/token?${QUERY}`, forPod('kube-system', 'app')), 404, 'not_found', hostChecks.podNotFound('kube-system', 'app').error_description);
  assert.deepEqual(tokenCalls, []);
});

test('identity selection: none, several, and the requested one', async () => {
  reset();
  const notFound = problems.identityNotFound;
  assertProblem(await ask(`/host/token?${QUERY}`, forPod('default', 'lonely')), 400, notFound.error, notFound.error_description);
  assertProblem(await ask(`/host/token?${QUERY}&client_id=${idB.clientID}`, forPod('default', 'app')), 400, notFound.error, notFound.error_description);
  const multiple = problems.multipleIdentities;
  assertProblem(await ask(`/host/token?${QUERY}`, forPod('default', 'multi')), 400, multiple.error, multiple.error_description);
  assert.deepEqual(tokenCalls, []);

  const byClientId = await ask(`/host/token?${QUERY}&client_id=${idB.clientID.toUpperCase()}`, forPod('default', 'multi'));
  assert.equal((JSON.parse(byClientId.body) as Record<string, string>)['access_token'], 'token-for-b');
  const byResourceId = await ask(`/host/token?${QUERY}&mi_res_id=${encodeURIComponent(idA.resourceID)}`, forPod('default', 'multi'));
  assert.equal((JSON.parse(byResourceId.body) as Record<string, string>)['access_token'], 'token-for-a');
  const byMsiResId = await ask(`/host/token?${QUERY}&msi_res_id=${encodeURIComponent(idB.resourceID)}`, forPod('default', 'multi'));
  assert.equal((JSON.parse(byMsiResId.body) as Record<string, string>)['access_token'], 'token-for-b');

  // --multiple-identities first, as on the token endpoint.
  const firstSocket = path.join(root, 'run', 'first.sock');
  await startServer(firstSocket, silentLogger, 'first').listen();
  const first = await ask(`/host/token?${QUERY}`, forPod('default', 'multi'), 'GET', firstSocket);
  assert.equal((JSON.parse(first.body) as Record<string, string>)['access_token'], 'token-for-a');
});

test('upstream failures: a 4xx is passed on as it came, an outage is 503 with Retry-After, anything else 500', async () => {
  reset();
  getToken = async () => {
    throw new UpstreamError('client', 'refused', { status: 403, body: { error: 'invalid_client', error_description: 'AADSTS700016: no such application' } });
  };
  assertProblem(await ask(`/host/token?${QUERY}`, forPod('default', 'app')), 403, 'invalid_client', 'AADSTS700016: no such application');

  getToken = async () => {
    throw new UpstreamError('server', 'down', { status: 500, retryAfterMs: 7_000 });
  };
  const outage = await ask(`/host/token?${QUERY}`, forPod('default', 'app'));
  assertProblem(outage, 503, 'temporarily_unavailable', /retry later/);
  assert.equal(outage.headers['retry-after'], '7');

  getToken = async () => {
    throw new Error('bug');
  };
  assertProblem(await ask(`/host/token?${QUERY}`, forPod('default', 'app')), 500, problems.internal.error, problems.internal.error_description);
  assert.ok(logs.lines().some((line) => line.msg === 'host token request failed'));
});

test('other paths are 404, odd spellings 400, other methods 405', async () => {
  reset();
  const headers = forPod('default', 'app');
  assertProblem(await ask(`/metadata/identity/oauth2/token?api-version=2018-02-01&${QUERY}`, { ...headers, Metadata: 'true' }), 404, 'not_found', hostChecks.notFound.error_description);
  assertProblem(await ask('/host/tokens', headers), 404, 'not_found', hostChecks.notFound.error_description);
  assertProblem(await ask('/', headers), 404, 'not_found', hostChecks.notFound.error_description);
  assertProblem(await ask(`/host//token?${QUERY}`, headers), 400, 'invalid_request', checks.doubledSlash.error_description);
  assertProblem(await ask(`/host/x/../token?${QUERY}`, headers), 400, 'invalid_request', checks.dotSegment.error_description);
  const post = await ask(`/host/token?${QUERY}`, headers, 'POST');
  assertProblem(post, 405, 'method_not_allowed', hostChecks.method.error_description);
  assert.equal(post.headers['allow'], 'GET');
  assert.deepEqual(tokenCalls, []);
});

/** Runs a `nobody` (or root) node process that looks at the socket and tries to connect; prints what happened. */
async function connectAs(uid: number | undefined, target: string): Promise<string> {
  const script = `
    const path = process.argv[1];
    const visible = require('fs').lstatSync(path).isSocket();
    const socket = require('net').connect(path);
    socket.on('connect', () => { console.log(visible + ' connected'); socket.destroy(); });
    socket.on('error', (err) => console.log(visible + ' ' + err.code));`;
  const ids = uid === undefined ? {} : { uid, gid: uid };
  // /proc/self/exe (the forked child's: node): nobody may not reach the runtime's path (npm ci's, under a 0700 folder).
  const child = spawn('/proc/self/exe', ['-e', script, target], { ...ids, cwd: '/', stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  child.stdout.on('data', (chunk: Buffer) => (out += chunk.toString()));
  await once(child, 'close');
  return out.trim();
}

test('a process that is not root cannot connect: EACCES from the socket mode itself', async () => {
  // A traversable 0755 parent, so only the socket's own 0600 stands in the way.
  const dir = await directory(0o755);
  await chmod(root, 0o755);
  try {
    const open = path.join(dir, 'host.sock');
    await startServer(open).listen();
    assert.equal(await connectAs(undefined, open), 'true connected');
    assert.equal(await connectAs(NOBODY, open), 'true EACCES');
  } finally {
    await chmod(root, 0o700);
  }
});

/** Inodes of the TCP sockets this process holds in LISTEN state, from /proc. */
async function listeningTcpInodes(): Promise<Set<string>> {
  const listening = new Set<string>();
  for (const table of ['/proc/net/tcp', '/proc/net/tcp6']) {
    for (const row of (await readFile(table, 'utf8')).split('\n').slice(1)) {
      const fields = row.trim().split(/\s+/);
      if (fields[3] === '0A' && fields[9] !== undefined) listening.add(fields[9]);
    }
  }
  const mine = new Set<string>();
  for (const fd of await readdir('/proc/self/fd')) {
    const target = await readlink(`/proc/self/fd/${fd}`).catch(() => '');
    const inode = /^socket:\[(\d+)\]$/.exec(target)?.[1];
    if (inode !== undefined && listening.has(inode)) mine.add(inode);
  }
  return mine;
}

test('no TCP listener is opened', async () => {
  // The check sees a TCP listener of this process when there is one.
  const withoutProbe = (await listeningTcpInodes()).size;
  const probe = net.createServer().listen(0, '127.0.0.1');
  await once(probe, 'listening');
  assert.equal((await listeningTcpInodes()).size, withoutProbe + 1);
  probe.close();
  await once(probe, 'close');

  const beforeListen = await listeningTcpInodes();
  const dir = await directory(0o700);
  const only = path.join(dir, 'host.sock');
  await startServer(only).listen();
  reset();
  assert.equal((await ask(`/host/token?${QUERY}`, forPod('default', 'app'), 'GET', only)).status, 200);
  assert.deepEqual(await listeningTcpInodes(), beforeListen);
  assert.ok((await readFile('/proc/net/unix', 'utf8')).includes(only));
});

test('no log line carries a token', () => {
  assert.ok(logs.lines().length > 0);
  for (const line of logs.lines()) assert.doesNotMatch(JSON.stringify(line), /token-for-/);
});
