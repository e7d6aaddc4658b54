/** Exponential backoff with ±20 % jitter, so a fleet of nodes does not retry in step. */
export class Backoff {
  #delay: number;
  constructor(private readonly opts: { initialMs: number; maxMs: number }) {
    this.#delay = opts.initialMs;
  }
  next(): number {
    const d = this.#delay;
    this.#delay = Math.min(this.opts.maxMs, d * 2);
    return d * (0.8 + Math.random() * 0.4);
  }
  reset(): void {
    this.#delay = this.opts.initialMs;
  }
}
