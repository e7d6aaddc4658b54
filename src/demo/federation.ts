// The demo's stand-ins for Workload ID federation: an API server issuing
// service-account tokens (TokenRequest API, RS256), and an Entra ID that trusts
// them for one service account (a federated identity credential) and exchanges
// them for an app's token. The API server is plain HTTP on the demo node's
// loopback; Entra ID is HTTPS (nmi talks to Entra ID over https only) with a
// certificate made here with openssl, which the demo's nmi trusts. The tests use
// fuller ones (OIDC discovery, JWKS over TLS, every refusal) under test/standins/.
import { generateKeyPairSync, randomUUID, sign, verify, type KeyObject } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { TOKEN_EXCHANGE_AUDIENCE } from '../kube/service-account-token.js';
import { jwtClaims } from '../util/jwt.js';
import { json, type Standin } from './standins.js';

interface Account {
  namespace: string;
  serviceAccount: string;
  pod: { name: string; uid: string };
}

const b64 = (value: object | Buffer): string => (Buffer.isBuffer(value) ? value : Buffer.from(JSON.stringify(value))).toString('base64url');

function readBody(req: http.IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    let body = '';
    req.setEncoding('utf8').on('data', (d: string) => (body += d)).on('end', () => resolve(body)).on('error', reject);
  });
}

async function listen(server: http.Server | https.Server, scheme: 'http' | 'https', close: () => void): Promise<Standin> {
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return { url: `${scheme}://127.0.0.1:${(server.address() as AddressInfo).port}`, calls: 0, close };
}

/** The API server's TokenRequest API for the pods given: tokens bound to the pod, for its own service account only. */
export async function startTokenIssuer(accounts: Account[], bearer: string): Promise<Standin & { issuer: string; publicKey: KeyObject }> {
  const { privateKey, publicKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  let issuer = '';
  const server = http.createServer((req, res) => {
    standin.calls += 1;
    const match = /^\/api\/v1\/namespaces\/([^/]+)\/serviceaccounts\/([^/]+)\/token$/.exec(req.url ?? '');
    if (req.headers.authorization !== `Bearer ${bearer}`) return json(res, 401, { kind: 'Status', code: 401, reason: 'Unauthorized' });
    if (!match || req.method !== 'POST') return json(res, 404, { kind: 'Status', code: 404, reason: 'NotFound' });
    void readBody(req).then((text) => {
      const spec = (JSON.parse(text) as { spec?: { audiences?: string[]; expirationSeconds?: number; boundObjectRef?: { name?: string; uid?: string } } }).spec ?? {};
      const account = accounts.find((a) => a.namespace === match[1] && a.serviceAccount === match[2]);
      const bound = spec.boundObjectRef;
      if (!account || bound?.name !== account.pod.name || bound.uid !== account.pod.uid) return json(res, 400, { kind: 'Status', code: 400, reason: 'BadRequest' });
      const now = Math.floor(Date.now() / 1000);
      const exp = now + (spec.expirationSeconds ?? 3600);
      const claims = {
        aud: spec.audiences ?? [],
        exp,
        iat: now,
        iss: issuer,
        jti: randomUUID(),
        'kubernetes.io': { namespace: account.namespace, pod: account.pod, serviceaccount: { name: account.serviceAccount } },
        nbf: now,
        sub: `system:serviceaccount:${account.namespace}:${account.serviceAccount}`,
      };
      const signed = `${b64({ alg: 'RS256', kid: 'demo' })}.${b64(claims)}`;
      const token = `${signed}.${b64(sign('sha256', Buffer.from(signed), privateKey))}`;
      json(res, 201, { apiVersion: 'authentication.k8s.io/v1', kind: 'TokenRequest', status: { token, expirationTimestamp: new Date(exp * 1000).toISOString() } });
    }, (err: Error) => json(res, 400, { kind: 'Status', code: 400, reason: 'BadRequest', message: err.message }));
  });
  const standin = { ...(await listen(server, 'http', () => server.close())), issuer: '', publicKey };
  issuer = standin.url;
  standin.issuer = issuer;
  return standin;
}

/** Entra ID's token endpoint for one app, trusting the issuer's tokens for one subject; its CA certificate is `certFile`. */
export async function startEntra(
  dir: string,
  trust: { tenant: string; clientId: string; issuer: string; subject: string; publicKey: KeyObject },
): Promise<Standin & { certFile: string }> {
  const keyFile = path.join(dir, 'entra.key');
  const certFile = path.join(dir, 'entra.crt');
  // A throwaway self-signed certificate for 127.0.0.1, good for a day.
  execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', keyFile, '-out', certFile, '-days', '1', '-subj', '/CN=nmi demo Entra ID', '-addext', 'subjectAltName=IP:127.0.0.1'], { stdio: 'ignore' });
  const server = https.createServer({ key: readFileSync(keyFile), cert: readFileSync(certFile) }, (req, res) => {
    standin.calls += 1;
    if (req.method !== 'POST' || (req.url ?? '').split('?')[0] !== `/${trust.tenant}/oauth2/v2.0/token`) return json(res, 404, { error: 'not_found' });
    void readBody(req).then((text) => {
      const form = new URLSearchParams(text);
      const refuse = (description: string) => json(res, 401, { error: 'invalid_client', error_description: description });
      if (form.get('client_id') !== trust.clientId) return json(res, 400, { error: 'unauthorized_client', error_description: 'AADSTS700016: Application not found in the directory.' });
      const [header, payload, signature] = (form.get('client_assertion') ?? '').split('.');
      if (!header || !payload || !signature || !verify('sha256', Buffer.from(`${header}.${payload}`), trust.publicKey, Buffer.from(signature, 'base64url'))) {
        return refuse('AADSTS700027: Client assertion failed signature validation.');
      }
      const claims = jwtClaims(`${header}.${payload}`) as { iss?: string; sub?: string; aud?: string[]; exp?: number };
      if (claims.iss !== trust.issuer || claims.sub !== trust.subject || !claims.aud?.includes(TOKEN_EXCHANGE_AUDIENCE)) {
        return refuse(`AADSTS700213: No matching federated identity record found for presented assertion subject '${claims.sub}'.`);
      }
      if (!claims.exp || claims.exp * 1000 < Date.now()) return refuse('AADSTS700024: Client assertion is not within its valid time range.');
      const scope = form.get('scope') ?? '';
      const access = `${b64({ alg: 'none' })}.${b64({ aud: scope.replace(/\/\.default$/, ''), appid: trust.clientId, sub: claims.sub, demo: true })}.demo-signature`;
      json(res, 200, { token_type: 'Bearer', expires_in: 3599, ext_expires_in: 3599, access_token: access });
    }, (err: Error) => json(res, 400, { error: 'invalid_request', error_description: err.message }));
  });
  const standin = { ...(await listen(server, 'https', () => server.close())), certFile };
  return standin;
}
