// What feeds the bindings store, in a module of its own so the sources
// (file-source.ts, kube-source.ts) and the store that chooses between them
// depend on it, not on each other.
import type { BindingSet } from './parse.js';

/** What the node's pods need a source to read beside the custom resources. A file holds its own. */
export interface NodeNeeds {
  /** Identities (`namespace/name`) bound to pods of this node: only their Secrets are read. */
  secrets: ReadonlySet<string>;
  /**
   * The ServiceAccounts (`namespace/name`) of this node's pods under Workload ID's convention, each with the
   * uids of those pods: a new pod has its account read again, so an annotation added before it started is seen.
   */
  serviceAccounts: ReadonlyMap<string, string>;
}

/** A bindings file or folder, or the API server. */
export interface BindingSource {
  /** Starts delivering complete sets (each replaces the last). Resolves once started, not once synced. */
  start(onSet: (set: BindingSet) => void): Promise<void>;
  stop(): void;
  /** What the node's pods need now: a source that reads Secrets and ServiceAccounts (the API server's) reads only these, and forgets the others. */
  need?(needs: NodeNeeds): void;
  /** Resolves once everything needed was tried and the set holding it delivered. */
  settled?(): Promise<void>;
}
