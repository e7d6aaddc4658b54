// The token server's request metrics. Labels stay bounded: route is one of
// RouteName, code an HTTP status (or "aborted" when no answer was sent).
import { Counter, Histogram, type Registry } from 'prom-client';
import type { RouteName } from './request.js';

export interface ServerMetrics {
  observe(route: RouteName, code: string, seconds: number): void;
}

/** Most answers come from the cache in well under a millisecond, so the buckets start at 100µs. */
export const DURATION_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1];

export function registerServerMetrics(registry: Registry): ServerMetrics {
  const requests = new Counter({
    name: 'nmi_http_requests_total',
    help: 'Requests answered by the token server, by status code and route',
    labelNames: ['code', 'route'] as const,
    registers: [registry],
  });
  const duration = new Histogram({
    name: 'nmi_http_request_duration_seconds',
    help: 'Time from request to the end of its answer, by route',
    labelNames: ['route'] as const,
    buckets: DURATION_BUCKETS,
    registers: [registry],
  });
  // Label children looked up once per (route, code): hashing label sets per request showed in the profile.
  const counters = new Map<string, { inc(): void }>();
  const histograms = new Map<string, { observe(value: number): void }>();
  return {
    observe(route, code, seconds) {
      const key = `${route} ${code}`;
      let counter = counters.get(key);
      if (!counter) counters.set(key, (counter = requests.labels({ code, route })));
      counter.inc();
      let histogram = histograms.get(route);
      if (!histogram) histograms.set(route, (histogram = duration.labels({ route })));
      histogram.observe(seconds);
    },
  };
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
