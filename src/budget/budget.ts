// nmi's own limit on the calls it sends one upstream (IMDS's identity endpoint,
// IMDS's other categories, one Entra ID tenant), so that upstream never has to
// throttle the node: at most maxConcurrent calls in flight and ratePerSec
// started in any second. While calls wait, starts are also paced evenly over
// that second (a burst is allowed only into an idle budget): a backlog spends
// the rate one interval at a time, so a call that arrives behind it waits one
// interval, not the rest of a second someone else used up.
//
// Calls wait in one queue per pod, served in turn: a pod's first
// token never waits behind another pod's backlog. Background refreshes wait
// apart and go only when no first token waits, until the token they replace is
// halfway from its refresh point to its end: then they go before anything.
import { codes, NmiError } from '../errors/errors.js';
import { limits } from '../config/limits.js';

export interface BudgetLimits {
  maxConcurrent: number;
  ratePerSec: number;
}

export type TicketKind = 'first' | 'refresh';

/** Why a caller was told to come back later: bounded on purpose, it labels metrics. */
export type ThrottleReason = 'pod-tokens' | 'pod-pending' | 'queue-timeout';
export const throttleReasons: readonly ThrottleReason[] = ['pod-tokens', 'pod-pending', 'queue-timeout'];

/** A caller over its bounds, or a call that waited too long: answered as IMDS throttles, 429 with Retry-After. */
export class BudgetError extends NmiError {
  readonly reason: ThrottleReason;
  readonly retryAfterS: number;
  constructor(reason: ThrottleReason, message: string, retryAfterS: number) {
    super(codes.BUDGET, message);
    this.name = 'BudgetError';
    this.reason = reason;
    this.retryAfterS = retryAfterS;
  }
}

/** Called once the call is over; `throttledMs` when the upstream said 429, which pauses every call for that long (at most limits.maxRetryAfterMs). */
export type Release = (outcome?: { throttledMs?: number }) => void;

export interface Ticket {
  /** Settles when the call may go; rejects when its signal aborts or it waited past maxWaitMs. */
  readonly granted: Promise<Release>;
  /** Another pod waits on the same call (single flight): it is also in that pod's queue. Throws as `admit` does. */
  join(pod: string): void;
}

export interface TicketRequest {
  kind: TicketKind;
  /** The pods waiting on this call; none for a refresh no pod waits on. */
  pods: Iterable<string>;
  /** Refreshes: from this time on the refresh goes before first tokens. */
  urgentAtMs?: number;
  signal?: AbortSignal;
  /** A retry goes to the front of its pods' queues: it has waited longest. */
  retry?: boolean;
}

export interface BudgetOptions {
  /** Calls, queued or in flight, one pod may wait on; past it, `admit` throttles. */
  maxQueuedPerPod?: number;
  /** A first-token call that waits this long is throttled (queue-timeout). */
  maxWaitMs?: number;
  /** Starts allowed back to back after a quiet time. */
  burst?: number;
  now?: () => number;
  /** Observes each grant's wait, in seconds, by kind. */
  onWait?: (seconds: number, kind: TicketKind) => void;
  /** Counts the throttles this budget makes (pod-pending, queue-timeout). */
  onThrottled?: (reason: ThrottleReason) => void;
}

export interface BudgetStats {
  inFlight: number;
  queued: Record<TicketKind, number>;
  /** 429s the upstream answered (should stay 0). */
  throttled: number;
  granted: number;
}

/** Clocks and timers disagree by a millisecond or so: the window is kept this much wider. */
const WINDOW_GUARD_MS = 5;
/** A call's latency counts toward the interval up to this (a timeout is not the upstream's usual pace). */
const MAX_LATENCY_MS = 2_000;
/** An upstream 429 without Retry-After pauses calls this long. */
const DEFAULT_PAUSE_MS = 1_000;

interface QueuedTicket {
  readonly kind: TicketKind;
  readonly pods: Set<string>;
  readonly urgentAtMs: number;
  readonly queuedAtMs: number;
  state: 'queued' | 'granted' | 'gone';
  resolve(release: Release): void;
  reject(err: unknown): void;
  timer?: NodeJS.Timeout;
  unlisten?: () => void;
}

export class UpstreamBudget {
  readonly name: string;
  readonly limits: BudgetLimits;
  private readonly maxQueuedPerPod: number;
  private readonly maxWaitMs: number;
  private readonly now: () => number;
  private readonly onWait: BudgetOptions['onWait'];
  private readonly onThrottled: BudgetOptions['onThrottled'];
  /** Starts allowed back to back into an idle budget. */
  private readonly burst: number;
  /** How long calls take, averaged: the paced interval makes room for it (see `recent`). */
  private latencyMs = 0;
  /** Pods with queued first-token calls, in the order they came. */
  private readonly queues = new Map<string, QueuedTicket[]>();
  /** When each pod was last served (a grant count): the pod served longest ago, or never, goes next. */
  private readonly lastServed = new Map<string, number>();
  /** Calls each pod waits on, queued or in flight. */
  private readonly outstanding = new Map<string, number>();
  private readonly refreshes: QueuedTicket[] = [];
  /**
   * The last ratePerSec calls, oldest first, each with when its answer came (undefined while in flight).
   * The upstream counts a call when it receives it, some time between our start and its answer (a new
   * connection, a slow first request): only a start a second after the answer of the call ratePerSec
   * back is sure to be outside that call's second.
   */
  private readonly recent: Array<{ endedAtMs: number | undefined }> = [];
  /** GCRA's theoretical arrival time: when the next start is due at the paced rate (less the burst's intervals while idle). */
  private dueAtMs = 0;
  private pausedUntilMs = 0;
  /** Calls have waited since the queues were last empty. */
  private backlogged = false;
  private inFlight = 0;
  private timer: NodeJS.Timeout | undefined;
  private timerAtMs = Infinity;
  private readonly counts = { throttled: 0, granted: 0 };

  constructor(name: string, limits: BudgetLimits, options: BudgetOptions = {}) {
    if (!(Number.isInteger(limits.maxConcurrent) && limits.maxConcurrent >= 1)) throw new RangeError(`maxConcurrent must be a positive integer, got ${limits.maxConcurrent}`);
    if (!(limits.ratePerSec > 0)) throw new RangeError(`ratePerSec must be positive, got ${limits.ratePerSec}`);
    this.name = name;
    this.limits = limits;
    this.maxQueuedPerPod = options.maxQueuedPerPod ?? Infinity;
    this.maxWaitMs = options.maxWaitMs ?? Infinity;
    this.now = options.now ?? Date.now;
    this.onWait = options.onWait;
    this.onThrottled = options.onThrottled;
    this.burst = Math.max(1, Math.min(options.burst ?? limits.maxConcurrent, Math.floor(limits.ratePerSec)));
  }

  /** Throws BudgetError (pod-pending) when pod has as many calls queued as it may. */
  admit(pod: string): void {
    if (this.outstandingOf(pod) < this.maxQueuedPerPod) return;
    this.onThrottled?.('pod-pending');
    throw new BudgetError('pod-pending', `${this.maxQueuedPerPod} calls to ${this.name} already under way or waiting for this caller`, 1);
  }

  /** Queues one upstream call; the caller admits a new one first (retries and refreshes are never throttled). */
  request(request: TicketRequest): Ticket {
    let resolve!: (release: Release) => void;
    let reject!: (err: unknown) => void;
    const granted = new Promise<Release>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    const now = this.now();
    const ticket: QueuedTicket = {
      kind: request.kind,
      pods: new Set(),
      urgentAtMs: request.urgentAtMs ?? Infinity,
      queuedAtMs: now,
      state: 'queued',
      resolve,
      reject,
    };
    if (ticket.kind === 'refresh') {
      // Kept in urgency order; there are few.
      const at = this.refreshes.findIndex((other) => other.urgentAtMs > ticket.urgentAtMs);
      this.refreshes.splice(at < 0 ? this.refreshes.length : at, 0, ticket);
    }
    for (const pod of request.pods) this.enqueue(ticket, pod, request.retry === true);
    if (ticket.kind === 'first' && ticket.pods.size === 0) this.enqueue(ticket, '', request.retry === true);
    const signal = request.signal;
    if (signal) {
      const cancel = () => this.drop(ticket, signal.reason ?? new Error('cancelled'));
      if (signal.aborted) cancel();
      else {
        // The signal (an entry's) outlives the ticket: the listener goes with the ticket.
        signal.addEventListener('abort', cancel, { once: true });
        ticket.unlisten = () => signal.removeEventListener('abort', cancel);
      }
    }
    if (ticket.kind === 'first' && Number.isFinite(this.maxWaitMs) && ticket.state === 'queued') {
      ticket.timer = setTimeout(() => {
        this.onThrottled?.('queue-timeout');
        this.drop(ticket, new BudgetError('queue-timeout', `no ${this.name} call could start within ${this.maxWaitMs} ms`, Math.max(1, Math.ceil((this.intervalMs() * this.queuedTotal()) / 1000))));
      }, this.maxWaitMs);
    }
    this.dispatch();
    return {
      granted,
      join: (pod) => {
        if (ticket.state !== 'queued' || ticket.pods.has(pod)) return;
        this.admit(pod);
        this.enqueue(ticket, pod, false);
      },
    };
  }

  stats(): BudgetStats {
    return {
      inFlight: this.inFlight,
      queued: { first: uniqueQueued(this.queues), refresh: this.refreshes.length },
      throttled: this.counts.throttled,
      granted: this.counts.granted,
    };
  }

  private outstandingOf(pod: string): number {
    return this.outstanding.get(pod) ?? 0;
  }

  /** The ticket is over (answered or gone) for each of its pods. */
  private settle(ticket: QueuedTicket): void {
    for (const pod of ticket.pods) {
      const left = (this.outstanding.get(pod) ?? 1) - 1;
      if (left > 0) this.outstanding.set(pod, left);
      else this.outstanding.delete(pod);
    }
  }

  private queuedTotal(): number {
    return uniqueQueued(this.queues) + this.refreshes.length;
  }

  private enqueue(ticket: QueuedTicket, pod: string, front: boolean): void {
    ticket.pods.add(pod);
    this.outstanding.set(pod, this.outstandingOf(pod) + 1);
    if (ticket.kind === 'refresh') return;
    let queue = this.queues.get(pod);
    if (!queue) this.queues.set(pod, (queue = []));
    if (front) queue.unshift(ticket);
    else queue.push(ticket);
  }

  /** Takes a queued ticket out of every queue. */
  private unlink(ticket: QueuedTicket): void {
    if (ticket.kind === 'refresh') {
      const at = this.refreshes.indexOf(ticket);
      if (at >= 0) this.refreshes.splice(at, 1);
    }
    for (const pod of ticket.pods) {
      const queue = this.queues.get(pod);
      if (!queue) continue;
      const at = queue.indexOf(ticket);
      if (at >= 0) queue.splice(at, 1);
      if (queue.length === 0) this.queues.delete(pod);
    }
    clearTimeout(ticket.timer);
    ticket.unlisten?.();
  }

  private drop(ticket: QueuedTicket, err: unknown): void {
    if (ticket.state !== 'queued') return;
    ticket.state = 'gone';
    this.unlink(ticket);
    this.settle(ticket);
    ticket.reject(err);
  }

  /** The next call to start: an urgent refresh, else the next pod's first token in turn, else any refresh. */
  private pick(now: number): QueuedTicket | undefined {
    const refresh = this.refreshes[0];
    if (refresh && refresh.urgentAtMs <= now) return refresh;
    let next: QueuedTicket | undefined;
    let nextServed = Infinity;
    for (const [pod, queue] of this.queues) {
      const served = this.lastServed.get(pod) ?? -1;
      if (served < nextServed) [next, nextServed] = [queue[0], served];
    }
    return next ?? refresh;
  }

  /** When the next start may happen by rate and pause alone. */
  private nextStartAt(): number {
    const full = this.recent.length >= Math.ceil(this.limits.ratePerSec);
    // Still in flight: its release dispatches again.
    const oldest = full ? (this.recent[0]!.endedAtMs ?? Infinity) + 1000 + WINDOW_GUARD_MS : 0;
    // The burst is for an idle budget only: a backlog that kept it would fill IMDS's second early and stall.
    return Math.max(this.backlogged ? this.dueAtMs : this.dueAtMs - (this.burst - 1) * this.intervalMs(), oldest, this.pausedUntilMs);
  }

  private dispatch(): void {
    for (;;) {
      if (this.refreshes.length === 0 && this.queues.size === 0) {
        this.backlogged = false;
        return;
      }
      if (this.inFlight >= this.limits.maxConcurrent) {
        this.backlogged = true;
        return;
      }
      const now = this.now();
      const at = this.nextStartAt();
      if (at > now) {
        this.backlogged = true;
        if (Number.isFinite(at)) this.wakeAt(at, now);
        return;
      }
      const ticket = this.pick(now);
      if (!ticket) return;
      this.start(ticket, now);
    }
  }

  private start(ticket: QueuedTicket, now: number): void {
    ticket.state = 'granted';
    // Every pod waiting on it had its turn.
    for (const pod of ticket.pods) this.lastServed.set(pod, this.counts.granted);
    if (this.lastServed.size > 4096) for (const pod of this.lastServed.keys()) if (!this.queues.has(pod)) this.lastServed.delete(pod);
    this.unlink(ticket);
    this.inFlight++;
    this.counts.granted++;
    const call: { endedAtMs: number | undefined } = { endedAtMs: undefined };
    this.recent.push(call);
    if (this.recent.length > Math.ceil(this.limits.ratePerSec)) this.recent.shift();
    this.dueAtMs = Math.max(this.dueAtMs, now) + this.intervalMs();
    this.onWait?.((now - ticket.queuedAtMs) / 1000, ticket.kind);
    let released = false;
    ticket.resolve((outcome) => {
      if (released) return;
      released = true;
      call.endedAtMs = this.now();
      const took = Math.min(MAX_LATENCY_MS, call.endedAtMs - now);
      this.latencyMs = this.latencyMs === 0 ? took : 0.8 * this.latencyMs + 0.2 * took;
      this.inFlight--;
      this.settle(ticket);
      if (outcome?.throttledMs !== undefined) {
        this.counts.throttled++;
        // Capped here too, whoever parsed it: an upstream's Retry-After of a day must not stop the node for a day.
        const pauseMs = outcome.throttledMs > 0 ? Math.min(outcome.throttledMs, limits.maxRetryAfterMs) : DEFAULT_PAUSE_MS;
        this.pausedUntilMs = Math.max(this.pausedUntilMs, this.now() + pauseMs);
      }
      this.dispatch();
    });
  }

  /**
   * One second (and the calls' latency, as `recent` counts the window from their answers) shared by
   * ratePerSec starts: paced this far apart, a backlog never fills the window early and stalls.
   */
  private intervalMs(): number {
    return (1000 + this.latencyMs + WINDOW_GUARD_MS) / this.limits.ratePerSec;
  }

  private wakeAt(at: number, now: number): void {
    if (this.timer && this.timerAtMs <= at) return;
    clearTimeout(this.timer);
    this.timerAtMs = at;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.timerAtMs = Infinity;
      this.dispatch();
    }, Math.max(1, Math.ceil(at - now)));
  }
}

/** First-token tickets queued, each counted once however many pods wait on it. */
function uniqueQueued(queues: Map<string, QueuedTicket[]>): number {
  const seen = new Set<QueuedTicket>();
  for (const queue of queues.values()) for (const ticket of queue) seen.add(ticket);
  return seen.size;
}
