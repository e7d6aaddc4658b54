// The tests' one way to wait for something that happens on its own time: poll a
// check until it yields a value, or fail saying what never happened. Needs no root.
import { setTimeout as sleep } from 'node:timers/promises';

/**
 * Polls `check` every `pollMs` until it returns neither undefined nor false, and returns that value.
 * `what` may be a function, for a message that says how things stood when the wait gave up.
 * A short `pollMs` for a state that lasts only a moment (a count that goes on rising).
 */
export async function waitFor<T>(what: string | (() => string), check: () => Promise<T | undefined> | T | undefined, timeoutMs = 15_000, pollMs = 50): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value !== undefined && value !== false) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${typeof what === 'function' ? what() : what}`);
    await sleep(pollMs);
  }
}
