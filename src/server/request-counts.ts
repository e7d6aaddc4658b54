// The token servers' request counts and durations, in plain numbers in shared
// memory: the js server's worker thread counts the requests it answers, the
// main thread those of the native server, each in a segment of its own (one
// writer each, so no atomics), and metrics.ts sums the segments at scrape time.
// prom-client's observe and inc hash the label set and allocate on every call,
// which showed in the cache-hit profile.
import { PROXY_CATEGORIES, type RouteName } from './request.js';

export const ROUTES: readonly RouteName[] = ['token', ...PROXY_CATEGORIES, 'other'];
const ROUTE_INDEX = new Map(ROUTES.map((route, i) => [route, i]));

/** Most answers come from the cache in well under a millisecond, so the buckets start at 100µs. */
export const DURATION_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1];

/** Per route: a count per status code (slot 0: aborted, no answer sent), then per bucket, then sum and count. */
export const CODE_SLOTS = 600;
const BUCKETS_AT = CODE_SLOTS;
const SUM_AT = BUCKETS_AT + DURATION_BUCKETS.length;
const COUNT_AT = SUM_AT + 1;
const PER_ROUTE = COUNT_AT + 1;

/** An HTTP status, or 'aborted' when the connection went before an answer did. */
export type Code = number | 'aborted';

export class RequestCounts {
  readonly values: Float64Array;

  constructor(readonly buffer = new SharedArrayBuffer(ROUTES.length * PER_ROUTE * Float64Array.BYTES_PER_ELEMENT)) {
    this.values = new Float64Array(buffer);
  }

  observe(route: RouteName, code: Code, seconds: number): void {
    const base = ROUTE_INDEX.get(route)! * PER_ROUTE;
    const slot = code === 'aborted' || code < 100 || code >= CODE_SLOTS ? 0 : code;
    const v = this.values;
    v[base + slot]! += 1;
    let bucket = 0;
    while (bucket < DURATION_BUCKETS.length && seconds > DURATION_BUCKETS[bucket]!) bucket++;
    if (bucket < DURATION_BUCKETS.length) v[base + BUCKETS_AT + bucket]! += 1;
    v[base + SUM_AT]! += seconds;
    v[base + COUNT_AT]! += 1;
  }
}

/** The counts of several segments added up, by route. */
export function sumCounts(segments: readonly RequestCounts[]): Array<{ route: RouteName; codes: Map<string, number>; buckets: number[]; sum: number; count: number }> {
  return ROUTES.map((route, r) => {
    const at = (offset: number) => segments.reduce((total, s) => total + s.values[r * PER_ROUTE + offset]!, 0);
    const codes = new Map<string, number>();
    for (let slot = 0; slot < CODE_SLOTS; slot++) {
      const n = at(slot);
      if (n > 0) codes.set(slot === 0 ? 'aborted' : String(slot), n);
    }
    return { route, codes, buckets: DURATION_BUCKETS.map((_, i) => at(BUCKETS_AT + i)), sum: at(SUM_AT), count: at(COUNT_AT) };
  });
}
