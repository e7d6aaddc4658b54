// glibc's malloc raises its mmap and trim thresholds (up to 32 MiB) each time a
// block it had mmapped is freed. From then on large blocks come from the arenas,
// and whatever is freed below a block still in use stays in the process. In the
// daemon those blocks are V8's compiler zones and TLS buffers, on whichever
// thread ran them: `bench --rss` runs of one configuration differed by ~8 MiB
// (one thread arena at 2.4 or 10.4 MiB). Setting both thresholds, at glibc's own
// starting value, turns the raising off: large blocks stay mmapped and go back
// on free, and a freed arena top is trimmed.
import { messageOf } from '../errors/errors.js';
import { addon } from '../native/addon.js';

/** glibc's default for both, before any raise. */
export const MALLOC_THRESHOLD_BYTES = 128 * 1024;

/** null once set, else why not (the daemon runs on, with malloc's defaults). */
export function fixMallocThresholds(): string | null {
  try {
    addon().setMallocThresholds(MALLOC_THRESHOLD_BYTES);
    return null;
  } catch (err) {
    return messageOf(err);
  }
}
