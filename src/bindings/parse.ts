// Raw Kubernetes objects (from a bindings file or the API server) to the model
// types, validated strictly. Error messages name the object and the field, and
// never quote a value: a Secret's data, or a field next to it, must not reach a log.
import { createHash } from 'node:crypto';
import { codes, NmiError } from '../errors/errors.js';
import { objectKey } from '../kube/object-key.js';
import { urlBase } from '../util/url-base.js';
import {
  IdentityType,
  type AzureIdentity,
  type AzureIdentityBinding,
  type AzurePodIdentityException,
  type Secret,
  type SecretRef,
  type WorkloadServiceAccount,
} from './model.js';

export const CRD_API_VERSION = 'aadpodidentity.k8s.io/v1';
export const BEHAVIOR_ANNOTATION = 'aadpodidentity.k8s.io/Behavior';
export const BEHAVIOR_NAMESPACED = 'namespaced';

/** Everything a source knows at one moment. */
export interface BindingSet {
  identities: AzureIdentity[];
  bindings: AzureIdentityBinding[];
  exceptions: AzurePodIdentityException[];
  secrets: Secret[];
  /** Service accounts annotated for Workload ID (azure.workload.identity/client-id); unannotated ones may be left out. */
  serviceAccounts?: WorkloadServiceAccount[];
  /** Objects left out as invalid, by "Kind namespace/name", with why: `nmi explain` names them. */
  invalid?: ReadonlyMap<string, string>;
}

export interface ParseResult extends BindingSet {
  /** One per invalid object; the valid objects are still returned. */
  errors: NmiError[];
}

export type ParsedObject =
  | { kind: 'AzureIdentity'; value: AzureIdentity }
  | { kind: 'AzureIdentityBinding'; value: AzureIdentityBinding }
  | { kind: 'AzurePodIdentityException'; value: AzurePodIdentityException }
  | { kind: 'Secret'; value: Secret }
  | { kind: 'ServiceAccount'; value: WorkloadServiceAccount };

type Obj = Record<string, unknown>;

interface Meta {
  /** "Kind namespace/name", for messages. */
  label: string;
  name: string;
  namespace: string;
  annotations: Record<string, string>;
}

function isObject(v: unknown): v is Obj {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function fail(label: string, what: string): never {
  throw new NmiError(codes.BINDINGS, `${label}: ${what}`);
}

function meta(kind: string, raw: unknown, defaultNamespace: string): { meta: Meta; obj: Obj } {
  if (!isObject(raw)) fail(kind, 'not an object');
  const m = raw.metadata;
  if (!isObject(m)) fail(kind, 'metadata missing');
  if (typeof m.name !== 'string' || m.name === '') fail(kind, 'metadata.name must be a non-empty string');
  if (m.namespace !== undefined && (typeof m.namespace !== 'string' || m.namespace === '')) {
    fail(`${kind} ${m.name}`, 'metadata.namespace must be a non-empty string');
  }
  const namespace = (m.namespace as string | undefined) ?? defaultNamespace;
  const label = `${kind} ${objectKey(namespace, m.name)}`;
  return { meta: { label, name: m.name, namespace, annotations: stringMap(label, 'metadata.annotations', m.annotations) }, obj: raw };
}

function stringMap(label: string, field: string, v: unknown): Record<string, string> {
  if (v === undefined || v === null) return {};
  if (!isObject(v)) fail(label, `${field} must be a map of strings`);
  const out: Record<string, string> = {};
  for (const [k, val] of Object.entries(v)) {
    if (typeof val !== 'string') fail(label, `${field}.${k} must be a string`);
    out[k] = val;
  }
  return out;
}

function specOf(m: Meta, obj: Obj): Obj {
  if (!isObject(obj.spec)) fail(m.label, 'spec missing');
  return obj.spec;
}

// aad-pod-identity is read by Go's encoding/json, which matches field names
// case-insensitively; manifests in the wild say both `clientID` and `ClientID`.
function field(o: Obj, name: string): unknown {
  if (name in o) return o[name];
  const lower = name.toLowerCase();
  for (const k of Object.keys(o)) if (k.toLowerCase() === lower) return o[k];
  return undefined;
}

function optionalString(m: Meta, o: Obj, name: string, path = `spec.${name}`): string {
  const v = field(o, name);
  if (v === undefined || v === null) return '';
  if (typeof v !== 'string') fail(m.label, `${path} must be a string`);
  return v;
}

function requiredString(m: Meta, o: Obj, name: string, path = `spec.${name}`): string {
  const v = optionalString(m, o, name, path);
  if (v === '') fail(m.label, `${path} is required`);
  return v;
}

function hash(value: unknown): string {
  return createHash('sha256').update(JSON.stringify(value)).digest('hex').slice(0, 16);
}

function secretRef(m: Meta, spec: Obj): SecretRef {
  const ref = field(spec, 'clientPassword');
  if (!isObject(ref)) fail(m.label, 'spec.clientPassword {name, namespace} is required');
  return {
    name: requiredString(m, ref, 'name', 'spec.clientPassword.name'),
    namespace: requiredString(m, ref, 'namespace', 'spec.clientPassword.namespace'),
  };
}

/**
 * spec.adEndpoint, the Entra ID authority host of a service principal (sovereign and other clouds), as NMI read
 * it: an https URL such as https://login.microsoftonline.us/, kept without its trailing slashes. Unset or empty:
 * --aad-authority-host. A user-assigned identity's is ignored, as NMI ignored it (IMDS knows its own cloud).
 */
function adEndpoint(m: Meta, spec: Obj): Pick<AzureIdentity, 'adEndpoint'> {
  const raw = optionalString(m, spec, 'adEndpoint').trim();
  if (raw === '') return {};
  let url: URL | undefined;
  try {
    url = new URL(raw);
  } catch {
    // said below
  }
  if (!url || url.protocol !== 'https:' || url.username || url.password || url.search || url.hash) {
    fail(m.label, 'spec.adEndpoint must be an https URL with no credentials, query or fragment (such as https://login.microsoftonline.us/)');
  }
  return { adEndpoint: urlBase(url) };
}

export function parseIdentity(raw: unknown, defaultNamespace = 'default'): AzureIdentity {
  const { meta: m, obj } = meta('AzureIdentity', raw, defaultNamespace);
  const spec = specOf(m, obj);
  const type = field(spec, 'type');
  const base = {
    name: m.name,
    namespace: m.namespace,
    clientID: optionalString(m, spec, 'clientID'),
    resourceID: optionalString(m, spec, 'resourceID'),
    tenantID: optionalString(m, spec, 'tenantID'),
    namespaced: m.annotations[BEHAVIOR_ANNOTATION] === BEHAVIOR_NAMESPACED,
  };
  let identity: Omit<AzureIdentity, 'version'>;
  switch (type) {
    case IdentityType.UserAssignedMSI:
      if (base.clientID === '' && base.resourceID === '') fail(m.label, 'type 0 needs spec.clientID or spec.resourceID');
      if (base.resourceID !== '' && !/^\/subscriptions\//i.test(base.resourceID)) {
        fail(m.label, 'spec.resourceID must be an ARM id starting with /subscriptions/');
      }
      identity = { ...base, type };
      break;
    case IdentityType.ServicePrincipal:
    case IdentityType.ServicePrincipalCertificate:
      requiredString(m, spec, 'tenantID');
      requiredString(m, spec, 'clientID');
      identity = { ...base, type, clientPassword: secretRef(m, spec), ...adEndpoint(m, spec) };
      break;
    case IdentityType.Federated:
      // The app's federated identity credentials trust the cluster's service accounts: no secret here.
      requiredString(m, spec, 'tenantID');
      requiredString(m, spec, 'clientID');
      identity = { ...base, type, ...adEndpoint(m, spec) };
      break;
    case undefined:
      fail(m.label, 'spec.type is required (0, 1, 2 or 3)');
    default:
      fail(m.label, `spec.type must be 0 (user-assigned MSI), 1 (service principal), 2 (service principal certificate) or 3 (federated, Workload ID)`);
  }
  // A content hash rather than resourceVersion: status-only updates do not
  // count as a change, and edited files without a resourceVersion still do.
  return { ...identity, version: hash(identity) };
}

export function parseBinding(raw: unknown, defaultNamespace = 'default'): AzureIdentityBinding {
  const { meta: m, obj } = meta('AzureIdentityBinding', raw, defaultNamespace);
  const spec = specOf(m, obj);
  const binding = {
    name: m.name,
    namespace: m.namespace,
    azureIdentity: requiredString(m, spec, 'azureIdentity'),
    selector: requiredString(m, spec, 'selector'),
  };
  return { ...binding, version: hash(binding) };
}

export function parseException(raw: unknown, defaultNamespace = 'default'): AzurePodIdentityException {
  const { meta: m, obj } = meta('AzurePodIdentityException', raw, defaultNamespace);
  const spec = specOf(m, obj);
  return { name: m.name, namespace: m.namespace, podLabels: stringMap(m.label, 'spec.podLabels', field(spec, 'podLabels')) };
}

const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

export function parseSecret(raw: unknown, defaultNamespace = 'default'): Secret {
  const { meta: m, obj } = meta('Secret', raw, defaultNamespace);
  const data: Record<string, string> = {};
  for (const [k, v] of Object.entries(stringMap(m.label, 'data', obj.data))) {
    if (!BASE64.test(v)) fail(m.label, `data.${k} is not valid base64`);
    data[k] = Buffer.from(v, 'base64').toString('utf8');
  }
  // As the API server does: stringData wins over data.
  Object.assign(data, stringMap(m.label, 'stringData', obj.stringData));
  return { name: m.name, namespace: m.namespace, data };
}

/** Microsoft Entra Workload ID's annotations on a service account, as its webhook reads them. */
export const WORKLOAD_CLIENT_ID = 'azure.workload.identity/client-id';
export const WORKLOAD_TENANT_ID = 'azure.workload.identity/tenant-id';

/** The name of the identity a Workload ID service account stands for: ':' is in no Kubernetes name, so it names no AzureIdentity. */
export function workloadIdentityName(serviceAccount: string): string {
  return `serviceaccount:${serviceAccount}`;
}

/** A v1 ServiceAccount, as much as Workload ID's convention needs; clientID '' when it is not annotated. */
export function parseServiceAccount(raw: unknown, defaultNamespace = 'default'): WorkloadServiceAccount {
  const { meta: m } = meta('ServiceAccount', raw, defaultNamespace);
  const account = {
    name: m.name,
    namespace: m.namespace,
    clientID: (m.annotations[WORKLOAD_CLIENT_ID] ?? '').trim(),
    tenantID: (m.annotations[WORKLOAD_TENANT_ID] ?? '').trim(),
  };
  return { ...account, version: hash(account) };
}

const parsers = {
  AzureIdentity: { apiVersion: CRD_API_VERSION, parse: parseIdentity },
  AzureIdentityBinding: { apiVersion: CRD_API_VERSION, parse: parseBinding },
  AzurePodIdentityException: { apiVersion: CRD_API_VERSION, parse: parseException },
  Secret: { apiVersion: 'v1', parse: parseSecret },
  ServiceAccount: { apiVersion: 'v1', parse: parseServiceAccount },
} as const;

/** One document of a bindings file: kind and apiVersion decide the parser. */
export function parseObject(raw: unknown, defaultNamespace = 'default'): ParsedObject {
  if (!isObject(raw)) fail('document', 'not an object');
  const kind = raw.kind;
  const name = isObject(raw.metadata) && typeof raw.metadata.name === 'string' ? ` ${raw.metadata.name}` : '';
  if (typeof kind !== 'string' || !Object.hasOwn(parsers, kind)) {
    fail(`${typeof kind === 'string' ? kind : 'object'}${name}`, `unsupported kind (want ${Object.keys(parsers).join(', ')})`);
  }
  const p = parsers[kind as keyof typeof parsers];
  if (raw.apiVersion !== p.apiVersion) fail(`${kind}${name}`, `apiVersion must be ${p.apiVersion}`);
  return { kind, value: p.parse(raw, defaultNamespace) } as ParsedObject;
}

/** Flattens `kind: List`, skips empty documents, reports duplicates as errors; never throws. */
export function parseObjects(raws: unknown[], defaultNamespace = 'default'): ParseResult {
  const result: ParseResult = { identities: [], bindings: [], exceptions: [], secrets: [], errors: [] };
  const seen = new Set<string>();
  const visit = (raw: unknown): void => {
    if (raw === null || raw === undefined) return;
    if (isObject(raw) && raw.kind === 'List') {
      if (!Array.isArray(raw.items)) {
        result.errors.push(new NmiError(codes.BINDINGS, 'List: items must be an array'));
        return;
      }
      raw.items.forEach(visit);
      return;
    }
    try {
      const parsed = parseObject(raw, defaultNamespace);
      const key = `${parsed.kind} ${objectKey(parsed.value.namespace, parsed.value.name)}`;
      if (seen.has(key)) throw new NmiError(codes.BINDINGS, `${key}: defined more than once`);
      seen.add(key);
      pushParsed(result, parsed);
    } catch (err) {
      result.errors.push(err instanceof NmiError ? err : new NmiError(codes.BINDINGS, String(err)));
    }
  };
  raws.forEach(visit);
  return result;
}

function pushParsed(set: BindingSet, parsed: ParsedObject): void {
  switch (parsed.kind) {
    case 'AzureIdentity':
      set.identities.push(parsed.value);
      break;
    case 'AzureIdentityBinding':
      set.bindings.push(parsed.value);
      break;
    case 'AzurePodIdentityException':
      set.exceptions.push(parsed.value);
      break;
    case 'Secret':
      set.secrets.push(parsed.value);
      break;
    case 'ServiceAccount':
      (set.serviceAccounts ??= []).push(parsed.value);
      break;
  }
}
