// A warning said once per key per interval: a caller retrying in a loop must
// not flood the log, and a new caller is still said at once.
export class LogLimiter {
  private readonly lastSaid = new Map<string, number>();

  constructor(
    private readonly everyMs: number,
    /** Past this many keys the memory is dropped (a flood of new keys then costs repeats, never memory). */
    private readonly maxKeys = 1_000,
  ) {}

  /** True when this key was not said within everyMs; it then counts as said now. */
  due(key: string, now = Date.now()): boolean {
    if (now - (this.lastSaid.get(key) ?? -Infinity) < this.everyMs) return false;
    if (this.lastSaid.size > this.maxKeys) this.lastSaid.clear();
    this.lastSaid.set(key, now);
    return true;
  }
}
