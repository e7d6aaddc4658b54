// A stand-in Kubernetes API server (HTTPS, test CA, bearer token) for
// aad-pod-identity's custom resources, v1 Secrets, Pods and ServiceAccounts, and
// the service account token issuer (TokenRequest, OIDC discovery) that Entra
// Workload ID federation trusts.
//
//   const api = await startApiServer();              // token 'test-token', own CA
//   api.put({ apiVersion: 'aadpodidentity.k8s.io/v1', kind: 'AzureIdentity',
//             metadata: { name: 'id', namespace: 'default' }, spec: { type: 0, clientID: '…' } });
//   api.remove('AzureIdentity', 'default', 'id');    // a DELETED event
//   const kubeconfig = api.writeKubeconfig(dir);     // or api.writeServiceAccount(root) for in-cluster
//   api.dropWatches();                               // cut open watches: clients resume from their resourceVersion
//   api.compact();                                   // older resourceVersions now answer 410 Gone
//   api.tokenRequests                                // each TokenRequest: what was asked, the token issued
//   api.tokenClockSkewSec = -7200;                   // tokens issued from now on are already expired
//   api.rotateSigningKey();                          // new tokens signed by a new key; the JWKS lists old and new
//   await api.close();
//
// Served:
//   GET /apis/aadpodidentity.k8s.io/v1[/namespaces/<ns>]/<plural>         list (limit/continue honoured)
//   GET …same…?watch=1&resourceVersion=<rv>[&timeoutSeconds=<s>]          watch: JSON lines {type, object}
//   GET /api/v1/namespaces/<ns>/secrets/<name>                            one Secret
//   GET, PATCH /api/v1/nodes/<name>                                       one Node; PATCH takes a JSON merge
//                                                                         patch, 409 Conflict when it carries a
//                                                                         resourceVersion that is not the current one
//   POST /apis/events.k8s.io/v1/namespaces/<ns>/events                    creates an Event, validated as the API server
//   PATCH …/events/<name>                                                 does (required fields, note length, series)
//   GET /api/v1/namespaces/<ns>/pods/<name>                               one Pod
//   GET /api/v1[/namespaces/<ns>]/serviceaccounts[?watch=1…]              list and watch, as for the custom resources
//   GET /api/v1/namespaces/<ns>/serviceaccounts/<name>                    one ServiceAccount
//   POST /api/v1/namespaces/<ns>/serviceaccounts/<name>/token             TokenRequest: an RS256 JWT with the claims
//                                                                         Kubernetes puts in, validated as the API server
//                                                                         does (404 no SA or pod, 422 under 600 s, 400 pod
//                                                                         of another SA, 409 pod uid mismatch)
//   GET /.well-known/openid-configuration, GET /openid/v1/jwks            issuer discovery, anonymous as the API server
//                                                                         allows it (system:service-account-issuer-discovery)
// Pods and ServiceAccounts get a metadata.uid when put() without one (kept across puts).
// Every object change gets the next resourceVersion (one counter, as etcd's) and
// is kept in a history that watches replay from, until compact().
import { createHash, generateKeyPairSync, randomBytes, randomUUID, sign, type KeyObject } from 'node:crypto';
import { once } from 'node:events';
import { mkdirSync, writeFileSync } from 'node:fs';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import type { ServerResponse } from 'node:http';
import { createPki, type Pki } from './pki.js';

export const CRD_GROUP_VERSION = 'aadpodidentity.k8s.io/v1';

/** The kinds served, by the plural in their URL. */
export const plurals: Record<string, string> = {
  AzureIdentity: 'azureidentities',
  AzureIdentityBinding: 'azureidentitybindings',
  AzurePodIdentityException: 'azurepodidentityexceptions',
  Secret: 'secrets',
  Node: 'nodes',
  Event: 'events',
  Pod: 'pods',
  ServiceAccount: 'serviceaccounts',
};

/** Kinds without a namespace. */
const clusterScoped = new Set(['Node']);

/** Kinds of the core group (apiVersion v1), whose lists say so. */
const corePlurals = new Set(['secrets', 'nodes', 'pods', 'serviceaccounts']);

/** Kinds put() gives a metadata.uid when they come without one: what the tokens name. */
const withUid = new Set(['Pod', 'ServiceAccount']);

/** The served custom resources' plurals. */
const crdPlurals = new Set(['azureidentities', 'azureidentitybindings', 'azurepodidentityexceptions']);

/** The API server's minimum TokenRequest lifetime (pkg/apis/authentication/validation: 10 minutes) and its default. */
const minTokenSeconds = 600;
const defaultTokenSeconds = 3600;

export interface KubeObject {
  apiVersion: string;
  kind: string;
  metadata: { name: string; namespace?: string; resourceVersion?: string; annotations?: Record<string, string>; [k: string]: unknown };
  [k: string]: unknown;
}

export type EventType = 'ADDED' | 'MODIFIED' | 'DELETED' | 'BOOKMARK' | 'ERROR';

export interface RequestRecord {
  method: string;
  path: string;
  query: Record<string, string>;
  /** The plural for CR, Secret, Pod and ServiceAccount requests; `serviceaccounts/token` for TokenRequests. */
  resource?: string;
  watch: boolean;
  /** When it arrived (Date.now()). */
  at: number;
  /** Response body bytes written so far: a watch's grow as it streams (what bench/apiserver.ts sums). */
  bytes?: number;
}

/** A TokenRequest's bound object (authentication.k8s.io/v1 BoundObjectReference). */
export interface BoundObjectRef {
  kind: string;
  apiVersion: string;
  name: string;
  uid?: string;
}

/** One TokenRequest as received, and the token issued for it (none when refused). */
export interface TokenRequestRecord {
  namespace: string;
  serviceAccount: string;
  audiences: string[];
  /** As requested (undefined: the 3600 s default). */
  expirationSeconds: number | undefined;
  boundObjectRef: BoundObjectRef | undefined;
  /** The HTTP status answered. */
  status: number;
  token: string | undefined;
}

/** One key of the issuer's JWKS (RFC 7517), as the API server lists it. */
export interface Jwk {
  use: 'sig';
  kty: 'RSA';
  kid: string;
  alg: 'RS256';
  n: string;
  e: string;
}

export interface ApiServerOptions {
  /** A PKI to issue the serving certificate from; by default one made (and removed on close) for this server. */
  pki?: Pki;
  token?: string;
  /** --service-account-issuer: the `iss` of the tokens issued [this server's own URL, so Entra can fetch its discovery]. */
  issuer?: string;
}

export interface ApiServer {
  /** https://127.0.0.1:<port> */
  readonly url: string;
  readonly port: number;
  readonly caFile: string;
  readonly caPem: string;
  readonly token: string;
  /** Every request received, in order. */
  readonly requests: RequestRecord[];
  /** TLS connections accepted so far, and open now. */
  readonly connections: { accepted: number; open: number };
  /** How a watch from a compacted resourceVersion is refused: an ERROR event (as real API servers do) or HTTP 410. */
  goneAs: 'event' | 'status';
  /** A list with resourceVersion=0 answered whole whatever its limit, as a watch cache before Kubernetes 1.33 does [false]. */
  wholeFromCache: boolean;
  /** The current (latest) resourceVersion. */
  readonly resourceVersion: string;
  /** Creates or replaces an object (ADDED or MODIFIED); returns the stored copy with its resourceVersion. */
  put(obj: KubeObject): KubeObject;
  /** Deletes an object (DELETED); false when there was none. */
  remove(kind: string, namespace: string, name: string): boolean;
  get(kind: string, namespace: string, name: string): KubeObject | undefined;
  /** List requests for a plural, and watch requests (their query: resourceVersion etc.). */
  lists(plural: string): RequestRecord[];
  watches(plural: string): RequestRecord[];
  /** Number of watch connections open now. */
  openWatches(plural?: string): number;
  /** Resolves when `count` watches of the plural are open. */
  waitForWatches(plural: string, count?: number): Promise<void>;
  /** Sends a BOOKMARK with the current resourceVersion on every open watch. */
  bookmark(): void;
  /** Destroys every open watch connection (a network drop). */
  dropWatches(): void;
  /** Sends an ERROR event with code 410 on every open watch, then ends it. */
  expireWatches(): void;
  /** Forgets the event history: watches and continue tokens from before now get 410 Gone. */
  compact(): void;
  /** The next `count` requests whose path starts with `pathPrefix` (default all) get `status`. */
  failNext(count: number, status: number, pathPrefix?: string, retryAfterS?: number): void;
  /** Runs `act` when the next `method` request whose path starts with `pathPrefix` arrives, before it is answered. */
  beforeNext(method: string, pathPrefix: string, act: () => void | Promise<void>): void;
  /** Stops listening and cuts every connection (the API server is down) … */
  pause(): Promise<void>;
  /** … and listens again on the same port. */
  resume(): Promise<void>;
  /** Writes a kubeconfig for this server (CA file, bearer token); returns its path. */
  writeKubeconfig(dir: string, name?: string): string;
  /**
   * Writes a kubeconfig with a kubelet's credential for `node` (system:node:<node>), which may do what the Node
   * authorizer lets a kubelet do here: request tokens bound to pods on that node, nothing else (403). Returns its path.
   */
  writeNodeKubeconfig(dir: string, node: string): string;
  /**
   * Writes <root>/var/run/secrets/kubernetes.io/serviceaccount/{token,ca.crt,namespace} and
   * returns the environment in-cluster config reads (KUBERNETES_SERVICE_HOST/PORT).
   */
  writeServiceAccount(root: string): { KUBERNETES_SERVICE_HOST: string; KUBERNETES_SERVICE_PORT: string };
  /** The Events stored (events.k8s.io/v1), in creation order. */
  events(): KubeObject[];
  /** The service account token issuer: `iss` of every token, and where its discovery document says it is. */
  readonly issuer: string;
  /** The public signing keys, as GET /openid/v1/jwks serves them. */
  jwks(): { keys: Jwk[] };
  /** A new signing key for the tokens issued from now on; the JWKS keeps the old ones. Returns the new kid. */
  rotateSigningKey(): string;
  /** Seconds added to the clock the tokens' iat/nbf/exp are taken from [0]: -7200 issues tokens already expired. */
  tokenClockSkewSec: number;
  /** Every TokenRequest received, in order. */
  readonly tokenRequests: TokenRequestRecord[];
  close(): Promise<void>;
}

/** A kubeconfig with one cluster, user and context; returns the file written. */
export function writeKubeconfig(file: string, cfg: { server: string; caFile: string; token: string }): string {
  const text = [
    'apiVersion: v1',
    'kind: Config',
    'clusters:',
    '- name: standin',
    '  cluster:',
    `    server: ${cfg.server}`,
    `    certificate-authority: ${cfg.caFile}`,
    'users:',
    '- name: standin',
    '  user:',
    `    token: ${cfg.token}`,
    'contexts:',
    '- name: standin',
    '  context:',
    '    cluster: standin',
    '    user: standin',
    'current-context: standin',
    '',
  ].join('\n');
  writeFileSync(file, text);
  return file;
}

interface Watcher {
  plural: string;
  namespace: string | undefined;
  res: ServerResponse;
  timer: NodeJS.Timeout | undefined;
}

interface HistoryEntry {
  plural: string;
  rv: number;
  type: EventType;
  object: KubeObject;
}

function status(code: number, reason: string, message: string, details?: object): object {
  return { kind: 'Status', apiVersion: 'v1', metadata: {}, status: 'Failure', message, reason, ...(details ? { details } : {}), code };
}

const reasons: Record<number, string> = {
  400: 'BadRequest',
  401: 'Unauthorized',
  403: 'Forbidden',
  404: 'NotFound',
  405: 'MethodNotAllowed',
  409: 'Conflict',
  410: 'Expired',
  415: 'UnsupportedMediaType',
  422: 'Invalid',
  500: 'InternalError',
  503: 'ServiceUnavailable',
};

interface SigningKey {
  privateKey: KeyObject;
  jwk: Jwk;
}

/** An RSA key with the kid Kubernetes gives it: base64url SHA-256 of the DER (PKIX) public key. */
function newSigningKey(): SigningKey {
  const { privateKey, publicKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const kid = createHash('sha256').update(publicKey.export({ type: 'spki', format: 'der' })).digest('base64url');
  const { n, e } = publicKey.export({ format: 'jwk' });
  return { privateKey, jwk: { use: 'sig', kty: 'RSA', kid, alg: 'RS256', n: n ?? '', e: e ?? '' } };
}

function signJwt(key: SigningKey, claims: object): string {
  const part = (value: object): string => Buffer.from(JSON.stringify(value)).toString('base64url');
  const signed = `${part({ alg: 'RS256', kid: key.jwk.kid })}.${part(claims)}`;
  return `${signed}.${sign('sha256', Buffer.from(signed), key.privateKey).toString('base64url')}`;
}

/** metav1.Time: RFC 3339 in whole seconds. */
const rfc3339 = (sec: number): string => new Date(sec * 1000).toISOString().replace(/\.\d{3}Z$/, 'Z');

/** RFC 7386: objects merge, null deletes, anything else (lists included) replaces. */
function mergePatch(target: unknown, patch: unknown): unknown {
  if (typeof patch !== 'object' || patch === null || Array.isArray(patch)) return patch;
  const out: Record<string, unknown> = typeof target === 'object' && target !== null && !Array.isArray(target) ? { ...(target as Record<string, unknown>) } : {};
  for (const [k, v] of Object.entries(patch)) {
    if (v === null) delete out[k];
    else out[k] = mergePatch(out[k], v);
  }
  return out;
}

/** Adds each body chunk written to `res` to `record.bytes`, as it is written. */
function countBytes(res: ServerResponse, record: RequestRecord): void {
  record.bytes = 0;
  const size = (chunk: unknown): number => (typeof chunk === 'string' ? Buffer.byteLength(chunk) : chunk instanceof Uint8Array ? chunk.byteLength : 0);
  const write = res.write.bind(res) as (...args: unknown[]) => boolean;
  const end = res.end.bind(res) as (...args: unknown[]) => ServerResponse;
  res.write = ((chunk: unknown, ...rest: unknown[]) => {
    record.bytes! += size(chunk);
    return write(chunk, ...rest);
  }) as ServerResponse['write'];
  res.end = ((chunk?: unknown, ...rest: unknown[]) => {
    record.bytes! += size(chunk);
    return end(chunk, ...rest);
  }) as ServerResponse['end'];
}

function keyOf(namespace: string, name: string): string {
  return `${namespace}/${name}`;
}

export async function startApiServer(options: ApiServerOptions = {}): Promise<ApiServer> {
  const ownPki = options.pki === undefined;
  const pki = options.pki ?? createPki('apiserver');
  const serving = pki.server('apiserver', ['127.0.0.1', 'localhost']);
  const token = options.token ?? 'test-token';
  /** `Bearer <token>` → the node whose kubelet credential it is. */
  const nodeTokens = new Map<string, string>();

  const store = new Map<string, Map<string, KubeObject>>(Object.values(plurals).map((p) => [p, new Map()]));
  let rv = 100;
  let compactedRv = 0;
  let history: HistoryEntry[] = [];
  const watchers = new Set<Watcher>();
  const requests: RequestRecord[] = [];
  const failures: { count: number; status: number; prefix: string; retryAfterS?: number }[] = [];
  const hooks: { method: string; prefix: string; act: () => void | Promise<void> }[] = [];
  const watchWaiters = new Set<() => void>();
  const signingKeys: SigningKey[] = [newSigningKey()];
  const tokenRequests: TokenRequestRecord[] = [];
  // Known once listening: the default issuer is this server's own URL.
  let issuer = options.issuer ?? '';

  const send = (res: ServerResponse, code: number, body: object): void => {
    res.writeHead(code, { 'content-type': 'application/json' });
    res.end(JSON.stringify(body));
  };
  const fail = (res: ServerResponse, code: number, message: string): void => send(res, code, status(code, reasons[code] ?? 'Failure', message));

  const writeEvent = (w: Watcher, type: EventType, object: object): void => {
    w.res.write(`${JSON.stringify({ type, object })}\n`);
  };
  const endWatch = (w: Watcher): void => {
    clearTimeout(w.timer);
    watchers.delete(w);
    if (!w.res.writableEnded) w.res.end();
  };

  const broadcast = (entry: HistoryEntry): void => {
    for (const w of watchers) {
      if (w.plural === entry.plural && (w.namespace === undefined || w.namespace === entry.object.metadata.namespace)) {
        writeEvent(w, entry.type, entry.object);
      }
    }
  };

  const record = (plural: string, type: EventType, object: KubeObject): void => {
    const entry = { plural, rv, type, object };
    history.push(entry);
    broadcast(entry);
  };

  const list = (res: ServerResponse, plural: string, namespace: string | undefined, query: URLSearchParams): void => {
    let listRv = rv;
    let offset = 0;
    const token = query.get('continue');
    if (token) {
      const parsed = JSON.parse(Buffer.from(token, 'base64url').toString('utf8')) as { rv: number; offset: number };
      if (parsed.rv < compactedRv) return fail(res, 410, 'The provided continue parameter is too old');
      listRv = parsed.rv;
      offset = parsed.offset;
    }
    const all = [...(store.get(plural)?.values() ?? [])]
      .filter((o) => namespace === undefined || o.metadata.namespace === namespace)
      .sort((a, b) => keyOf(a.metadata.namespace ?? '', a.metadata.name).localeCompare(keyOf(b.metadata.namespace ?? '', b.metadata.name)));
    const whole = server.wholeFromCache && query.get('resourceVersion') === '0';
    const limit = (!whole && Number(query.get('limit') ?? 0)) || all.length;
    const items = all.slice(offset, offset + limit);
    const more = offset + limit < all.length;
    const metadata: Record<string, string> = { resourceVersion: String(listRv) };
    if (more) metadata.continue = Buffer.from(JSON.stringify({ rv: listRv, offset: offset + limit })).toString('base64url');
    const kind = Object.keys(plurals).find((k) => plurals[k] === plural);
    send(res, 200, { apiVersion: corePlurals.has(plural) ? 'v1' : CRD_GROUP_VERSION, kind: `${kind}List`, metadata, items });
  };

  const watch = (res: ServerResponse, plural: string, namespace: string | undefined, query: URLSearchParams): void => {
    const from = query.get('resourceVersion') ?? '';
    const fromRv = Number(from || 0);
    const gone = from !== '' && from !== '0' && fromRv < compactedRv;
    if (gone && server.goneAs === 'status') return fail(res, 410, `too old resource version: ${from} (${compactedRv})`);
    res.writeHead(200, { 'content-type': 'application/json' });
    res.flushHeaders();
    const w: Watcher = { plural, namespace, res, timer: undefined };
    if (gone) {
      writeEvent(w, 'ERROR', status(410, 'Expired', `too old resource version: ${from} (${compactedRv})`));
      res.end();
      return;
    }
    const inScope = (o: KubeObject): boolean => namespace === undefined || o.metadata.namespace === namespace;
    if (from === '' || from === '0') {
      for (const o of store.get(plural)?.values() ?? []) if (inScope(o)) writeEvent(w, 'ADDED', o);
    } else {
      for (const e of history) if (e.plural === plural && e.rv > fromRv && inScope(e.object)) writeEvent(w, e.type, e.object);
    }
    const timeout = Number(query.get('timeoutSeconds') ?? 0);
    if (timeout > 0) w.timer = setTimeout(() => endWatch(w), timeout * 1000);
    res.on('close', () => {
      clearTimeout(w.timer);
      watchers.delete(w);
    });
    watchers.add(w);
    for (const wake of watchWaiters) wake();
  };

  const patchNode = (req: import('node:http').IncomingMessage, res: ServerResponse, name: string): void => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const objects = store.get('nodes')!;
      const found = objects.get(keyOf('', name));
      if (!found) return fail(res, 404, `nodes "${name}" not found`);
      if (req.headers['content-type'] !== 'application/merge-patch+json') return fail(res, 415, `only application/merge-patch+json is served`);
      let patch: { metadata?: { resourceVersion?: string } };
      try {
        patch = JSON.parse(Buffer.concat(chunks).toString('utf8')) as typeof patch;
      } catch {
        return fail(res, 400, 'the patch is not JSON');
      }
      const wanted = patch.metadata?.resourceVersion;
      if (wanted !== undefined && wanted !== found.metadata.resourceVersion) {
        return fail(res, 409, `Operation cannot be fulfilled on nodes "${name}": the object has been modified; please apply your changes to the latest version and try again`);
      }
      const patched = mergePatch(found, patch) as KubeObject;
      patched.metadata.name = name;
      send(res, 200, server.put(patched));
    });
  };

  /** events.k8s.io/v1 Event validation, as the API server's (pkg/apis/core/validation ValidateEventCreate/Update). */
  const eventProblem = (e: Record<string, any>, update: boolean): string | undefined => {
    for (const field of ['eventTime', 'reportingController', 'reportingInstance', 'action', 'reason', 'regarding']) {
      if (!e[field]) return `${field}: Required value`;
    }
    if (!/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$/.test(e.eventTime)) return `eventTime: not a MicroTime: ${e.eventTime}`;
    if (e.type !== 'Normal' && e.type !== 'Warning') return `type: Unsupported value: ${e.type}`;
    if (typeof e.note === 'string' && Buffer.byteLength(e.note) > 1024) return 'note: Too long: may not be longer than 1024';
    if (!/^[a-z0-9.-]+\/[A-Za-z0-9_.-]+$/.test(e.reportingController)) return `reportingController: not a qualified name: ${e.reportingController}`;
    if (String(e.reportingInstance).length > 128) return 'reportingInstance: Too long: may not be longer than 128';
    if (e.series !== undefined) {
      if (!(e.series.count >= 2)) return 'series.count: should be at least 2';
      if (!e.series.lastObservedTime) return 'series.lastObservedTime: Required value';
    }
    if (update && e.series === undefined) return 'series: an update must set the series';
    return undefined;
  };
  const readJson = (req: import('node:http').IncomingMessage): Promise<unknown> =>
    new Promise((resolve, reject) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        try {
          resolve(JSON.parse(Buffer.concat(chunks).toString('utf8')));
        } catch (err) {
          reject(err);
        }
      });
    });
  const serveEvent = async (req: import('node:http').IncomingMessage, res: ServerResponse, namespace: string, name: string | undefined): Promise<void> => {
    const objects = store.get('events')!;
    let body: Record<string, any>;
    try {
      body = (await readJson(req)) as Record<string, any>;
    } catch {
      return fail(res, 400, 'the body is not JSON');
    }
    if (req.method === 'POST' && name === undefined) {
      if (req.headers['content-type'] !== 'application/json') return fail(res, 415, 'only application/json is served');
      if (body.apiVersion !== 'events.k8s.io/v1' || body.kind !== 'Event') return fail(res, 400, 'not an events.k8s.io/v1 Event');
      const eventName = body.metadata?.name;
      if (!eventName) return fail(res, 422, 'metadata.name: Required value');
      if ((body.metadata.namespace ?? namespace) !== namespace || body.regarding?.namespace !== namespace) return fail(res, 422, 'the namespace of the Event and of the object it regards must be the URL\'s');
      const problem = eventProblem(body, false);
      if (problem) return fail(res, 422, `Event "${eventName}" is invalid: ${problem}`);
      if (objects.has(keyOf(namespace, eventName))) return fail(res, 409, `events.events.k8s.io "${eventName}" already exists`);
      return send(res, 201, server.put({ ...body, metadata: { ...body.metadata, namespace } } as KubeObject));
    }
    if (req.method === 'PATCH' && name !== undefined) {
      if (req.headers['content-type'] !== 'application/merge-patch+json') return fail(res, 415, 'only application/merge-patch+json is served');
      const found = objects.get(keyOf(namespace, name));
      if (!found) return fail(res, 404, `events.events.k8s.io "${name}" not found`);
      const patched = mergePatch(found, body) as KubeObject;
      const problem = eventProblem(patched, true);
      if (problem) return fail(res, 422, `Event "${name}" is invalid: ${problem}`);
      return send(res, 200, server.put(patched));
    }
    return fail(res, 405, 'only POST of a new Event and PATCH of one are served');
  };

  /**
   * POST …/serviceaccounts/<name>/token, in the order pkg/registry/core/serviceaccount/storage/token.go
   * checks: the ServiceAccount, then validation, then the bound object.
   */
  /** `asNode`: the request comes with a kubelet's credential, which may only bind to pods on its node. */
  const serveTokenRequest = async (req: import('node:http').IncomingMessage, res: ServerResponse, namespace: string, name: string, asNode?: string): Promise<void> => {
    if (req.method !== 'POST') return fail(res, 405, 'only POST is served for serviceaccounts/token');
    if (req.headers['content-type'] !== 'application/json') return fail(res, 415, 'only application/json is served');
    let body: { apiVersion?: unknown; kind?: unknown; metadata?: { name?: string; namespace?: string }; spec?: { audiences?: unknown; expirationSeconds?: unknown; boundObjectRef?: BoundObjectRef | null } };
    try {
      body = (await readJson(req)) as typeof body;
    } catch {
      return fail(res, 400, 'the body is not JSON');
    }
    if (body.apiVersion !== 'authentication.k8s.io/v1' || body.kind !== 'TokenRequest') return fail(res, 400, 'not an authentication.k8s.io/v1 TokenRequest');
    const spec = body.spec ?? {};
    const audiences = Array.isArray(spec.audiences) && spec.audiences.every((a) => typeof a === 'string') ? (spec.audiences as string[]) : [];
    const asked = typeof spec.expirationSeconds === 'number' ? spec.expirationSeconds : undefined;
    const ref = spec.boundObjectRef ?? undefined;
    const entry: TokenRequestRecord = { namespace, serviceAccount: name, audiences, expirationSeconds: asked, boundObjectRef: ref && structuredClone(ref), status: 0, token: undefined };
    tokenRequests.push(entry);
    const refuse = (code: number, message: string, details?: object): void => {
      entry.status = code;
      send(res, code, status(code, reasons[code] ?? 'Failure', message, details));
    };

    const invalid = (field: string, value: unknown, why: string): void =>
      refuse(422, `TokenRequest.authentication.k8s.io "${name}" is invalid: ${field}: Invalid value: ${JSON.stringify(value)}: ${why}`, {
        name,
        group: 'authentication.k8s.io',
        kind: 'TokenRequest',
        causes: [{ reason: 'FieldValueInvalid', message: `Invalid value: ${JSON.stringify(value)}: ${why}`, field }],
      });
    if (body.metadata?.name && body.metadata.name !== name) return invalid('metadata.name', body.metadata.name, 'must match the service account name if specified');
    if (body.metadata?.namespace && body.metadata.namespace !== namespace) return invalid('metadata.namespace', body.metadata.namespace, 'must match the service account namespace if specified');
    const sa = store.get('serviceaccounts')!.get(keyOf(namespace, name));
    if (!sa) return refuse(404, `serviceaccounts "${name}" not found`, { name, kind: 'serviceaccounts' });
    const expirationSeconds = asked ?? defaultTokenSeconds;
    const tooShort = 'may not specify a duration less than 10 minutes';
    // ValidateTokenRequest's errors come with an empty object name.
    if (expirationSeconds < minTokenSeconds) {
      return refuse(422, `TokenRequest.authentication.k8s.io "" is invalid: spec.expirationSeconds: Invalid value: ${expirationSeconds}: ${tooShort}`, {
        group: 'authentication.k8s.io',
        kind: 'TokenRequest',
        causes: [{ reason: 'FieldValueInvalid', message: `Invalid value: ${expirationSeconds}: ${tooShort}`, field: 'spec.expirationSeconds' }],
      });
    }
    if (expirationSeconds > 2 ** 32) {
      return refuse(422, `TokenRequest.authentication.k8s.io "" is invalid: spec.expirationSeconds: Invalid value: ${expirationSeconds}: may not specify a duration larger than 2^32 seconds`);
    }

    let pod: KubeObject | undefined;
    if (ref) {
      const apiVersion = typeof ref.apiVersion === 'string' ? ref.apiVersion : '';
      const [group, version] = apiVersion.includes('/') ? apiVersion.split('/') : ['', apiVersion];
      // The API server also binds to Secrets and Nodes; nmi's tokens are bound to pods only.
      if (group !== '' || ref.kind !== 'Pod') return refuse(400, `cannot bind token to object of type ${group}/${version}, Kind=${ref.kind}`);
      pod = store.get('pods')!.get(keyOf(namespace, ref.name));
      if (!pod) return refuse(404, `pods "${ref.name}" not found`, { name: ref.name, kind: 'pods' });
      if (asNode !== undefined && (pod.spec as { nodeName?: string } | undefined)?.nodeName !== asNode) {
        return refuse(403, `serviceaccounts "${name}" is forbidden: User "system:node:${asNode}" cannot create resource "serviceaccounts/token": no relationship found between node '${asNode}' and this object`);
      }
      // Admission gives every pod a serviceAccountName, "default" when its spec names none.
      const podSa = ((pod.spec as { serviceAccountName?: string } | undefined)?.serviceAccountName) || 'default';
      if (podSa !== name) return refuse(400, `cannot bind token for serviceaccount "${name}" to pod running with different serviceaccount name.`);
      if (ref.uid && ref.uid !== pod.metadata.uid) {
        return refuse(
          409,
          `Operation cannot be fulfilled on Pod "${ref.name}": the UID in the bound object reference (${ref.uid}) does not match the UID in record. The object might have been deleted and then recreated`,
          { name: ref.name, kind: 'Pod' },
        );
      }
    }

    const now = Math.floor(Date.now() / 1000) + server.tokenClockSkewSec;
    const audience = audiences.length > 0 ? audiences : [issuer];
    const token = signJwt(signingKeys.at(-1)!, tokenClaims(sa, pod, audience, now, expirationSeconds));
    entry.status = 201;
    entry.token = token;
    send(res, 201, {
      kind: 'TokenRequest',
      apiVersion: 'authentication.k8s.io/v1',
      metadata: { name, namespace, uid: sa.metadata.uid, creationTimestamp: rfc3339(now) },
      spec: { audiences: audience, expirationSeconds, boundObjectRef: ref ?? null },
      status: { token, expirationTimestamp: rfc3339(now + expirationSeconds) },
    });
  };

  /** pkg/serviceaccount/claims.go's claims, keys sorted as in the tokens the API server signs. */
  const tokenClaims = (sa: KubeObject, pod: KubeObject | undefined, aud: string[], now: number, lifetime: number): object => {
    const namespace = sa.metadata.namespace ?? 'default';
    const kube: Record<string, unknown> = { namespace };
    if (pod) {
      // A pod's node goes in too (ServiceAccountTokenPodNodeInfo): its name, and its uid when the Node is known.
      const nodeName = (pod.spec as { nodeName?: string } | undefined)?.nodeName;
      if (nodeName) {
        const node = store.get('nodes')!.get(keyOf('', nodeName));
        kube.node = { name: nodeName, ...(typeof node?.metadata.uid === 'string' ? { uid: node.metadata.uid } : {}) };
      }
      kube.pod = { name: pod.metadata.name, uid: pod.metadata.uid };
    }
    kube.serviceaccount = { name: sa.metadata.name, uid: sa.metadata.uid };
    return {
      aud,
      exp: now + lifetime,
      iat: now,
      iss: issuer,
      jti: randomUUID(),
      'kubernetes.io': kube,
      nbf: now,
      sub: `system:serviceaccount:${namespace}:${sa.metadata.name}`,
    };
  };

  const discovery = (res: ServerResponse, what: 'configuration' | 'jwks'): void => {
    res.writeHead(200, { 'content-type': what === 'jwks' ? 'application/jwk-set+json' : 'application/json' });
    res.end(
      JSON.stringify(
        what === 'jwks'
          ? server.jwks()
          : {
              issuer,
              // Where this server is, as the API server's default (its external address), whatever the issuer.
              jwks_uri: `${server.url}/openid/v1/jwks`,
              response_types_supported: ['id_token'],
              subject_types_supported: ['public'],
              id_token_signing_alg_values_supported: ['RS256'],
            },
      ),
    );
  };

  const handler = async (req: import('node:http').IncomingMessage, res: ServerResponse): Promise<void> => {
    const url = new URL(req.url ?? '/', 'https://apiserver');
    const query = url.searchParams;
    const isWatch = query.get('watch') === '1' || query.get('watch') === 'true';
    const crd = url.pathname.match(/^\/apis\/aadpodidentity\.k8s\.io\/v1\/(?:namespaces\/([^/]+)\/)?([a-z]+)$/);
    const secret = url.pathname.match(/^\/api\/v1\/namespaces\/([^/]+)\/secrets\/([^/]+)$/);
    const node = url.pathname.match(/^\/api\/v1\/nodes\/([^/]+)$/);
    const event = url.pathname.match(/^\/apis\/events\.k8s\.io\/v1\/namespaces\/([^/]+)\/events(?:\/([^/]+))?$/);
    const pod = url.pathname.match(/^\/api\/v1\/namespaces\/([^/]+)\/pods\/([^/]+)$/);
    const saList = url.pathname.match(/^\/api\/v1\/(?:namespaces\/([^/]+)\/)?serviceaccounts$/);
    const sa = url.pathname.match(/^\/api\/v1\/namespaces\/([^/]+)\/serviceaccounts\/([^/]+)(\/token)?$/);
    const openid = url.pathname === '/.well-known/openid-configuration' ? 'configuration' : url.pathname === '/openid/v1/jwks' ? 'jwks' : undefined;
    requests.push({
      method: req.method ?? '',
      path: url.pathname,
      query: Object.fromEntries(query),
      resource:
        crd?.[2] ??
        (secret ? 'secrets' : node ? 'nodes' : event ? 'events' : pod ? 'pods' : saList ? 'serviceaccounts' : sa ? (sa[3] ? 'serviceaccounts/token' : 'serviceaccounts') : undefined),
      watch: isWatch,
      at: Date.now(),
    });
    countBytes(res, requests.at(-1)!);
    // A kubelet's credential: TokenRequests for pods of its node only (the Node authorizer), nothing else.
    const asNode = nodeTokens.get(req.headers.authorization ?? '');
    if (asNode !== undefined) {
      if (!sa?.[3]) return fail(res, 403, `User "system:node:${asNode}" cannot ${req.method?.toLowerCase()} ${url.pathname}`);
      return serveTokenRequest(req, res, decodeURIComponent(sa[1] ?? ''), decodeURIComponent(sa[2] ?? ''), asNode);
    }
    // Issuer discovery is open to anonymous callers (the system:service-account-issuer-discovery binding): Entra ID calls it.
    if (openid === undefined && req.headers.authorization !== `Bearer ${token}`) return fail(res, 401, 'Unauthorized');
    const injected = failures.find((f) => url.pathname.startsWith(f.prefix));
    if (injected) {
      if (--injected.count <= 0) failures.splice(failures.indexOf(injected), 1);
      if (injected.retryAfterS !== undefined) res.setHeader('retry-after', String(injected.retryAfterS));
      return fail(res, injected.status, 'injected failure');
    }
    const hook = hooks.find((h) => h.method === req.method && url.pathname.startsWith(h.prefix));
    if (hook) {
      hooks.splice(hooks.indexOf(hook), 1);
      await hook.act();
    }
    if (event) return serveEvent(req, res, decodeURIComponent(event[1] ?? ''), event[2] === undefined ? undefined : decodeURIComponent(event[2]));
    if (sa?.[3]) return serveTokenRequest(req, res, decodeURIComponent(sa[1] ?? ''), decodeURIComponent(sa[2] ?? ''));
    if (node) {
      const name = decodeURIComponent(node[1] ?? '');
      if (req.method === 'PATCH') return patchNode(req, res, name);
      if (req.method !== 'GET') return fail(res, 405, 'only GET and PATCH are served for nodes');
      const found = store.get('nodes')?.get(keyOf('', name));
      return found ? send(res, 200, found) : fail(res, 404, `nodes "${name}" not found`);
    }
    if (req.method !== 'GET') return fail(res, 405, 'only GET is served');
    if (openid) return discovery(res, openid);
    if (crd) {
      const [, namespace, plural = ''] = crd;
      if (!crdPlurals.has(plural)) return fail(res, 404, `the server could not find the requested resource`);
      return isWatch ? watch(res, plural, namespace, query) : list(res, plural, namespace, query);
    }
    if (saList) {
      const namespace = saList[1] === undefined ? undefined : decodeURIComponent(saList[1]);
      return isWatch ? watch(res, 'serviceaccounts', namespace, query) : list(res, 'serviceaccounts', namespace, query);
    }
    if (pod || sa) {
      const [plural, match] = pod ? (['pods', pod] as const) : (['serviceaccounts', sa!] as const);
      const name = decodeURIComponent(match[2] ?? '');
      const found = store.get(plural)?.get(keyOf(decodeURIComponent(match[1] ?? ''), name));
      return found ? send(res, 200, found) : fail(res, 404, `${plural} "${name}" not found`);
    }
    if (secret) {
      const [, namespace = '', name = ''] = secret;
      const found = store.get('secrets')?.get(keyOf(decodeURIComponent(namespace), decodeURIComponent(name)));
      return found ? send(res, 200, found) : fail(res, 404, `secrets "${name}" not found`);
    }
    return fail(res, 404, 'the server could not find the requested resource');
  };

  // Idle connections are kept 90 s, as the API server's Go server keeps them, and, as Go's, it sends no
  // Keep-Alive header saying so (node's is left out when the answer names its Connection itself).
  const httpsServer = https.createServer({ key: serving.keyPem, cert: serving.certPem, keepAliveTimeout: 90_000 }, (req, res) => {
    res.setHeader('connection', 'keep-alive');
    void handler(req, res);
  });
  const connections = { accepted: 0, open: 0 };
  httpsServer.on('secureConnection', (socket) => {
    connections.accepted++;
    connections.open++;
    socket.once('close', () => connections.open--);
  });
  httpsServer.listen(0, '127.0.0.1');
  await once(httpsServer, 'listening');
  const port = (httpsServer.address() as AddressInfo).port;
  issuer ||= `https://127.0.0.1:${port}`;

  const pluralOf = (kind: string): string => {
    const plural = plurals[kind];
    if (!plural) throw new Error(`stand-in API server: unknown kind ${kind}`);
    return plural;
  };

  const server: ApiServer = {
    url: `https://127.0.0.1:${port}`,
    port,
    caFile: pki.caFile,
    caPem: pki.caPem,
    token,
    requests,
    connections,
    goneAs: 'event',
    wholeFromCache: false,
    get resourceVersion() {
      return String(rv);
    },
    put(obj) {
      const plural = pluralOf(obj.kind);
      const copy = structuredClone(obj);
      if (clusterScoped.has(obj.kind)) delete copy.metadata.namespace;
      else copy.metadata.namespace ??= 'default';
      copy.metadata.resourceVersion = String(++rv);
      const key = keyOf(copy.metadata.namespace ?? '', copy.metadata.name);
      const objects = store.get(plural)!;
      if (withUid.has(obj.kind)) copy.metadata.uid ??= objects.get(key)?.metadata.uid ?? randomUUID();
      const type = objects.has(key) ? 'MODIFIED' : 'ADDED';
      objects.set(key, copy);
      record(plural, type, copy);
      return structuredClone(copy);
    },
    remove(kind, namespace, name) {
      const plural = pluralOf(kind);
      const objects = store.get(plural)!;
      const found = objects.get(keyOf(namespace, name));
      if (!found) return false;
      objects.delete(keyOf(namespace, name));
      const gone = structuredClone(found);
      gone.metadata.resourceVersion = String(++rv);
      record(plural, 'DELETED', gone);
      return true;
    },
    get(kind, namespace, name) {
      const found = store.get(pluralOf(kind))?.get(keyOf(namespace, name));
      return found && structuredClone(found);
    },
    lists: (plural) => requests.filter((r) => r.resource === plural && !r.watch),
    watches: (plural) => requests.filter((r) => r.resource === plural && r.watch),
    openWatches: (plural) => [...watchers].filter((w) => plural === undefined || w.plural === plural).length,
    async waitForWatches(plural, count = 1) {
      while (server.openWatches(plural) < count) {
        await new Promise<void>((resolve) => {
          const wake = (): void => {
            watchWaiters.delete(wake);
            resolve();
          };
          watchWaiters.add(wake);
        });
      }
    },
    bookmark() {
      for (const w of watchers) {
        writeEvent(w, 'BOOKMARK', { apiVersion: CRD_GROUP_VERSION, kind: 'Bookmark', metadata: { resourceVersion: String(rv) } });
      }
    },
    dropWatches() {
      for (const w of [...watchers]) {
        watchers.delete(w);
        clearTimeout(w.timer);
        w.res.socket?.destroy();
      }
    },
    expireWatches() {
      for (const w of [...watchers]) {
        writeEvent(w, 'ERROR', status(410, 'Expired', 'too old resource version'));
        endWatch(w);
      }
    },
    compact() {
      // As if something else changed first: every resourceVersion a client holds is now too old,
      // while a fresh list's is not.
      compactedRv = ++rv;
      history = [];
    },
    failNext(count, code, prefix = '/', retryAfterS) {
      failures.push({ count, status: code, prefix, retryAfterS });
    },
    beforeNext(method, prefix, act) {
      hooks.push({ method, prefix, act });
    },
    async pause() {
      server.dropWatches();
      const closed = once(httpsServer, 'close');
      httpsServer.close();
      httpsServer.closeAllConnections();
      await closed;
    },
    async resume() {
      httpsServer.listen(port, '127.0.0.1');
      await once(httpsServer, 'listening');
    },
    events: () => [...store.get('events')!.values()].map((e) => structuredClone(e)),
    get issuer() {
      return issuer;
    },
    jwks: () => ({ keys: signingKeys.map((k) => ({ ...k.jwk })) }),
    rotateSigningKey() {
      signingKeys.push(newSigningKey());
      return signingKeys.at(-1)!.jwk.kid;
    },
    tokenClockSkewSec: 0,
    tokenRequests,
    writeKubeconfig(dir, name = 'kubeconfig') {
      return writeKubeconfig(path.join(dir, name), { server: server.url, caFile: pki.caFile, token });
    },
    writeNodeKubeconfig(dir, node) {
      const nodeToken = `kubelet-${node}-${randomBytes(8).toString('hex')}`;
      nodeTokens.set(`Bearer ${nodeToken}`, node);
      return writeKubeconfig(path.join(dir, `kubelet-${node}.kubeconfig`), { server: server.url, caFile: pki.caFile, token: nodeToken });
    },
    writeServiceAccount(root) {
      const dir = path.join(root, 'var/run/secrets/kubernetes.io/serviceaccount');
      mkdirSync(dir, { recursive: true });
      writeFileSync(path.join(dir, 'token'), token);
      writeFileSync(path.join(dir, 'ca.crt'), pki.caPem);
      writeFileSync(path.join(dir, 'namespace'), 'kube-system');
      return { KUBERNETES_SERVICE_HOST: '127.0.0.1', KUBERNETES_SERVICE_PORT: String(port) };
    },
    async close() {
      for (const w of [...watchers]) endWatch(w);
      if (httpsServer.listening) {
        const closed = once(httpsServer, 'close');
        httpsServer.close();
        httpsServer.closeAllConnections();
        await closed;
      }
      if (ownPki) pki.remove();
    },
  };
  return server;
}
