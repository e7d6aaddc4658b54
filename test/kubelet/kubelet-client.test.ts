// KubeletClient against the real-TLS stand-in kubelet: authentication, server
// name verification, failures, and the PodList parsing.
import assert from 'node:assert/strict';
import { copyFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { after, test } from 'node:test';
import { codes, isNmiError } from '../../src/errors/errors.js';
import { KubeletClient, parsePodList, type KubeletClientOptions } from '../../src/kubelet/kubelet-client.js';
import { createPki } from '../standins/pki.js';
import { makePodJson, startKubelet, type Kubelet } from '../standins/kubelet.js';

const pki = createPki('kubelet-client');
const otherPki = createPki('kubelet-other');
const clients: KubeletClient[] = [];
const kubelets: Kubelet[] = [];

after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await Promise.all(kubelets.map((k) => k.close()));
  pki.remove();
  otherPki.remove();
});

function client(options: KubeletClientOptions): KubeletClient {
  const c = new KubeletClient(options);
  clients.push(c);
  return c;
}

async function kubelet(options: Partial<Parameters<typeof startKubelet>[0]> = {}): Promise<Kubelet> {
  const k = await startKubelet({ pki, ...options });
  kubelets.push(k);
  return k;
}

function mtls(k: Kubelet, extra: Partial<KubeletClientOptions> = {}): KubeletClientOptions {
  return { url: k.url, ca: k.caFile, clientCert: k.client.cert, clientKey: k.client.key, ...extra };
}

async function kubeletError(promise: Promise<unknown>): Promise<Error & { code: string }> {
  const err = await promise.then(
    () => assert.fail('expected the kubelet call to fail'),
    (e: unknown) => e,
  );
  assert.ok(isNmiError(err, codes.KUBELET), `expected NmiError ${codes.KUBELET}, got ${String(err)}`);
  return err as Error & { code: string };
}

test('mTLS: reads /pods and parses the pods', async () => {
  const k = await kubelet({ pods: [makePodJson({ name: 'web', namespace: 'shop', uid: 'u-1', ip: '10.244.0.5', labels: { aadpodidbinding: 'web' } })] });
  const pods = await client(mtls(k)).fetchPods();
  assert.deepEqual(pods, [
    { uid: 'u-1', namespace: 'shop', name: 'web', labels: { aadpodidbinding: 'web' }, ips: ['10.244.0.5'], hostNetwork: false, phase: 'Running', nodeName: 'node1', serviceAccount: 'default', createdAt: '2024-01-01T00:00:00Z' },
  ]);
  assert.equal(k.calls, 1);
});

test('a pod being deleted carries its deletionTimestamp', async () => {
  const k = await kubelet({ pods: [makePodJson({ name: 'old', uid: 'u-2', ip: '10.244.0.6', deletionTimestamp: '2024-01-01T01:00:00Z' })] });
  const [pod] = await client(mtls(k)).fetchPods();
  assert.equal(pod?.deletingSince, '2024-01-01T01:00:00Z');
});

test('a URL with a path prefix reads <prefix>/pods', async () => {
  const k = await kubelet();
  // The stand-in serves only /pods, so a prefix reaches it as a 404: the path was kept.
  const err = await kubeletError(client(mtls(k, { url: new URL('/proxy/', k.url) })).fetchPods());
  assert.match(err.message, /GET \/proxy\/pods answered 404/);
});

test('a client without a certificate is rejected by the handshake', async () => {
  const k = await kubelet();
  const err = await kubeletError(client({ url: k.url, ca: k.caFile }).fetchPods());
  assert.match(err.message, /kubelet GET \/pods failed/);
  assert.equal(k.calls, 0);
});

test("a CA that did not sign the kubelet's certificate is refused", async () => {
  const k = await kubelet();
  const err = await kubeletError(client(mtls(k, { ca: otherPki.caFile })).fetchPods());
  assert.match(err.message, /certificate/i);
  assert.equal(k.calls, 0);
});

test('a client certificate from another CA is refused; rotating the files to a good one is picked up', async () => {
  const k = await kubelet();
  const foreign = otherPki.client('intruder');
  const cert = path.join(pki.dir, 'rotating.crt');
  const key = path.join(pki.dir, 'rotating.key');
  copyFileSync(foreign.cert, cert);
  copyFileSync(foreign.key, key);
  const c = client(mtls(k, { clientCert: cert, clientKey: key }));
  await kubeletError(c.fetchPods());

  copyFileSync(k.client.cert, cert);
  copyFileSync(k.client.key, key);
  assert.deepEqual(await c.fetchPods(), []);
  assert.equal(k.calls, 1);
});

test('bearer token: sent from the file, re-read on each call so rotation works; the message never holds it', async () => {
  const k = await kubelet({ token: 'token-one' });
  const tokenFile = path.join(pki.dir, 'kubelet-token');
  writeFileSync(tokenFile, 'token-one\n');
  const c = client({ url: k.url, ca: k.caFile, tokenFile });
  assert.deepEqual(await c.fetchPods(), []);

  k.token = 'token-two';
  const err = await kubeletError(c.fetchPods());
  assert.match(err.message, /answered 401/);
  assert.doesNotMatch(err.message, /token-one|token-two/);

  writeFileSync(tokenFile, 'token-two');
  assert.deepEqual(await c.fetchPods(), []);
});

test('bearer token: a missing or empty token file is an error naming the flag', async () => {
  const k = await kubelet({ token: 'secret-token' });
  const missing = await kubeletError(client({ url: k.url, ca: k.caFile, tokenFile: path.join(pki.dir, 'nope') }).fetchPods());
  assert.match(missing.message, /--kubelet-token-file .*ENOENT/);
  const empty = path.join(pki.dir, 'empty-token');
  writeFileSync(empty, '\n');
  const blank = await kubeletError(client({ url: k.url, ca: k.caFile, tokenFile: empty }).fetchPods());
  assert.match(blank.message, /is empty/);
  assert.equal(k.calls, 0);
});

test('a CN-only serving certificate needs serverName, and then verifies', async () => {
  const k = await kubelet({ serverNames: [], serverCn: 'aks-nodepool1-0@1700000000', pods: [makePodJson({ name: 'a', ip: '10.1.0.9' })] });
  const byAddress = await kubeletError(client(mtls(k)).fetchPods());
  assert.match(byAddress.message, /ERR_TLS_CERT_ALTNAME_INVALID/);

  const wrongName = await kubeletError(client(mtls(k, { serverName: 'aks-nodepool1-1@1700000000' })).fetchPods());
  assert.match(wrongName.message, /ERR_TLS_CERT_ALTNAME_INVALID/);

  const pods = await client(mtls(k, { serverName: k.serverName })).fetchPods();
  assert.deepEqual(pods.map((p) => p.name), ['a']);
});

test('kubelet failures: a status, a dropped connection and a hang each give a KUBELET error', async () => {
  const k = await kubelet();
  const c = client(mtls(k, { timeoutMs: 300 }));
  k.failWith(500);
  assert.match((await kubeletError(c.fetchPods())).message, /answered 500/);
  k.failWith('close');
  await kubeletError(c.fetchPods());
  k.failWith('hang');
  assert.match((await kubeletError(c.fetchPods())).message, /timed out|Timeout/i);
  k.failWith(null);
  assert.deepEqual(await c.fetchPods(), []);
});

test('the kubelet being down is a KUBELET error', async () => {
  const k = await kubelet();
  await k.stop();
  assert.match((await kubeletError(client(mtls(k)).fetchPods())).message, /ECONNREFUSED/);
});

test('a body over maxBodyBytes is refused', async () => {
  const k = await kubelet({ pods: Array.from({ length: 50 }, (_, i) => makePodJson({ name: `p${i}`, ip: `10.0.0.${i}` })) });
  await kubeletError(client(mtls(k, { maxBodyBytes: 1024 })).fetchPods());
  assert.equal((await client(mtls(k)).fetchPods()).length, 50);
});

test('options: a certificate without its key is refused up front', () => {
  assert.throws(() => new KubeletClient({ url: new URL('https://127.0.0.1:10250'), clientCert: '/c.crt' }), (e: unknown) => isNmiError(e, codes.KUBELET));
});

test('parsing: dual-stack podIPs, podIP fallback, hostNetwork, and missing or null fields', () => {
  const dual = makePodJson({ name: 'dual', ip: '10.244.1.4', ips: ['10.244.1.4', 'fd00:10:244:1::4'] });
  const legacy = { metadata: { name: 'legacy', namespace: 'ns', uid: 'u' }, status: { phase: 'Running', podIP: '10.244.1.5' } };
  const host = makePodJson({ name: 'host', ip: '10.240.0.4', hostNetwork: true });
  const bare = { metadata: { name: 'bare', labels: { ok: 'yes', bad: 3 } }, spec: null, status: { podIPs: [{}, null, { ip: '' }] } };
  const pods = parsePodList({ kind: 'PodList', apiVersion: 'v1', items: [dual, legacy, host, bare, null, 'junk'] });

  assert.deepEqual(pods.map((p) => p.name), ['dual', 'legacy', 'host', 'bare']);
  assert.deepEqual(pods[0]?.ips, ['10.244.1.4', 'fd00:10:244:1::4']);
  assert.deepEqual(pods[1]?.ips, ['10.244.1.5']);
  assert.equal(pods[1]?.nodeName, '');
  assert.equal(pods[2]?.hostNetwork, true);
  assert.deepEqual(pods[3], { uid: '', namespace: '', name: 'bare', labels: { ok: 'yes' }, ips: [], hostNetwork: false, phase: '', nodeName: '' });
});

test('parsing: an empty node lists items null; anything but a PodList object is an error', () => {
  assert.deepEqual(parsePodList({ kind: 'PodList', apiVersion: 'v1', metadata: {}, items: null }), []);
  assert.deepEqual(parsePodList({ kind: 'PodList' }), []);
  for (const body of [null, [], 'pods', 42, { items: {} }]) {
    assert.throws(() => parsePodList(body), (e: unknown) => isNmiError(e, codes.KUBELET), JSON.stringify(body));
  }
});
