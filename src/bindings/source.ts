// What feeds the bindings store, in a module of its own so the sources
// (file-source.ts, kube-source.ts) and the store that chooses between them
// depend on it, not on each other.
import type { BindingSet } from './parse.js';

/** A bindings file or folder, or the API server. */
export interface BindingSource {
  /** Starts delivering complete sets (each replaces the last). Resolves once started, not once synced. */
  start(onSet: (set: BindingSet) => void): Promise<void>;
  stop(): void;
}
