// Kubernetes Events (events.k8s.io/v1) on the pods nmi refuses, so that
// `kubectl describe pod` says why. Recorded as client-go's events recorder does
// it, never one API call per request:
// - the first occurrence creates an Event; an isomorphic one (same pod, reason
//   and note) within seriesWindowMs of the last joins its series, whose count and
//   lastObservedTime are patched at most once per seriesUpdateMs;
// - new Events per pod go through a token bucket (the kubelet's spam filter: a
//   burst of 25, then one per 5 minutes);
// - every API call of the node (creates and series updates) through another: a
//   burst of 50, then one per 2 s, so a node whose every pod is refused stays a
//   trickle at the API server (5,000 such nodes: 2,500 calls a second at most);
// - one API call at a time, at most maxQueued waiting; past that they are dropped
//   and counted. A failing API server costs a log line per failure kind, not a retry loop.
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import type { KubeClient } from '../kube/client.js';
import type { Pod } from '../kubelet/pod.js';
import type { Logger } from '../log/logger.js';
import { LogLimiter } from '../util/log-limiter.js';
import { messageOf } from '../errors/errors.js';

export interface PodEvent {
  /** UpperCamelCase, what `kubectl describe` shows as Reason. */
  reason: string;
  /** What happened, for a person; at most 1 kB (the API's limit). */
  note: string;
  /** What nmi was doing. */
  action: string;
}

export const eventResults = ['created', 'updated', 'dropped', 'failed'] as const;
export type EventResult = (typeof eventResults)[number];

export interface PodEventsOptions {
  client: Pick<KubeClient, 'create' | 'mergePatch'>;
  /** The node's name: each nmi reports as its own instance. */
  nodeName: string;
  log: Logger;
  now?: () => number;
  seriesWindowMs?: number;
  seriesUpdateMs?: number;
  burst?: number;
  refillMs?: number;
  nodeBurst?: number;
  nodeRefillMs?: number;
  maxQueued?: number;
}

const defaults = {
  // client-go's tools/events: isomorphic events within 6 minutes form a series.
  seriesWindowMs: 6 * 60_000,
  // client-go waits 30 minutes between series updates; 30 s lets `kubectl describe` count while someone looks.
  seriesUpdateMs: 30_000,
  burst: 25,
  refillMs: 5 * 60_000,
  nodeBurst: 50,
  nodeRefillMs: 2_000,
  maxQueued: 100,
};

export const REPORTING_CONTROLLER = 'aadpodidentity.k8s.io/nmi';
const API = '/apis/events.k8s.io/v1';
const NOTE_MAX = 1024;

interface Series {
  readonly key: string;
  readonly pod: Pod;
  readonly event: PodEvent;
  /** The Event object's name; set once its create succeeded. */
  name: string | undefined;
  failed: boolean;
  count: number;
  lastObservedMs: number;
  /** The count the API server last got, and when. */
  sentCount: number;
  sentAtMs: number;
  timer: NodeJS.Timeout | undefined;
  /** An update is due, queued or in flight: from its timer until its answer, no other is scheduled. */
  updating: boolean;
}

/** `burst` tokens, one back every refillMs. */
class Bucket {
  #tokens: number;
  #atMs: number;
  constructor(
    private readonly burst: number,
    private readonly refillMs: number,
    now: number,
  ) {
    this.#tokens = burst;
    this.#atMs = now;
  }

  /** 0 when a token was there (and is taken), else how long until one is. */
  take(now: number): number {
    const refilled = Math.floor((now - this.#atMs) / this.refillMs);
    if (refilled > 0) {
      this.#tokens = Math.min(this.burst, this.#tokens + refilled);
      this.#atMs += refilled * this.refillMs;
    }
    if (this.#tokens < 1) return this.#atMs + this.refillMs - now;
    this.#tokens -= 1;
    return 0;
  }
}

/** MicroTime: RFC 3339 with microseconds. */
function microTime(ms: number): string {
  return new Date(ms).toISOString().replace(/\.(\d{3})Z$/, '.$1000Z');
}

export class PodEvents {
  readonly counts: Record<EventResult, number> = { created: 0, updated: 0, dropped: 0, failed: 0 };
  readonly #client: PodEventsOptions['client'];
  readonly #instance: string;
  readonly #log: Logger;
  readonly #now: () => number;
  readonly #o: typeof defaults;
  readonly #series = new Map<string, Series>();
  /** Per pod uid: its new Events. */
  readonly #buckets = new Map<string, Bucket>();
  /** The node's API calls. */
  readonly #calls: Bucket;
  readonly #queue: Array<() => Promise<void>> = [];
  #running = false;
  readonly #abort = new AbortController();
  readonly #said = new LogLimiter(10 * 60_000);

  constructor(options: PodEventsOptions) {
    this.#client = options.client;
    this.#instance = `nmi-${options.nodeName}`.slice(0, 128);
    this.#log = options.log;
    this.#now = options.now ?? Date.now;
    this.#o = {
      seriesWindowMs: options.seriesWindowMs ?? defaults.seriesWindowMs,
      seriesUpdateMs: options.seriesUpdateMs ?? defaults.seriesUpdateMs,
      burst: options.burst ?? defaults.burst,
      refillMs: options.refillMs ?? defaults.refillMs,
      nodeBurst: options.nodeBurst ?? defaults.nodeBurst,
      nodeRefillMs: options.nodeRefillMs ?? defaults.nodeRefillMs,
      maxQueued: options.maxQueued ?? defaults.maxQueued,
    };
    this.#calls = new Bucket(this.#o.nodeBurst, this.#o.nodeRefillMs, this.#now());
  }

  record(pod: Pod, event: PodEvent): void {
    if (this.#abort.signal.aborted || !pod.uid) return;
    const now = this.#now();
    const key = `${pod.uid}\n${event.reason}\n${event.note}`;
    const series = this.#series.get(key);
    if (series && now - series.lastObservedMs < this.#o.seriesWindowMs) {
      series.count += 1;
      series.lastObservedMs = now;
      this.#scheduleUpdate(series);
      return;
    }
    if (series) this.#forget(key, series);
    const bucket = this.#buckets.get(pod.uid) ?? new Bucket(this.#o.burst, this.#o.refillMs, now);
    this.#buckets.set(pod.uid, bucket);
    if (bucket.take(now) > 0) {
      this.counts.dropped += 1;
      return;
    }
    const fresh: Series = { key, pod, event, name: undefined, failed: false, count: 1, lastObservedMs: now, sentCount: 1, sentAtMs: now, timer: undefined, updating: false };
    this.#series.set(key, fresh);
    this.#enqueue(() => this.#create(fresh));
  }

  /** Forgets pods the kubelet no longer lists. */
  retain(podUids: Iterable<string>): void {
    const keep = new Set(podUids);
    for (const [key, series] of this.#series) if (!keep.has(series.pod.uid)) this.#forget(key, series);
    for (const uid of this.#buckets.keys()) if (!keep.has(uid)) this.#buckets.delete(uid);
  }

  stop(): void {
    this.#abort.abort();
    for (const [key, series] of this.#series) this.#forget(key, series);
    this.#queue.length = 0;
  }

  #forget(key: string, series: Series): void {
    clearTimeout(series.timer);
    this.#series.delete(key);
  }

  #scheduleUpdate(series: Series): void {
    // One update at a time per series: what comes meanwhile is sent by the next, seriesUpdateMs after this one.
    if (series.updating || series.failed) return;
    series.updating = true;
    const wait = Math.max(0, series.sentAtMs + this.#o.seriesUpdateMs - this.#now());
    // The first repeat goes at once, as client-go sends it; later ones wait their turn.
    const due = series.sentCount === 1 ? 0 : wait;
    series.timer = setTimeout(() => {
      series.timer = undefined;
      if (!this.#enqueue(() => this.#update(series))) series.updating = false;
    }, due);
    series.timer.unref();
  }

  /** False when the queue is full and the call was dropped. */
  #enqueue(call: () => Promise<void>): boolean {
    if (this.#queue.length >= this.#o.maxQueued) {
      this.counts.dropped += 1;
      return false;
    }
    this.#queue.push(call);
    if (!this.#running) void this.#drain();
    return true;
  }

  async #drain(): Promise<void> {
    this.#running = true;
    for (let call = this.#queue.shift(); call; call = this.#queue.shift()) {
      // The node's share of the API server: a call waits its turn, and what comes meanwhile queues (or is dropped).
      for (let wait = this.#calls.take(this.#now()); wait > 0; wait = this.#calls.take(this.#now())) {
        await sleep(wait, undefined, { signal: this.#abort.signal }).catch(() => undefined);
        if (this.#abort.signal.aborted) break;
      }
      if (this.#abort.signal.aborted) break;
      await call();
    }
    this.#running = false;
  }

  async #create(series: Series): Promise<void> {
    const { pod, event } = series;
    // As client-go names them: the object's name and a hex timestamp, here with random bits so two nodes never collide.
    const name = `${pod.name}.${(BigInt(series.lastObservedMs) * 1_000_000n).toString(16)}${randomBytes(2).toString('hex')}`.slice(0, 253);
    const body = {
      apiVersion: 'events.k8s.io/v1',
      kind: 'Event',
      metadata: { name, namespace: pod.namespace },
      eventTime: microTime(series.lastObservedMs),
      reportingController: REPORTING_CONTROLLER,
      reportingInstance: this.#instance,
      action: event.action,
      reason: event.reason,
      note: event.note.length > NOTE_MAX ? `${event.note.slice(0, NOTE_MAX - 3)}...` : event.note,
      type: 'Warning',
      regarding: { apiVersion: 'v1', kind: 'Pod', namespace: pod.namespace, name: pod.name, uid: pod.uid },
    };
    try {
      await this.#client.create(`${API}/namespaces/${encodeURIComponent(pod.namespace)}/events`, body, this.#abort.signal);
      series.name = name;
      this.counts.created += 1;
      // Occurrences that came while it was being created.
      if (series.count > series.sentCount) this.#scheduleUpdate(series);
    } catch (err) {
      series.failed = true;
      this.#failed('create', err);
    }
  }

  async #update(series: Series): Promise<void> {
    try {
      if (!series.name || series.count === series.sentCount || this.#series.get(series.key) !== series) return;
      const count = series.count;
      const patch = { series: { count, lastObservedTime: microTime(series.lastObservedMs) } };
      await this.#client.mergePatch(`${API}/namespaces/${encodeURIComponent(series.pod.namespace)}/events/${encodeURIComponent(series.name)}`, patch, this.#abort.signal);
      series.sentCount = count;
      series.sentAtMs = this.#now();
      this.counts.updated += 1;
    } catch (err) {
      series.failed = true;
      this.#failed('patch', err);
    } finally {
      series.updating = false;
    }
    // Occurrences that came meanwhile, for a series still recorded.
    if (series.name && series.count > series.sentCount && this.#series.get(series.key) === series) this.#scheduleUpdate(series);
  }

  #failed(verb: 'create' | 'patch', err: unknown): void {
    if (this.#abort.signal.aborted) return;
    this.counts.failed += 1;
    const status = (err as { status?: number }).status;
    if (!this.#said.due(`${verb} ${status}`)) return;
    const hint = status === 403 ? `; nmi needs ${verb} on events.k8s.io events (deploy/grants/pod-events)` : '';
    this.#log.warn({ err: messageOf(err), status }, `could not ${verb} a pod event${hint}`);
  }
}
