// Source address → live pod, rebuilt from the kubelet's pod list every
// --pod-refresh-interval and on demand when an unknown address calls. At most
// one kubelet call is in flight; everyone who needs fresh data waits on it.
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

  private byAddress = new Map<string, Pod>();
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
    await this.refreshSoon();
    return this.byAddress.get(address);
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
    this.apply(pods);
  }

  private apply(pods: Pod[]): void {
    const owners = new Map<string, Set<Pod>>();
    for (const pod of pods) {
      if (!isCaller(pod)) continue;
      for (const ip of pod.ips) {
        const set = owners.get(ip) ?? new Set<Pod>();
        set.add(pod);
        owners.set(ip, set);
      }
    }
    const byAddress = new Map<string, Pod>();
    const conflicts: string[] = [];
    for (const [ip, set] of owners) {
      const [only] = set;
      if (set.size === 1 && only) byAddress.set(ip, only);
      else conflicts.push(`${ip}: ${[...set].map(podName).sort().join(', ')}`);
    }
    this.byAddress = byAddress;
    this.byUid = new Map(pods.filter(isLive).map((p) => [p.uid, p]));
    this.indexedPods = new Set(byAddress.values()).size;
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
