// Source address → live pod, rebuilt from the kubelet's pod list every
// --pod-refresh-interval and on demand when an unknown address calls. At most
// one kubelet call is in flight; everyone who needs fresh data waits on it.
//
// An address can change hands between two lists: a deleted pod's is freed and
// given to a new pod, which would be answered as the old one until the next
// list. So an address whose pod is terminating (deletionTimestamp set), or whose
// pod is not the one the previous list named, is not served from the index: its
// caller waits for a kubelet list made after it asked, and is served as that list
// names it. Every other known address stays one map lookup.
import { codes, NmiError, messageOf } from '../errors/errors.js';
import type { Logger } from '../log/logger.js';
import { SpacedRefresh } from '../util/spaced-refresh.js';
import type { CallerLookup, Pod } from './pod.js';

export const refreshReasons = ['start', 'interval', 'unknown-caller'] as const;
export type RefreshReason = (typeof refreshReasons)[number];

export interface PodIndexOptions {
  fetchPods: () => Promise<Pod[]>;
  refreshIntervalMs: number;
  /** At most one refresh triggered by unknown callers per this gap; within it they are answered from the index. */
  minRefreshGapMs?: number;
  log: Logger;
  /** Called with every pod the kubelet listed, after a sync that changed them. */
  onChange?: (pods: Pod[]) => void;
}

const defaults = {
  minRefreshGapMs: 1_000, // 1 second: bounds kubelet load from pods that are not in the index
};

/** A pod that runs or is about to; a finished pod's address or cgroup may already be a new one's. */
function isLive(pod: Pod): boolean {
  return pod.phase === 'Pending' || pod.phase === 'Running';
}

/** Only these pods can be callers by address. */
export function isCaller(pod: Pod): boolean {
  return !pod.hostNetwork && isLive(pod);
}

/** Being deleted: still a caller, but only once a fresh kubelet list says its address is still its own. */
export function isTerminating(pod: Pod): boolean {
  return pod.deletingSince !== undefined;
}

/** A socket on a dual-stack listener reports IPv4 peers as `::ffff:a.b.c.d`; the kubelet lists `a.b.c.d`. */
export function plainAddress(ip: string): string {
  return ip.startsWith('::ffff:') && ip.includes('.') ? ip.slice('::ffff:'.length) : ip;
}

function podName(pod: Pod): string {
  return `${pod.namespace}/${pod.name}`;
}

export class PodIndex implements CallerLookup {
  /** Kubelet calls made, by what asked for them. */
  readonly refreshes: Record<RefreshReason, number> = { start: 0, interval: 0, 'unknown-caller': 0 };
  /** Kubelet calls that failed. */
  failures = 0;
  /** Wall-clock ms of the last successful sync. */
  lastSuccessAt: number | undefined;

  private readonly fetchPods: () => Promise<Pod[]>;
  private readonly refreshIntervalMs: number;
  private readonly log: Logger;
  private readonly onChange: ((pods: Pod[]) => void) | undefined;

  /** Addresses served at once: one live pod, not terminating, the same pod as in the list before. */
  private byAddress = new Map<string, Pod>();
  /** Addresses served only after a list made since the request: a terminating pod's, or one that changed pods. */
  private recheck = new Map<string, Pod>();
  /** Each address's pod (uid) when last listed, kept for a refresh interval: to see an address change hands. */
  private lastOwners = new Map<string, { uid: string; at: number }>();
  /** Kubelet calls started, and the number of the last that succeeded: a list is fresh for a request when made after it. */
  private syncsStarted = 0;
  private freshest = 0;
  /** Live pods (Pending/Running) by UID, hostNetwork ones too: the eBPF backend attests callers by cgroup. */
  private byUid = new Map<string, Pod>();
  private listed: readonly Pod[] = [];
  private indexedPods = 0;
  private listedFingerprint = '';
  private conflictsLogged = '';
  private failingSince = 0;
  private inflight: Promise<void> | undefined;
  /** Refreshes for unknown callers: one per minRefreshGapMs, shared by every caller who waited. */
  private readonly unknownCaller: SpacedRefresh;
  private timer: NodeJS.Timeout | undefined;

  constructor({ fetchPods, refreshIntervalMs, minRefreshGapMs = defaults.minRefreshGapMs, log, onChange }: PodIndexOptions) {
    if (!(refreshIntervalMs > 0)) throw new NmiError(codes.KUBELET, `pod index refreshIntervalMs must be positive, got ${refreshIntervalMs}`);
    this.fetchPods = fetchPods;
    this.refreshIntervalMs = refreshIntervalMs;
    this.unknownCaller = new SpacedRefresh(minRefreshGapMs, () => this.refresh('unknown-caller').catch(() => {}));
    this.log = log;
    this.onChange = onChange;
  }

  /** True once one sync has succeeded; stays true while the kubelet is down (the last index is kept). */
  get ready(): boolean {
    return this.lastSuccessAt !== undefined;
  }

  /** Live pods findable by at least one address. */
  get size(): number {
    return this.indexedPods;
  }

  /** Every pod of the last successful sync, callers or not. */
  pods(): readonly Pod[] {
    return this.listed;
  }

  /** Starts the background poll, then the first sync. Throws the kubelet error if the first sync fails; the poll goes on. */
  async start(): Promise<void> {
    this.timer ??= setInterval(() => void this.refresh('interval').catch(() => {}), this.refreshIntervalMs);
    // The servers keep the daemon alive; a forgotten poll must not.
    this.timer.unref();
    await this.refresh('start');
  }

  stop(): void {
    clearInterval(this.timer);
    this.timer = undefined;
  }

  known(ip: string): Pod | undefined {
    return this.byAddress.get(plainAddress(ip));
  }

  knownUid(uid: string): Pod | undefined {
    return this.byUid.get(uid);
  }

  /** The live pod with this UID, after at most one coalesced refresh (shared with unknown addresses). */
  async lookupUid(uid: string): Promise<Pod | undefined> {
    const known = this.byUid.get(uid);
    if (known) return known;
    await this.refreshSoon();
    return this.byUid.get(uid);
  }

  /** The live pod (hostNetwork ones too) with this name, after at most one coalesced refresh: /host/token names pods. */
  async lookupName(namespace: string, name: string): Promise<Pod | undefined> {
    const find = () => this.listed.find((p) => p.namespace === namespace && p.name === name && isLive(p));
    const known = find();
    if (known) return known;
    await this.refreshSoon();
    return find();
  }

  async lookup(ip: string): Promise<Pod | undefined> {
    const address = plainAddress(ip);
    const known = this.byAddress.get(address);
    if (known) return known;
    const asked = this.syncsStarted;
    if (!this.recheck.has(address)) {
      await this.refreshSoon();
      const found = this.byAddress.get(address);
      if (found || !this.recheck.has(address)) return found;
    }
    return this.lookupFresh(address, asked);
  }

  /**
   * The pod that a kubelet list started after call number `asked` names for the address; undefined when the
   * kubelet does not answer. A call in flight when the request came may predate it: then one more, spaced as
   * unknown callers' are.
   */
  private async lookupFresh(address: string, asked: number): Promise<Pod | undefined> {
    for (let calls = 0; calls < 2 && this.freshest <= asked; calls++) await this.refreshSoon();
    if (this.freshest <= asked) return undefined;
    return this.byAddress.get(address) ?? this.recheck.get(address);
  }

  /**
   * Joins the kubelet call in flight, or makes one. Within minRefreshGapMs of the
   * last such call it waits for the gap to end and then makes one call shared by
   * every caller that waited: a new pod is answered late, never refused.
   */
  refreshSoon(): Promise<void> {
    // A failed refresh was counted and logged; the caller gets the last good index.
    if (this.inflight) return this.inflight.catch(() => {});
    return this.unknownCaller.request();
  }

  /** Joins the kubelet call in flight, or makes one; rejects with the kubelet error. */
  refresh(reason: RefreshReason): Promise<void> {
    if (!this.inflight) {
      this.refreshes[reason] += 1;
      this.inflight = this.sync(reason).finally(() => {
        this.inflight = undefined;
      });
    }
    return this.inflight;
  }

  private async sync(reason: RefreshReason): Promise<void> {
    const number = ++this.syncsStarted;
    let pods: Pod[];
    try {
      pods = await this.fetchPods();
    } catch (err) {
      this.failures += 1;
      this.failingSince += 1;
      // Once per outage at error level: an outage would otherwise log every interval and every unknown caller.
      const level = this.failingSince === 1 ? 'error' : 'debug';
      this.log[level]({ err: messageOf(err), code: (err as { code?: string }).code, reason, consecutiveFailures: this.failingSince }, 'kubelet pod refresh failed; keeping the last pod index');
      throw err;
    }
    if (this.failingSince > 0) this.log.info({ failedRefreshes: this.failingSince, pods: pods.length }, 'kubelet pod refresh recovered');
    this.failingSince = 0;
    this.lastSuccessAt = Date.now();
    this.freshest = number;
    this.apply(pods);
  }

  private apply(pods: Pod[]): void {
    // A terminating pod's address counts only where no other live pod claims it: the network gives an
    // address to a new pod once the old one's sandbox is gone, whatever the list still says of the old pod.
    const owners = new Map<string, Set<Pod>>();
    const leaving = new Map<string, Set<Pod>>();
    for (const pod of pods) {
      if (!isCaller(pod)) continue;
      const into = isTerminating(pod) ? leaving : owners;
      for (const ip of pod.ips) into.set(ip, (into.get(ip) ?? new Set<Pod>()).add(pod));
    }
    for (const [ip, set] of leaving) if (!owners.has(ip)) owners.set(ip, set);
    const byAddress = new Map<string, Pod>();
    const recheck = new Map<string, Pod>();
    const now = Date.now();
    const lastOwners = new Map([...this.lastOwners].filter(([, seen]) => now - seen.at < this.refreshIntervalMs));
    const conflicts: string[] = [];
    for (const [ip, set] of owners) {
      const [only] = set;
      if (set.size !== 1 || !only) {
        conflicts.push(`${ip}: ${[...set].map(podName).sort().join(', ')}`);
        continue;
      }
      const before = lastOwners.get(ip);
      lastOwners.set(ip, { uid: only.uid, at: now });
      if (isTerminating(only) || (before !== undefined && before.uid !== only.uid)) recheck.set(ip, only);
      else byAddress.set(ip, only);
    }
    this.byAddress = byAddress;
    this.recheck = recheck;
    this.lastOwners = lastOwners;
    this.byUid = new Map(pods.filter(isLive).map((p) => [p.uid, p]));
    this.indexedPods = new Set([...byAddress.values(), ...recheck.values()]).size;
    this.listed = pods;
    this.reportConflicts(conflicts.sort());
    this.notifyIfChanged(pods);
  }

  /** An address two live pods claim answers nobody: guessing would hand one pod the other's identity. */
  private reportConflicts(conflicts: string[]): void {
    const key = conflicts.join('; ');
    if (key === this.conflictsLogged) return;
    if (conflicts.length > 0) this.log.warn({ conflicts }, 'several live pods claim one address; it answers no caller until that is resolved');
    else this.log.info('pod address conflicts resolved');
    this.conflictsLogged = key;
  }

  private notifyIfChanged(pods: Pod[]): void {
    if (!this.onChange) return;
    const fingerprint = JSON.stringify(pods);
    if (fingerprint === this.listedFingerprint) return;
    this.listedFingerprint = fingerprint;
    try {
      this.onChange(pods);
    } catch (err) {
      this.log.error({ err: messageOf(err) }, 'pod change listener failed');
    }
  }
}
