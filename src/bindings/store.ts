// The current bindings, as one immutable indexed snapshot swapped on every update
// from a source (a file or the API server). Emits 'change' with the identity keys
// whose identity, binding or secret changed, so cached tokens for them can go.
import { EventEmitter } from 'node:events';
import type { Logger } from '../log/logger.js';
import type { AzureIdentity, AzureIdentityBinding, AzurePodIdentityException, Secret, WorkloadServiceAccount } from './model.js';
import { objectKey } from '../kube/object-key.js';
import { workloadIdentityName, type BindingSet } from './parse.js';
import { FileBindingSource } from './file-source.js';
import { KubeBindingSource } from './kube-source.js';
import type { BindingSource, NodeNeeds } from './source.js';

export interface BindingSnapshot {
  /** All maps keyed by namespace/name. */
  readonly identities: ReadonlyMap<string, AzureIdentity>;
  readonly bindings: ReadonlyMap<string, AzureIdentityBinding>;
  readonly exceptions: ReadonlyMap<string, AzurePodIdentityException>;
  readonly secrets: ReadonlyMap<string, Secret>;
  /** Service accounts annotated with a Workload ID client id. */
  readonly serviceAccounts: ReadonlyMap<string, WorkloadServiceAccount>;
  /** Bindings by spec.selector, so a request never scans them all. Sorted by key for a stable order. */
  readonly bindingsBySelector: ReadonlyMap<string, readonly AzureIdentityBinding[]>;
  /** Exceptions by namespace, so a request never scans them all; which apply is match.ts's. */
  readonly exceptionsByNamespace: ReadonlyMap<string, readonly AzurePodIdentityException[]>;
  /** Objects the source left out as invalid, by "Kind namespace/name", with why. */
  readonly invalid: ReadonlyMap<string, string>;
}

function byKey<T extends { namespace: string; name: string }>(items: T[]): Map<string, T> {
  return new Map(items.map((i) => [objectKey(i.namespace, i.name), i]));
}

function groupBy<T>(items: Iterable<T>, keyOf: (item: T) => string): Map<string, T[]> {
  const out = new Map<string, T[]>();
  for (const item of items) {
    const k = keyOf(item);
    const list = out.get(k);
    if (list) list.push(item);
    else out.set(k, [item]);
  }
  return out;
}

export function createSnapshot(set: BindingSet): BindingSnapshot {
  const bindings = byKey(set.bindings);
  const exceptions = byKey(set.exceptions);
  const sorted = [...bindings.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)).map(([, b]) => b);
  return {
    identities: byKey(set.identities),
    bindings,
    exceptions,
    secrets: byKey(set.secrets),
    serviceAccounts: byKey((set.serviceAccounts ?? []).filter((a) => a.clientID !== '')),
    bindingsBySelector: groupBy(sorted, (b) => b.selector),
    exceptionsByNamespace: groupBy(exceptions.values(), (e) => e.namespace),
    invalid: set.invalid ?? new Map(),
  };
}

export const emptySnapshot: BindingSnapshot = createSnapshot({ identities: [], bindings: [], exceptions: [], secrets: [] });

function sameSecret(a: Secret, b: Secret): boolean {
  const ak = Object.keys(a.data);
  return ak.length === Object.keys(b.data).length && ak.every((k) => a.data[k] === b.data[k]);
}

function changedKeys<T>(prev: ReadonlyMap<string, T>, next: ReadonlyMap<string, T>, same: (a: T, b: T) => boolean): T[] {
  const out: T[] = [];
  for (const [k, a] of prev) {
    const b = next.get(k);
    if (b === undefined || !same(a, b)) out.push(a);
  }
  for (const [k, b] of next) {
    const a = prev.get(k);
    if (a === undefined || !same(a, b)) out.push(b);
  }
  return out;
}

/** Identity keys (namespace/name) that a token cache must forget between two snapshots. */
export function changedIdentities(prev: BindingSnapshot, next: BindingSnapshot): Set<string> {
  const keys = new Set<string>();
  const sameVersion = (a: { version: string }, b: { version: string }): boolean => a.version === b.version;
  for (const id of changedKeys(prev.identities, next.identities, sameVersion)) keys.add(objectKey(id.namespace, id.name));
  // A binding names an identity in its own namespace.
  for (const b of changedKeys(prev.bindings, next.bindings, sameVersion)) keys.add(objectKey(b.namespace, b.azureIdentity));
  // A Workload ID service account stands for the identity its pods are served (bindings/match.ts).
  for (const a of changedKeys(prev.serviceAccounts, next.serviceAccounts, sameVersion)) keys.add(objectKey(a.namespace, workloadIdentityName(a.name)));
  const secrets = new Set(changedKeys(prev.secrets, next.secrets, sameSecret).map((s) => objectKey(s.namespace, s.name)));
  if (secrets.size > 0) {
    for (const id of [...prev.identities.values(), ...next.identities.values()]) {
      const ref = id.clientPassword;
      if (ref && secrets.has(objectKey(ref.namespace, ref.name))) keys.add(objectKey(id.namespace, id.name));
    }
  }
  return keys;
}

interface StoreEvents {
  change: [keys: Set<string>];
  /** Every applied set, after any 'change': what an exception-only edit announces. */
  update: [];
  ready: [];
}

export class BindingStore extends EventEmitter<StoreEvents> {
  #snapshot: BindingSnapshot = emptySnapshot;
  #ready = false;
  #updates = 0;
  readonly #source: BindingSource;
  readonly #log: Logger;

  constructor(source: BindingSource, log: Logger) {
    super();
    this.#source = source;
    this.#log = log;
  }

  get snapshot(): BindingSnapshot {
    return this.#snapshot;
  }

  /** True once the source delivered its first complete set. */
  get ready(): boolean {
    return this.#ready;
  }

  /** Sets applied so far (for metrics). */
  get updates(): number {
    return this.#updates;
  }

  start(): Promise<void> {
    return this.#source.start((set) => this.#apply(set));
  }

  stop(): void {
    this.#source.stop();
  }

  /** What this node's pods need read (see BindingSource.need). */
  need(needs: NodeNeeds): void {
    this.#source.need?.(needs);
  }

  /** Resolves once everything needed was tried and is in the snapshot (or known missing). */
  settled(): Promise<void> {
    return this.#source.settled?.() ?? Promise.resolve();
  }

  whenReady(): Promise<void> {
    if (this.#ready) return Promise.resolve();
    return new Promise((resolve) => this.once('ready', resolve));
  }

  #apply(set: BindingSet): void {
    const next = createSnapshot(set);
    const keys = changedIdentities(this.#snapshot, next);
    this.#snapshot = next;
    this.#updates++;
    if (!this.#ready) {
      this.#ready = true;
      this.#log.info(
        { identities: next.identities.size, bindings: next.bindings.size, exceptions: next.exceptions.size, secrets: next.secrets.size },
        'bindings synced',
      );
      this.emit('ready');
    } else if (keys.size > 0) {
      this.#log.debug({ identities: [...keys] }, 'bindings changed');
    }
    if (keys.size > 0) this.emit('change', keys);
    this.emit('update');
  }
}

export interface BindingsConfig {
  /** "kubernetes", or a path to a YAML/JSON file or folder. */
  bindings: string;
  kubeconfig?: string;
  nodeName?: string;
  crossNamespaceSecrets?: boolean;
}

/** Chooses the source the --bindings flag names. Throws UsageError when the API server config cannot be read. */
export async function createBindingSource(config: BindingsConfig, log: Logger): Promise<BindingSource> {
  if (config.bindings === 'kubernetes') {
    return new KubeBindingSource(log, { kubeconfig: config.kubeconfig, nodeName: config.nodeName, crossNamespaceSecrets: config.crossNamespaceSecrets });
  }
  return new FileBindingSource(config.bindings, log);
}
