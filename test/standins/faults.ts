// Programmable trouble shared by the upstream stand-ins: failures answered in
// order, and a hang that holds calls until it is lifted.
export interface Failure {
  status: number;
  /** Default: the issuer's usual error body for the status. */
  body?: unknown;
  headers?: Record<string, string>;
}

export class Faults {
  private failures: Failure[] = [];
  private held: (() => void)[] = [];
  private hanging = false;

  /** Answers now, or when hang(false) lifts the hang. */
  run(answer: () => void): void {
    if (this.hanging) this.held.push(answer);
    else answer();
  }

  /** The next programmed failure, if any, consumed. */
  next(): Failure | undefined {
    return this.failures.shift();
  }

  failNext(n: number, failure: Failure): void {
    if (n === 0) this.failures = [];
    for (let i = 0; i < n; i++) this.failures.push(failure);
  }

  hang(on: boolean): void {
    this.hanging = on;
    if (on) return;
    const release = this.held;
    this.held = [];
    release.forEach((go) => go());
  }

  clear(): void {
    this.held = [];
  }
}

/** An issuer's own limits, as it enforces them: past either, it answers 429. */
export interface ThrottleLimits {
  maxConcurrent: number;
  /** Calls arriving in any 1 s window, refused ones included (as a throttle counts them). */
  perSecond: number;
  /** Each answered call takes this long [0]. */
  latencyMs?: number;
}

/** Counts calls in flight and arrivals in the last second; `throttled` counts the 429s answered. */
export class Throttle {
  throttled = 0;
  /** The most calls seen in flight at once. */
  peakConcurrent = 0;
  private inFlight = 0;
  private readonly arrivals: number[] = [];

  constructor(readonly limits: ThrottleLimits) {}

  /** Records an arrival; false when it is over a limit (answer 429), else call `until` with its answer. */
  admit(now = Date.now()): boolean {
    while (this.arrivals.length > 0 && this.arrivals[0]! <= now - 1000) this.arrivals.shift();
    this.arrivals.push(now);
    if (this.arrivals.length > this.limits.perSecond || this.inFlight >= this.limits.maxConcurrent) {
      this.throttled++;
      return false;
    }
    this.inFlight++;
    this.peakConcurrent = Math.max(this.peakConcurrent, this.inFlight);
    return true;
  }

  /** The call is in flight until its answer is sent (or its connection goes). */
  until(res: { once(event: 'finish' | 'close', listener: () => void): unknown }): void {
    let done = false;
    const end = () => {
      if (done) return;
      done = true;
      this.inFlight--;
    };
    res.once('finish', end);
    res.once('close', end);
  }
}
