// The native server's answers per token entry (--audit-log): counted by the epoll
// thread, taken by TypeScript, none lost when an entry is replaced or removed between
// two takes, and the last ones taken as the server stops.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Agent, request } from 'undici';
import { createNativeTokenServer } from '../../src/server/native-server.js';
import { tokenKey, type TableToken } from '../../src/server/tables.js';
import { idA, newWorld, QUERY, TOKEN, tokenFor, worldDeps } from './token-world.js';

const row = (resource: string, accessToken: string): TableToken => ({
  identityKey: 'default/a',
  identity: 'default/a',
  resource,
  token: { ...tokenFor(idA, resource), accessToken },
  serveUntilMs: Date.now() + 60_000,
});

test('hits are counted per entry, through a replacement and a removal, and after the server stopped', async () => {
  const world = newWorld();
  const server = createNativeTokenServer(worldDeps(() => world, new URL('http://127.0.0.1:9')), { countHits: true });
  await server.listen('127.0.0.1', 0);
  const agent = new Agent({ connections: 1 });
  const ask = async (n: number) => {
    for (let i = 0; i < n; i++) {
      const res = await request(`http://127.0.0.1:${server.port}${TOKEN}?${QUERY}`, { headers: { Metadata: 'true' }, dispatcher: agent });
      assert.equal(res.statusCode, 200);
      await res.body.text();
    }
  };
  try {
    server.setCallers([{ address: '127.0.0.1', exception: false, identities: [idA] }]);
    const vault = 'https://vault.azure.net';
    const key = tokenKey({ identityKey: 'default/a', resource: vault });
    server.updateTokens([row(vault, 'first')], []);
    await ask(3);
    server.updateTokens([row(vault, 'second')], []); // replaced: its 3 are still owed
    await ask(4);
    assert.deepEqual(sum(server.takeHits()), { [key]: 7 });
    assert.deepEqual(sum(server.takeHits()), {});
    await ask(2);
    server.updateTokens([], [row(vault, 'second')]); // removed: its 2 are still owed
    assert.deepEqual(sum(server.takeHits()), { [key]: 2 });
    server.updateTokens([row(vault, 'third')], []);
    await ask(5);
    await server.close(1_000);
    assert.deepEqual(sum(server.takeHits()), { [key]: 5 }, 'taken as the thread ended');
    assert.deepEqual(sum(server.takeHits()), {});
    assert.equal(server.stats(), undefined);
  } finally {
    await agent.destroy();
    await server.close();
  }
});

/** Counts by key: an entry replaced between two takes appears twice, its old and its new. */
function sum(hits: [string, number][]): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [key, n] of hits) out[key] = (out[key] ?? 0) + n;
  return out;
}
