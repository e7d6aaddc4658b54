// sd_listen_fds(3)'s variables as nmi reads them.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { listenFds, takeListenFds } from '../../src/systemd/listen-fds.js';

test('descriptors from 3, by LISTEN_FDNAMES; the variables are unset so children do not take them', () => {
  const env: NodeJS.ProcessEnv = { LISTEN_PID: '42', LISTEN_FDS: '3', LISTEN_FDNAMES: 'token:probe:token', PATH: '/bin' };
  assert.deepEqual([...takeListenFds(env, 42)], [['token', [3, 5]], ['probe', [4]]]);
  assert.deepEqual(env, { PATH: '/bin' });
});

test("another process's variables, a bad count, or none: nothing taken, and still unset", () => {
  for (const env of [
    { LISTEN_PID: '41', LISTEN_FDS: '1', LISTEN_FDNAMES: 'token' },
    { LISTEN_PID: '42', LISTEN_FDS: 'x' },
    { LISTEN_PID: '42' },
    {},
  ] as NodeJS.ProcessEnv[]) {
    assert.equal(takeListenFds(env, 42).size, 0, JSON.stringify(env));
    assert.deepEqual(Object.keys(env), []);
  }
});

test('unnamed descriptors are "unknown", as sd_listen_fds_with_names says; listenFds leaves the variables for a re-execution', () => {
  const env: NodeJS.ProcessEnv = { LISTEN_PID: '7', LISTEN_FDS: '2' };
  assert.deepEqual([...listenFds(env, 7)], [['unknown', [3, 4]]]);
  assert.equal(env.LISTEN_FDS, '2');
});
