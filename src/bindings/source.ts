// What feeds the bindings store, in a module of its own so the sources
// (file-source.ts, kube-source.ts) and the store that chooses between them
// depend on it, not on each other.
import type { BindingSet } from './parse.js';

/** A bindings file or folder, or the API server. */
export interface BindingSource {
  /** Starts delivering complete sets (each replaces the last). Resolves once started, not once synced. */
  start(onSet: (set: BindingSet) => void): Promise<void>;
  stop(): void;
  /**
   * The identities (`namespace/name`) whose Secrets are wanted: those bound to pods of this node. A source that
   * fetches Secrets (the API server's) reads only these, and forgets the others'. A file holds its own.
   */
  needSecrets?(identityNames: ReadonlySet<string>): void;
  /** Resolves once every wanted Secret was tried and the set holding them delivered. */
  secretsSettled?(): Promise<void>;
}
