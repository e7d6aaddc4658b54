// What nmi refused each pod of this node lately: `nmi explain` shows it, and
// the refusals an operator must act on become Events on the pod. Bounded: a few
// distinct refusals per live pod (a repeat counts, it adds nothing), and a few
// hundred addresses no pod owned when they called.
import { isCaller } from '../kubelet/pod-index.js';
import type { Pod } from '../kubelet/pod.js';
import { problems } from '../server/answers.js';
import type { RefusalDetail, RefusalKind, RefusalSink } from '../server/refusal.js';

export interface Refusal extends RefusalDetail {
  kind: RefusalKind;
  /** Wall-clock ms of the first and the latest time it was answered. */
  firstAt: number;
  lastAt: number;
  count: number;
}

/** Told every refusal of a pod as it is recorded; `refusal.count` says how many times it came. */
export type RefusalListener = (pod: Pod, refusal: Refusal) => void;

const limits = {
  perPod: 10,
  addresses: 256,
  /** A pod the kubelet lists this long after its address was refused is not the one that called. */
  addressMemoryMs: 10 * 60_000,
};

type Unknown = Omit<Refusal, keyof RefusalDetail | 'kind'>;

export class RecentRefusals implements RefusalSink {
  /** By pod uid, most recent last. */
  readonly #byPod = new Map<string, Refusal[]>();
  /** By address, oldest first. */
  readonly #unknown = new Map<string, Unknown>();
  readonly #listeners: RefusalListener[] = [];
  readonly #now: () => number;

  constructor(now: () => number = Date.now) {
    this.#now = now;
  }

  listen(listener: RefusalListener): void {
    this.#listeners.push(listener);
  }

  refused(pod: Pod, kind: RefusalKind, detail: RefusalDetail): void {
    const at = this.#now();
    this.#add(pod, { ...detail, kind, firstAt: at, lastAt: at, count: 1 });
  }

  unknownCaller(address: string): void {
    const at = this.#now();
    const seen = this.#unknown.get(address);
    this.#unknown.delete(address);
    this.#unknown.set(address, seen ? { ...seen, lastAt: at, count: seen.count + 1 } : { firstAt: at, lastAt: at, count: 1 });
    if (this.#unknown.size > limits.addresses) this.#unknown.delete(this.#unknown.keys().next().value!);
  }

  /**
   * After a kubelet sync: a live pod now listed with an address refused as unknown lately gets those
   * refusals (it called before the kubelet listed it); pods gone take their refusals with them.
   */
  podsListed(pods: readonly Pod[]): void {
    const now = this.#now();
    for (const [address, seen] of this.#unknown) {
      if (now - seen.lastAt > limits.addressMemoryMs) this.#unknown.delete(address);
    }
    const live = new Set<string>();
    for (const pod of pods) {
      if (!isCaller(pod)) continue;
      live.add(pod.uid);
      for (const address of pod.ips) {
        const seen = this.#unknown.get(address);
        if (!seen) continue;
        this.#unknown.delete(address);
        this.#add(pod, unknownCallerRefusal(seen));
      }
    }
    for (const uid of this.#byPod.keys()) if (!live.has(uid)) this.#byPod.delete(uid);
  }

  forPod(uid: string): readonly Refusal[] {
    return this.#byPod.get(uid) ?? [];
  }

  /** Refusals of an address no pod owned, if it called lately. */
  forAddress(address: string): Refusal | undefined {
    const seen = this.#unknown.get(address);
    if (!seen) return undefined;
    return unknownCallerRefusal(seen);
  }

  #add(pod: Pod, refusal: Refusal): void {
    const list = this.#byPod.get(pod.uid) ?? [];
    const same = list.findIndex((r) => sameRefusal(r, refusal));
    let recorded = refusal;
    if (same >= 0) {
      const [seen] = list.splice(same, 1);
      recorded = { ...refusal, firstAt: seen!.firstAt, count: seen!.count + refusal.count };
    }
    list.push(recorded);
    if (list.length > limits.perPod) list.shift();
    this.#byPod.set(pod.uid, list);
    for (const listener of this.#listeners) listener(pod, recorded);
  }
}

function sameRefusal(a: Refusal, b: Refusal): boolean {
  return a.kind === b.kind && a.status === b.status && a.error === b.error && a.identity === b.identity && a.resource === b.resource;
}

/** An address's refusals as the 404 step 6 answered them. */
function unknownCallerRefusal(seen: Unknown): Refusal {
  const { status, error, error_description } = problems.unknownCaller;
  return { kind: 'unknown-caller', status, error, error_description, ...seen };
}
