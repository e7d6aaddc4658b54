// The world the js token server's tests run it in: the pod index, bindings and
// token cache as small in-test implementations of their interfaces, and its
// answers as read off a raw socket. Shared by token-server.test.ts and
// js-bounds.test.ts.
import assert from 'node:assert/strict';
import type { Registry } from 'prom-client';
import type { AzureIdentity, PodIdentities } from '../../src/bindings/model.js';
import type { Pod } from '../../src/kubelet/pod.js';
import { silentLogger, type Logger } from '../../src/log/logger.js';
import type { Token } from '../../src/tokens/token.js';
import { registerServerMetrics } from '../../src/server/metrics.js';
import type { TokenServerDeps, TokenServerOptions } from '../../src/server/core.js';

export const TOKEN = '/metadata/identity/oauth2/token';
export const QUERY = 'api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net';
export const DEFAULTS: TokenServerOptions = { metadataHeaderRequired: true, blockInstanceMetadata: false, retryAfter: false, multipleIdentities: 'first', proxyTimeoutMs: 2_000 };

export const pod: Pod = { uid: 'u1', namespace: 'default', name: 'app', labels: { aadpodidbinding: 'app' }, ips: ['127.0.0.1'], hostNetwork: false, phase: 'Running', nodeName: 'n1' };

export function identity(name: string, clientID: string, resourceID = ''): AzureIdentity {
  return { name, namespace: 'default', type: 0, clientID, resourceID, tenantID: '', namespaced: false, version: '1' };
}
export const idA = identity('a', 'AAAA-1111', '/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a');
export const idB = identity('b', 'bbbb-2222', '/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/b');

export function tokenFor(id: AzureIdentity, resource: string): Token {
  const now = Math.floor(Date.now() / 1000);
  return { accessToken: `token-for-${id.name}`, clientId: id.clientID, expiresOn: now + 3600, extExpiresIn: 3600, notBefore: now - 300, resource, tokenType: 'Bearer' };
}

/** What the in-test pod index, bindings and token cache hold, and what they were asked. */
export interface World {
  pods: Map<string, Pod>;
  bound: PodIdentities;
  getToken: (id: AzureIdentity, resource: string) => Promise<Token>;
  lookups: string[];
  tokenCalls: Array<{ identity: string; resource: string }>;
}

export function newWorld(): World {
  return {
    pods: new Map([['127.0.0.1', pod]]),
    bound: { exception: false, identities: [idA] },
    getToken: async (id, resource) => tokenFor(id, resource),
    lookups: [],
    tokenCalls: [],
  };
}

export interface WorldDepsOptions {
  options?: Partial<TokenServerOptions>;
  registry?: Registry;
  /** The synchronous hit path too: known callers and a peek into these tokens, keyed `<identity name> <resource>`. */
  cached?: Map<string, Token>;
  log?: Logger;
  extra?: Partial<TokenServerDeps>;
}

/** createTokenServer's deps, reading whichever world `current` gives at the time (tests start each from a new one). */
export function worldDeps(current: () => World, upstreamImds: URL, { options = {}, registry, cached, log = silentLogger, extra = {} }: WorldDepsOptions = {}): TokenServerDeps {
  return {
    callers: {
      async lookup(ip) {
        current().lookups.push(ip);
        return current().pods.get(ip);
      },
      ...(cached ? { known: (ip: string) => current().pods.get(ip) } : {}),
    },
    ...(cached ? { peekToken: (id: AzureIdentity, resource: string) => cached.get(`${id.name} ${resource}`) } : {}),
    identitiesFor: () => current().bound,
    getToken: (id, resource) => {
      current().tokenCalls.push({ identity: id.name, resource });
      return current().getToken(id, resource);
    },
    upstreamImds,
    options: { ...DEFAULTS, ...options },
    log,
    ...(registry ? { metrics: registerServerMetrics(registry) } : {}),
    ...extra,
  };
}

export interface RawAnswer {
  status: number;
  headers: Record<string, string>;
  body: string;
}

/** One answer, whole: status line, headers (names lower-cased) and body. */
export function parseAnswer(text: string): RawAnswer {
  const end = text.indexOf('\r\n\r\n');
  assert.ok(end > 0, `no complete answer: ${JSON.stringify(text)}`);
  const [statusLine, ...lines] = text.slice(0, end).split('\r\n');
  const headers: Record<string, string> = {};
  for (const line of lines) {
    const colon = line.indexOf(':');
    headers[line.slice(0, colon).toLowerCase()] = line.slice(colon + 1).trim();
  }
  const body = text.slice(end + 4);
  return { status: Number(statusLine!.split(' ')[1]), headers, body: headers['transfer-encoding'] === 'chunked' ? unchunk(body) : body };
}

function unchunk(text: string): string {
  let body = '';
  for (let at = 0; ; ) {
    const lineEnd = text.indexOf('\r\n', at);
    const size = parseInt(text.slice(at, lineEnd), 16);
    if (!(size > 0)) return body;
    body += text.slice(lineEnd + 2, lineEnd + 2 + size);
    at = lineEnd + 2 + size + 2;
  }
}

export function assertProblem(answer: RawAnswer, status: number, error: string, description: string): void {
  assert.equal(answer.status, status, answer.body);
  assert.equal(answer.headers['content-type'], 'application/json; charset=utf-8');
  assert.equal(answer.headers['content-length'], String(Buffer.byteLength(answer.body)));
  assert.equal(answer.body, JSON.stringify({ error, error_description: description }));
}
