// The API server's address and credentials, from a kubeconfig file or the
// in-cluster service account. Only the fields nmi uses are read (clusters,
// users, contexts, current-context; CA, client certificate and key as files or
// data, token or token file, basic auth, insecure-skip-tls-verify,
// tls-server-name); a user that needs exec or an auth provider is refused at
// start. @kubernetes/client-node did this before and cost ~85 MB of RSS.
import { readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { isIPv6 } from 'node:net';
import path from 'node:path';
import { parse as parseYaml } from 'yaml';
import { UsageError, messageOf } from '../errors/errors.js';
import { verifyServerName } from '../net/server-name.js';

export interface KubeConfigOptions {
  /** --kubeconfig; without it the in-cluster service account is used. */
  kubeconfig?: string;
  /** Prefix for /var/run/secrets/kubernetes.io/serviceaccount (tests). */
  pathPrefix?: string;
  /** The flag that named `kubeconfig`, for its errors [--kubeconfig]. */
  flag?: string;
}

/** A file (absolute path) or inline base64 data, as kubeconfig fields come in pairs. */
type Material = { file: string } | { data: string };

export interface KubeConfig {
  /** Without a trailing slash. */
  server: string;
  ca?: Material;
  cert?: Material;
  key?: Material;
  insecureSkipTlsVerify: boolean;
  tlsServerName?: string;
  token?: string;
  tokenFile?: string;
  basic?: { username: string; password: string };
}

/** What one request needs; files are read again on every call (they rotate on disk). */
export interface KubeCredentials {
  tls: { ca?: Buffer; cert?: Buffer; key?: Buffer; rejectUnauthorized?: boolean } & Partial<ReturnType<typeof verifyServerName>>;
  headers: Record<string, string>;
}

const SERVICE_ACCOUNT = '/var/run/secrets/kubernetes.io/serviceaccount';

/** Reads --kubeconfig, or the in-cluster config; a missing or unusable config is a usage error naming `neededBy`. */
export function loadKubeConfig({ kubeconfig, pathPrefix = '', flag = '--kubeconfig' }: KubeConfigOptions, neededBy = '--bindings kubernetes'): KubeConfig {
  if (kubeconfig) {
    try {
      return parseKubeConfig(readFileSync(kubeconfig, 'utf8'), path.dirname(kubeconfig));
    } catch (err) {
      throw new UsageError(`${flag} ${kubeconfig}: ${messageOf(err).split('\n')[0]}`);
    }
  }
  const host = process.env.KUBERNETES_SERVICE_HOST;
  const port = process.env.KUBERNETES_SERVICE_PORT;
  if (!host || !port) throw new UsageError(`${neededBy}: no --kubeconfig and not in a cluster (KUBERNETES_SERVICE_HOST/PORT unset)`);
  return {
    server: `https://${isIPv6(host) ? `[${host}]` : host}:${port}`,
    ca: { file: `${pathPrefix}${SERVICE_ACCOUNT}/ca.crt` },
    tokenFile: `${pathPrefix}${SERVICE_ACCOUNT}/token`,
    insecureSkipTlsVerify: false,
  };
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** The named entry of a kubeconfig list (clusters, users, contexts), its inner object. */
function entry(doc: Record<string, unknown>, list: string, field: string, name: string): Record<string, unknown> {
  const items = doc[list] ?? [];
  if (!Array.isArray(items)) throw new Error(`${list} is not a list`);
  const found = items.find((item: unknown) => isObject(item) && item.name === name) as Record<string, unknown> | undefined;
  if (!found) throw new Error(`no ${field} named "${name}" in ${list}`);
  if (!isObject(found[field])) throw new Error(`${list} "${name}" has no ${field}`);
  return found[field];
}

function optionalString(obj: Record<string, unknown>, field: string, where: string): string | undefined {
  const v = obj[field];
  if (v === undefined || v === null || v === '') return undefined;
  if (typeof v !== 'string') throw new Error(`${where}: ${field} is not a string`);
  return v;
}

/** `<field>` (a path, relative to the kubeconfig's folder) or `<field>-data` (base64); the file wins, as kubectl. */
function material(obj: Record<string, unknown>, field: string, where: string, dir: string): Material | undefined {
  const file = optionalString(obj, field, where);
  if (file) return { file: path.resolve(dir, file) };
  const data = optionalString(obj, `${field}-data`, where);
  return data ? { data } : undefined;
}

/** The current context's cluster and user; `dir` resolves relative paths, as kubectl does. */
export function parseKubeConfig(text: string, dir: string): KubeConfig {
  const doc: unknown = parseYaml(text);
  if (!isObject(doc)) throw new Error('not a kubeconfig (expected a YAML mapping)');
  const current = optionalString(doc, 'current-context', 'kubeconfig');
  if (!current) throw new Error('no current-context');
  const context = entry(doc, 'contexts', 'context', current);
  const clusterName = optionalString(context, 'cluster', `context "${current}"`);
  if (!clusterName) throw new Error(`context "${current}" names no cluster`);
  const where = `cluster "${clusterName}"`;
  const cluster = entry(doc, 'clusters', 'cluster', clusterName);
  const server = optionalString(cluster, 'server', where);
  if (!server || !/^https?:\/\//.test(server)) throw new Error(`${where}: server must be an http(s) URL`);
  const config: KubeConfig = {
    server: server.replace(/\/+$/, ''),
    ca: material(cluster, 'certificate-authority', where, dir),
    insecureSkipTlsVerify: cluster['insecure-skip-tls-verify'] === true,
    tlsServerName: optionalString(cluster, 'tls-server-name', where),
  };
  const userName = optionalString(context, 'user', `context "${current}"`);
  if (!userName) return config;
  const who = `user "${userName}"`;
  const user = entry(doc, 'users', 'user', userName);
  for (const unsupported of ['exec', 'auth-provider', 'as']) {
    if (user[unsupported] !== undefined) throw new Error(`${who}: ${unsupported} is not supported (use a token, token file or client certificate)`);
  }
  config.cert = material(user, 'client-certificate', who, dir);
  config.key = material(user, 'client-key', who, dir);
  if (!config.cert !== !config.key) throw new Error(`${who}: a client certificate needs a client key, and a key a certificate`);
  config.token = optionalString(user, 'token', who);
  const tokenFile = optionalString(user, 'tokenFile', who) ?? optionalString(user, 'token-file', who);
  if (tokenFile) config.tokenFile = path.resolve(dir, tokenFile);
  const username = optionalString(user, 'username', who);
  if (username) config.basic = { username, password: optionalString(user, 'password', who) ?? '' };
  return config;
}

async function read(m: Material | undefined): Promise<Buffer | undefined> {
  if (!m) return undefined;
  return 'file' in m ? await readFile(m.file) : Buffer.from(m.data, 'base64');
}

/** TLS material and auth headers for one request, files read now. */
export async function kubeCredentials(config: KubeConfig): Promise<KubeCredentials> {
  const [ca, cert, key, tokenText] = await Promise.all([
    read(config.ca),
    read(config.cert),
    read(config.key),
    config.token === undefined && config.tokenFile ? readFile(config.tokenFile, 'utf8') : undefined,
  ]);
  const tls: KubeCredentials['tls'] = { ca, cert, key, ...(config.tlsServerName ? verifyServerName(config.tlsServerName) : {}) };
  if (config.insecureSkipTlsVerify) tls.rejectUnauthorized = false;
  const headers: Record<string, string> = {};
  const token = (config.token ?? tokenText)?.trim();
  if (token) headers.authorization = `Bearer ${token}`;
  else if (config.basic) headers.authorization = `Basic ${Buffer.from(`${config.basic.username}:${config.basic.password}`).toString('base64')}`;
  return { tls, headers };
}
