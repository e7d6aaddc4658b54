// The token servers' request metrics. Labels stay bounded: route is one of
// RouteName, code an HTTP status (or "aborted" when no answer was sent). Counted
// in plain numbers by request-counts.ts, read here at scrape time.
import { Counter, type Histogram, type Registry } from 'prom-client';
import { DURATION_BUCKETS, RequestCounts, sumCounts, type Code } from './request-counts.js';
import type { NativeServerStats } from '../native/addon.js';
import type { RouteName } from './request.js';

export interface ServerMetrics {
  observe(route: RouteName, code: Code, seconds: number): void;
  /** Counts kept in shared memory by another thread (the js server's worker), added to these at scrape time. */
  segment(): RequestCounts;
}

export function registerServerMetrics(registry: Registry): ServerMetrics {
  const own = new RequestCounts();
  const segments = [own];
  const read = () => sumCounts(segments);
  // prom-client's registry reads any metric through name, help, type and get(); its own classes have no way to take counts kept elsewhere.
  registry.registerMetric(
    new Shared('nmi_http_requests_total', 'Requests answered by the token server, by status code and route', 'counter', ['code', 'route'], () =>
      read().flatMap(({ route, codes }) => [...codes].map(([code, value]) => ({ metricName: 'nmi_http_requests_total', labels: { code, route }, value }))),
    ) as unknown as Counter,
  );
  const duration = 'nmi_http_request_duration_seconds';
  registry.registerMetric(
    new Shared(duration, 'Time from request to the end of its answer, by route', 'histogram', ['route'], () =>
      read()
        .filter(({ count }) => count > 0)
        .flatMap(({ route, buckets, sum, count }) => {
          let cumulative = 0;
          const values: Sample[] = buckets.map((n, i) => ({ metricName: `${duration}_bucket`, labels: { le: DURATION_BUCKETS[i]!, route }, value: (cumulative += n) }));
          values.push({ metricName: `${duration}_bucket`, labels: { le: '+Inf', route }, value: count });
          values.push({ metricName: `${duration}_sum`, labels: { route }, value: sum });
          values.push({ metricName: `${duration}_count`, labels: { route }, value: count });
          return values;
        }),
    ) as unknown as Histogram,
  );
  return {
    observe: (route, code, seconds) => own.observe(route, code, seconds),
    segment() {
      const counts = new RequestCounts();
      segments.push(counts);
      return counts;
    },
  };
}

interface Sample {
  metricName: string;
  labels: Record<string, string | number>;
  value: number;
}

/** A metric whose samples are computed at scrape time, exposed as prom-client exposes its own. */
class Shared {
  readonly aggregator = 'sum';

  constructor(
    readonly name: string,
    readonly help: string,
    readonly type: 'counter' | 'histogram',
    /** As prom-client's own metrics list them (a histogram's `le` not included), for whoever reads the registry's metrics. */
    readonly labelNames: readonly string[],
    private readonly samples: () => Sample[],
  ) {}

  get(): Promise<{ name: string; help: string; type: string; aggregator: string; values: Sample[] }> {
    return Promise.resolve({ name: this.name, help: this.help, type: this.type, aggregator: this.aggregator, values: this.samples() });
  }

  /** Counts are only ever added to: there is nothing of the registry's to reset. */
  reset(): void {}
}

type NativeCounts = Pick<NativeServerStats, 'hits' | 'deferredToJs' | 'malformed' | 'overflow' | 'timeout' | 'busy' | 'refusedConnections' | 'writeTimeouts' | 'acceptErrors'>;

/** The native fast path's own counters, read at scrape time. */
export function registerNativeMetrics(registry: Registry, stats: () => NativeCounts | undefined): void {
  nativeCounter(registry, stats, {
    name: 'nmi_native_requests_total',
    help: 'Requests the native server read: answered in C++ (hit), deferred to JS (js), refused (malformed, overflow, timeout), or answered 503 because as many wait on JS as may (busy)',
    label: 'result',
    read: (s) => ({ hit: s.hits, js: s.deferredToJs, malformed: s.malformed, overflow: s.overflow, timeout: s.timeout, busy: s.busy }),
  });
  nativeCounter(registry, stats, {
    name: 'nmi_native_connections_refused_total',
    help: 'Connections the native server ended on a bound: answered 429 past --max-connections-per-source (per-source), closed with answers unread for the write timeout (write-timeout), accept() out of descriptors or memory (accept-error)',
    label: 'reason',
    read: (s) => ({ 'per-source': s.refusedConnections, 'write-timeout': s.writeTimeouts, 'accept-error': s.acceptErrors }),
  });
}

/** A counter per label value, following native totals that only grow. */
function nativeCounter(
  registry: Registry,
  stats: () => NativeCounts | undefined,
  spec: { name: string; help: string; label: string; read(s: NativeCounts): Record<string, number> },
): void {
  const seen: Record<string, number> = {};
  new Counter({
    name: spec.name,
    help: spec.help,
    labelNames: [spec.label],
    registers: [registry],
    collect() {
      const s = stats();
      if (!s) return;
      for (const [value, total] of Object.entries(spec.read(s))) {
        const before = seen[value] ?? 0;
        if (total > before) this.inc({ [spec.label]: value }, total - before);
        seen[value] = total;
      }
    },
  });
}
