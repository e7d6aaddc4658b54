import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { codes, isNmiError } from '../../src/errors/errors.js';
import { kubeCredentials, loadKubeConfig } from '../../src/kube/kubeconfig.js';

const dir = mkdtempSync(path.join(tmpdir(), 'nmi-kubeconfig-'));
after(() => rmSync(dir, { recursive: true, force: true }));

let n = 0;
/** Writes a kubeconfig in a fresh folder; returns its path. */
function kubeconfig(text: string): string {
  const folder = path.join(dir, `kc-${n++}`);
  mkdirSync(folder);
  writeFileSync(path.join(folder, 'config'), text);
  return path.join(folder, 'config');
}

/** One cluster, user and context; `user` and `cluster` are the inner YAML lines. */
function config(cluster: string[], user: string[]): string {
  return [
    'apiVersion: v1',
    'kind: Config',
    'clusters:',
    '- name: c',
    '  cluster:',
    ...cluster.map((l) => `    ${l}`),
    'users:',
    '- name: u',
    '  user:',
    ...(user.length ? user.map((l) => `    ${l}`) : ['    {}']),
    'contexts:',
    '- name: ctx',
    '  context:',
    '    cluster: c',
    '    user: u',
    'current-context: ctx',
    '',
  ].join('\n');
}

const b64 = (s: string) => Buffer.from(s).toString('base64');

test('files relative to the kubeconfig folder, re-read on every call; data fields decoded', async () => {
  const file = kubeconfig(config(['server: https://api.example:6443/', 'certificate-authority: ca.crt', 'tls-server-name: kube'], ['client-certificate: pki/cert.pem', `client-key-data: ${b64('KEY')}`, 'tokenFile: token']));
  const folder = path.dirname(file);
  mkdirSync(path.join(folder, 'pki'));
  writeFileSync(path.join(folder, 'ca.crt'), 'CA1');
  writeFileSync(path.join(folder, 'pki/cert.pem'), 'CERT');
  writeFileSync(path.join(folder, 'token'), 'tok-1\n');
  const kc = loadKubeConfig({ kubeconfig: file });
  assert.equal(kc.server, 'https://api.example:6443');
  const first = await kubeCredentials(kc);
  assert.deepEqual(
    { ca: first.tls.ca?.toString(), cert: first.tls.cert?.toString(), key: first.tls.key?.toString(), servername: first.tls.servername, reject: first.tls.rejectUnauthorized },
    { ca: 'CA1', cert: 'CERT', key: 'KEY', servername: 'kube', reject: undefined },
  );
  assert.equal(first.headers.authorization, 'Bearer tok-1');
  // Rotation on disk is seen by the next call.
  writeFileSync(path.join(folder, 'ca.crt'), 'CA2');
  writeFileSync(path.join(folder, 'token'), 'tok-2');
  const second = await kubeCredentials(kc);
  assert.equal(second.tls.ca?.toString(), 'CA2');
  assert.equal(second.headers.authorization, 'Bearer tok-2');
});

test('a token wins over a token file; basic auth without a token; insecure-skip-tls-verify', async () => {
  const withToken = loadKubeConfig({ kubeconfig: kubeconfig(config(['server: https://a', 'insecure-skip-tls-verify: true'], ['token: inline', 'tokenFile: /nonexistent/token'])) });
  // The token file is read only when there is no token: here it need not exist.
  assert.equal((await kubeCredentials(withToken)).headers.authorization, 'Bearer inline');
  const basic = await kubeCredentials(loadKubeConfig({ kubeconfig: kubeconfig(config(['server: https://a', 'insecure-skip-tls-verify: true'], ['username: admin', 'password: pw'])) }));
  assert.equal(basic.headers.authorization, `Basic ${b64('admin:pw')}`);
  assert.equal(basic.tls.rejectUnauthorized, false);
});

test('in-cluster: the service account files and the service address, IPv6 in brackets', async () => {
  const saved = { host: process.env.KUBERNETES_SERVICE_HOST, port: process.env.KUBERNETES_SERVICE_PORT };
  try {
    delete process.env.KUBERNETES_SERVICE_HOST;
    assert.throws(() => loadKubeConfig({}), (err: unknown) => isNmiError(err, codes.USAGE) && /no --kubeconfig and not in a cluster/.test(err.message));
    Object.assign(process.env, { KUBERNETES_SERVICE_HOST: 'fd00::1', KUBERNETES_SERVICE_PORT: '443' });
    const root = path.join(dir, 'sa');
    mkdirSync(path.join(root, 'var/run/secrets/kubernetes.io/serviceaccount'), { recursive: true });
    writeFileSync(path.join(root, 'var/run/secrets/kubernetes.io/serviceaccount/ca.crt'), 'CA');
    writeFileSync(path.join(root, 'var/run/secrets/kubernetes.io/serviceaccount/token'), 'sa-token\n');
    const kc = loadKubeConfig({ pathPrefix: root });
    assert.equal(kc.server, 'https://[fd00::1]:443');
    const creds = await kubeCredentials(kc);
    assert.equal(creds.tls.ca?.toString(), 'CA');
    assert.equal(creds.headers.authorization, 'Bearer sa-token');
  } finally {
    for (const [k, v] of [['KUBERNETES_SERVICE_HOST', saved.host], ['KUBERNETES_SERVICE_PORT', saved.port]] as const) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
});

test('an unusable kubeconfig is a one-line usage error naming --kubeconfig and what is wrong', () => {
  const cases: Array<[string, string, RegExp]> = [
    ['not yaml', 'clusters: [\n  - {', /./],
    ['not a mapping', '- a\n- b\n', /not a kubeconfig/],
    ['no current context', 'clusters: []\n', /no current-context/],
    ['unknown context', 'current-context: nope\ncontexts: []\n', /no context named "nope" in contexts/],
    ['contexts not a list', 'current-context: x\ncontexts: {}\n', /contexts is not a list/],
    ['context without cluster', 'current-context: x\ncontexts:\n- name: x\n  context: {user: u}\n', /context "x" names no cluster/],
    ['unknown cluster', 'current-context: x\ncontexts:\n- name: x\n  context: {cluster: gone}\n', /no cluster named "gone" in clusters/],
    ['no server', config(['certificate-authority-data: QQ=='], []), /cluster "c": server must be an http\(s\) URL/],
    ['server not a string', config(['server: 12'], []), /cluster "c": server is not a string/],
    ['unknown user', config(['server: https://a'], []).replace('- name: u\n', '- name: other\n'), /no user named "u" in users/],
    ['exec', config(['server: https://a'], ['exec: {command: kubelogin}']), /user "u": exec is not supported/],
    ['auth provider', config(['server: https://a'], ['auth-provider: {name: azure}']), /user "u": auth-provider is not supported/],
    ['cert without key', config(['server: https://a'], ['client-certificate: c.pem']), /user "u": a client certificate needs a client key/],
  ];
  for (const [name, text, reason] of cases) {
    const file = kubeconfig(text);
    assert.throws(
      () => loadKubeConfig({ kubeconfig: file }),
      (err: unknown) => {
        assert.ok(isNmiError(err, codes.USAGE), name);
        assert.ok(err.message.startsWith(`--kubeconfig ${file}: `), `${name}: ${err.message}`);
        assert.ok(!err.message.includes('\n'), `${name}: one line: ${err.message}`);
        assert.match(err.message, reason, name);
        return true;
      },
    );
  }
});

test('a credential file that went missing fails the request, naming the file', async () => {
  const kc = loadKubeConfig({ kubeconfig: kubeconfig(config(['server: https://a', 'certificate-authority: gone.crt'], ['token: t'])) });
  await assert.rejects(kubeCredentials(kc), /gone\.crt/);
});
