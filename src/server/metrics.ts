// The token server's request metrics. Labels stay bounded: route is one of
// RouteName, code an HTTP status (or "aborted" when no answer was sent).
import { Counter, Histogram, type Registry } from 'prom-client';
import type { RouteName } from './request.js';

export interface ServerMetrics {
  observe(route: RouteName, code: string, seconds: number): void;
}

/** Most answers come from the cache in well under a millisecond, so the buckets start at 100µs. */
export const DURATION_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1];

// prom-client's observe and inc hash the label set and allocate on every call,
// which showed in the cache-hit profile: the token server counts in plain
// numbers and hands them over at scrape time.
export function registerServerMetrics(registry: Registry): ServerMetrics {
  // Per route, per code (looked up without building a key); listed in the order first seen, as prom-client would.
  type Counted = { labels: { code: string; route: RouteName }; count: number; seen: number };
  const requests = new Map<RouteName, Map<string, Counted>>();
  const listed: Counted[] = [];
  new Counter({
    name: 'nmi_http_requests_total',
    help: 'Requests answered by the token server, by status code and route',
    labelNames: ['code', 'route'] as const,
    registers: [registry],
    collect() {
      for (const r of listed) {
        if (r.count > r.seen) this.inc(r.labels, r.count - r.seen);
        r.seen = r.count;
      }
    },
  });
  const duration = new RouteDurations(
    'nmi_http_request_duration_seconds',
    'Time from request to the end of its answer, by route',
    DURATION_BUCKETS,
  );
  // prom-client's registry reads any metric through name, help, type and get(); its own Histogram has no way to take counts kept elsewhere.
  registry.registerMetric(duration as unknown as Histogram<'route'>);
  return {
    observe(route, code, seconds) {
      let byCode = requests.get(route);
      if (!byCode) requests.set(route, (byCode = new Map()));
      let counted = byCode.get(code);
      if (!counted) {
        byCode.set(code, (counted = { labels: { code, route }, count: 0, seen: 0 }));
        listed.push(counted);
      }
      counted.count++;
      duration.observe(route, seconds);
    },
  };
}

interface Sample {
  metricName: string;
  labels: Record<string, string | number>;
  value: number;
}

/** A histogram by route in plain numbers, exposed as prom-client exposes its own (buckets, +Inf, sum, count). */
class RouteDurations {
  readonly type = 'histogram';
  readonly aggregator = 'sum';
  private readonly routes = new Map<RouteName, { buckets: number[]; sum: number; count: number }>();

  constructor(
    readonly name: string,
    readonly help: string,
    private readonly bounds: readonly number[],
  ) {}

  observe(route: RouteName, seconds: number): void {
    let counts = this.routes.get(route);
    if (!counts) this.routes.set(route, (counts = { buckets: this.bounds.map(() => 0), sum: 0, count: 0 }));
    let bucket = 0;
    while (bucket < this.bounds.length && seconds > this.bounds[bucket]!) bucket++;
    if (bucket < this.bounds.length) counts.buckets[bucket]! += 1;
    counts.sum += seconds;
    counts.count += 1;
  }

  get(): Promise<{ name: string; help: string; type: string; aggregator: string; values: Sample[] }> {
    const { name } = this;
    const values: Sample[] = [];
    for (const [route, counts] of this.routes) {
      let cumulative = 0;
      for (const [i, le] of this.bounds.entries()) {
        cumulative += counts.buckets[i]!;
        values.push({ metricName: `${name}_bucket`, labels: { le, route }, value: cumulative });
      }
      values.push({ metricName: `${name}_bucket`, labels: { le: '+Inf', route }, value: counts.count });
      values.push({ metricName: `${name}_sum`, labels: { route }, value: counts.sum });
      values.push({ metricName: `${name}_count`, labels: { route }, value: counts.count });
    }
    return Promise.resolve({ name, help: this.help, type: this.type, aggregator: this.aggregator, values });
  }

  reset(): void {
    this.routes.clear();
  }
}

/** The native fast path's own counters, read at scrape time. */
export function registerNativeMetrics(registry: Registry, stats: () => { hits: number; handedToJs: number; malformed: number; overflow: number; timeout: number } | undefined): void {
  const seen = { hit: 0, js: 0, malformed: 0, overflow: 0, timeout: 0 };
  new Counter({
    name: 'nmi_native_requests_total',
    help: 'Requests the native server read: answered in C++ (hit), handed to JS (js), or refused (malformed, overflow, timeout)',
    labelNames: ['result'],
    registers: [registry],
    collect() {
      const s = stats();
      if (!s) return;
      const now = { hit: s.hits, js: s.handedToJs, malformed: s.malformed, overflow: s.overflow, timeout: s.timeout };
      for (const key of Object.keys(now) as (keyof typeof now)[]) {
        if (now[key] > seen[key]) this.inc({ result: key }, now[key] - seen[key]);
        seen[key] = now[key];
      }
    },
  });
}
