// One shared run of an expensive refresh (a kubelet call, a cgroup walk) for
// every caller that asks within `gapMs` of the last run: a caller cannot make
// nmi repeat it in a loop, and one who asks within the gap waits for the run
// at its end, so what it looks for is found late, never refused.
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';

export class SpacedRefresh {
  private lastAt = -Infinity;
  private pending: Promise<void> | undefined;

  constructor(
    private readonly gapMs: number,
    private readonly run: () => Promise<void>,
  ) {}

  /** The run at the end of the gap (at once when it is over), shared by everyone who asks until it starts. */
  request(): Promise<void> {
    const wait = this.gapMs - (performance.now() - this.lastAt);
    // `then` runs after this assignment, so the reset below cannot be overwritten by it.
    this.pending ??= (wait > 0 ? sleep(wait) : Promise.resolve()).then(() => {
      this.pending = undefined;
      this.ran();
      return this.run();
    });
    return this.pending;
  }

  /** A run made some other way starts the gap too. */
  ran(): void {
    this.lastAt = performance.now();
  }
}
