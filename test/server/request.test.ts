// request.ts is pure: every rule checked here without a socket. The HTTP-level
// answers are in token-server.test.ts.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  checks,
  classifyRequest,
  IDENTITY_API_VERSIONS,
  parseQuery,
  pathProblem,
  routeOf,
  type RequestHeaders,
  type RequestPolicy,
} from '../../src/server/request.js';

const policy: RequestPolicy = { metadataHeaderRequired: true, blockInstanceMetadata: false };
const ok: RequestHeaders = { metadata: 'true' };
const q = 'api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net';
const classify = (target: string, headers: RequestHeaders = ok, method = 'GET', p = policy) => classifyRequest(method, target, headers, p);
const problemOf = (target: string, headers: RequestHeaders = ok, method = 'GET', p = policy) => {
  const c = classify(target, headers, method, p);
  return c.kind === 'reject' ? c.problem : undefined;
};

test('a valid token request is classified with its decoded parameters and raw target', () => {
  const target = `/metadata/identity/oauth2/token?${q}&client_id=ABC`;
  assert.deepEqual(classify(target), {
    kind: 'token',
    route: 'token',
    request: { target, apiVersion: '2018-02-01', resource: 'https://vault.azure.net', selector: { param: 'client_id', value: 'ABC' } },
  });
});

test('mi_res_id is an alias of msi_res_id', () => {
  const c = classify(`/metadata/identity/oauth2/token/?${q}&mi_res_id=%2Fsubscriptions%2Fs`);
  assert.equal(c.kind, 'token');
  assert.deepEqual(c.kind === 'token' && c.request.selector, { param: 'msi_res_id', value: '/subscriptions/s' });
});

test('routes: token path with or without trailing slash, the five proxied categories, everything else other', () => {
  assert.equal(routeOf('/metadata/identity/oauth2/token'), 'token');
  assert.equal(routeOf('/metadata/identity/oauth2/token/'), 'token');
  assert.equal(routeOf('/metadata/instance'), 'instance');
  assert.equal(routeOf('/metadata/instance/compute/vmId'), 'instance');
  assert.equal(routeOf('/metadata/versions'), 'versions');
  assert.equal(routeOf('/metadata/attested/document'), 'attested');
  assert.equal(routeOf('/metadata/loadbalancer'), 'loadbalancer');
  assert.equal(routeOf('/metadata/scheduledevents'), 'scheduledevents');
  for (const path of ['/', '/metadata', '/metadata/', '/metadata/instancex', '/metadata/INSTANCE', '/metadata/identity',
    '/metadata/identity/oauth2/tokens', '/metadata/identity/oauth2/token//', '/latest/meta-data']) {
    assert.equal(routeOf(path), 'other', path);
  }
});

test('path hygiene: backslashes, encoded slashes, doubled slashes, dot segments and bad escapes are refused', () => {
  assert.equal(pathProblem('/metadata\\instance'), checks.backslash);
  assert.equal(pathProblem('/metadata%2finstance'), checks.encodedSlash);
  assert.equal(pathProblem('/metadata%5Cinstance'), checks.encodedSlash);
  assert.equal(pathProblem('//metadata/instance'), checks.doubledSlash);
  assert.equal(pathProblem('/metadata/instance/'), undefined);
  for (const segment of ['.', '..', '%2e', '%2E%2e', '.%2e', '%2e.']) {
    assert.equal(pathProblem(`/metadata/${segment}/identity/oauth2/token`), checks.dotSegment, segment);
    assert.equal(pathProblem(`/metadata/identity/oauth2/token/${segment}`), checks.dotSegment, segment);
  }
  assert.equal(pathProblem('/metadata/instance/a.b/..c/...'), undefined, 'dots inside names are fine');
  assert.equal(pathProblem('/metadata/instance/%zz'), checks.badEscape);
  assert.equal(pathProblem('/metadata/instance/%4'), checks.badEscape);
  // Hygiene applies before routing, to every path, including the unknown ones.
  assert.equal(problemOf('/nothing//here'), checks.doubledSlash);
});

test('only origin-form request targets are accepted', () => {
  assert.equal(problemOf('http://169.254.169.254/metadata/identity/oauth2/token'), checks.target);
  assert.equal(problemOf('*', ok, 'OPTIONS'), checks.target);
});

test('checks 1–5 each fail with their own answer', () => {
  const token = '/metadata/identity/oauth2/token';
  assert.equal(problemOf(`${token}?${q}`, ok, 'POST'), checks.method);
  assert.equal(problemOf(`${token}?${q}`, ok, 'HEAD'), checks.method);
  assert.equal(problemOf(`${token}?${q}`, {}), checks.metadataHeader);
  assert.equal(problemOf(`${token}?${q}`, { metadata: 'false' }), checks.metadataHeader);
  assert.equal(problemOf(`${token}?${q}`, { metadata: 'true, true' }), checks.metadataHeader);
  assert.equal(classify(`${token}?${q}`, { metadata: 'TRUE' }).kind, 'token');
  for (const name of ['x-forwarded-for', 'forwarded', 'via']) {
    assert.equal(problemOf(`${token}?${q}`, { ...ok, [name]: '' }), checks.forwarded, name);
  }
  assert.equal(problemOf(`${token}?resource=r`), checks.apiVersionMissing);
  for (const version of ['', '2017-12-01', '2018-02-02', '2099-01-01', 'latest', ' 2018-02-01']) {
    assert.equal(problemOf(`${token}?resource=r&api-version=${encodeURIComponent(version)}`), checks.apiVersionBad, version);
  }
  assert.equal(problemOf(`${token}?api-version=2018-02-01`), checks.resourceMissing);
  assert.equal(problemOf(`${token}?api-version=2018-02-01&resource=`), checks.resourceMissing);
  assert.equal(problemOf(`${token}?${q}&resource=r2`), checks.duplicate);
  assert.equal(problemOf(`${token}?${q}&api-version=2019-08-01`), checks.duplicate);
  assert.equal(problemOf(`${token}?${q}&reso%75rce=r2`), checks.duplicate, 'names compare after decoding');
  assert.equal(problemOf(`${token}?${q}&x=1&x=2`), checks.duplicate, 'unknown parameters may not repeat either');
  assert.equal(problemOf(`${token}?${q}&client_id=a&client_id=a`), checks.duplicate);
  assert.equal(problemOf(`${token}?${q}&client_id=a&msi_res_id=b`), checks.twoIds);
  assert.equal(problemOf(`${token}?${q}&object_id=a&client_id=b`), checks.twoIds);
  assert.equal(problemOf(`${token}?${q}&msi_res_id=a&mi_res_id=a`), checks.twoIds);
  assert.equal(problemOf(`${token}?${q}&client_id=`), checks.emptyId);
  assert.equal(problemOf(`${token}?${q}&bad=%zz`), checks.badQuery);
});

test('the first failing check wins, in the contract order', () => {
  const token = '/metadata/identity/oauth2/token';
  assert.equal(problemOf(`${token}`, { 'x-forwarded-for': '1.2.3.4' }, 'POST'), checks.method);
  assert.equal(problemOf(`${token}`, { 'x-forwarded-for': '1.2.3.4' }), checks.metadataHeader);
  assert.equal(problemOf(`${token}`, { ...ok, via: '1.1 proxy' }), checks.forwarded);
  assert.equal(problemOf(`${token}?api-version=bad`), checks.apiVersionBad, 'api-version before resource');
  assert.equal(problemOf(`${token}?api-version=2018-02-01&client_id=a&client_id=b`), checks.resourceMissing, 'resource before duplicates');
  assert.equal(problemOf(`${token}?${q}&client_id=a&client_id=b&object_id=c`), checks.duplicate, 'duplicates before two ids');
});

test('without --metadata-header-required the header is not needed', () => {
  const lax = { ...policy, metadataHeaderRequired: false };
  assert.equal(classify(`/metadata/identity/oauth2/token?${q}`, {}, 'GET', lax).kind, 'token');
});

test('proxied categories keep their raw target; --block-instance-metadata refuses only instance', () => {
  const target = '/metadata/instance/compute?api-version=2021-02-01&format=json';
  assert.deepEqual(classify(target, {}, 'GET'), { kind: 'proxy', route: 'instance', target });
  const block = { ...policy, blockInstanceMetadata: true };
  assert.deepEqual(classify(target, ok, 'GET', block), { kind: 'reject', route: 'instance', problem: checks.blocked });
  assert.equal(classify('/metadata/versions', ok, 'GET', block).kind, 'proxy');
  assert.equal(classify('/metadata/scheduledevents?api-version=2020-07-01', ok, 'POST', block).kind, 'proxy');
  assert.deepEqual(classify('/metadata/other', ok), { kind: 'reject', route: 'other', problem: checks.notFound });
});

test('parseQuery: URLSearchParams semantics, strict decoding, repeated names kept', () => {
  assert.deepEqual(parseQuery('a=1&b=x+y&c=%2B&&d&e=f=g'), new Map([['a', ['1']], ['b', ['x y']], ['c', ['+']], ['d', ['']], ['e', ['f=g']]]));
  assert.deepEqual(parseQuery('a=1&a=2'), new Map([['a', ['1', '2']]]));
  assert.deepEqual(parseQuery(''), new Map());
  assert.equal(parseQuery('a=%zz'), undefined);
  assert.equal(parseQuery('a=%C3%28'), undefined, 'invalid UTF-8');
  assert.equal(parseQuery('%=1'), undefined);
});

test('the api-version list starts at 2018-02-01 and every entry is a real date', () => {
  const sorted = [...IDENTITY_API_VERSIONS].sort();
  assert.equal(sorted[0], '2018-02-01');
  for (const version of sorted) assert.equal(new Date(`${version}T00:00:00Z`).toISOString().slice(0, 10), version);
});
