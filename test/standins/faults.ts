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
