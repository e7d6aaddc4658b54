/**
 * Exponential backoff whose every wait is drawn anywhere between the first delay and the current one (±20 %):
 * "full jitter". Nodes that fail together (an API server restart) spread their retries over the whole window
 * instead of arriving in step at each doubling, as ±20 % around the doubling left them.
 */
export class Backoff {
  #delay: number;
  constructor(private readonly opts: { initialMs: number; maxMs: number }) {
    this.#delay = opts.initialMs;
  }
  next(): number {
    const d = this.#delay;
    this.#delay = Math.min(this.opts.maxMs, d * 2);
    const low = Math.min(d, this.opts.initialMs) * 0.8;
    return low + Math.random() * (d * 1.2 - low);
  }
  reset(): void {
    this.#delay = this.opts.initialMs;
  }
}
