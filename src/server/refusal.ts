// What the token core reports when it refuses a pod: the kinds of refusal and
// their detail. explain/refusals.ts keeps them for `nmi explain` and the pod's Events.
import type { Pod } from '../kubelet/pod.js';

export type RefusalKind =
  | 'no-identity'
  | 'several-identities'
  | 'identity-unusable'
  | 'budget'
  | 'upstream-refused'
  | 'upstream-unavailable'
  | 'unknown-caller'
  | 'spoof'
  | 'unattested';

/** What the pod was answered, and about what (never a token or secret). */
export interface RefusalDetail {
  status: number;
  error: string;
  error_description: string;
  identity?: string;
  resource?: string;
  /** For the operator: what nmi found wrong (a Secret missing, a budget bound), never a value. */
  cause?: string;
}

/** How the token core reports what it refused. */
export interface RefusalSink {
  refused(pod: Pod, kind: RefusalKind, detail: RefusalDetail): void;
  /** A request from an address no live pod of this node owned, after the kubelet was asked again. */
  unknownCaller(address: string): void;
}
