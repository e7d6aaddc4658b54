// The budgets as Prometheus metrics: what each upstream is allowed and using,
// how long calls wait for their turn, who was throttled, and the upstream 429s
// that got through anyway (which the budget exists to keep at 0).
import { Gauge, Histogram, type Registry } from 'prom-client';
import { exposeCounts } from '../metrics/registry.js';
import { throttleReasons, type TicketKind } from './budget.js';
import { upstreams, type Budgets, type UpstreamName } from './budgets.js';


/** The wait observer Budgets takes, registered before the budgets exist. */
export function registerQueueWaitMetrics(registry: Registry): (upstream: UpstreamName, seconds: number, kind: TicketKind) => void {
  const histogram = new Histogram({
    name: 'nmi_upstream_queue_wait_seconds',
    help: 'Time an upstream call waited for its turn in the budget, by upstream and kind (first token or refresh)',
    labelNames: ['upstream', 'kind'],
    buckets: [0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
    registers: [registry],
  });
  return (upstream, seconds, kind) => histogram.observe({ upstream, kind }, seconds);
}

export function registerBudgetMetrics(registry: Registry, budgets: Budgets): void {
  const registers = [registry];
  const sum = (read: (stats: ReturnType<Budgets['imds']['stats']>) => number) => {
    const totals = Object.fromEntries(upstreams.map((u) => [u, 0])) as Record<UpstreamName, number>;
    for (const [upstream, budget] of budgets.all()) totals[upstream] += read(budget.stats());
    return totals;
  };
  new Gauge({
    name: 'nmi_upstream_budget_limit',
    help: 'The budget per upstream: calls in flight (concurrent) and started per second (rate); Entra ID is per tenant',
    labelNames: ['upstream', 'limit'],
    registers,
    collect() {
      for (const upstream of upstreams) {
        const { maxConcurrent, ratePerSec } = budgets.limits(upstream);
        this.set({ upstream, limit: 'concurrent' }, maxConcurrent);
        this.set({ upstream, limit: 'rate' }, ratePerSec);
      }
    },
  });
  new Gauge({
    name: 'nmi_upstream_in_flight',
    help: 'Upstream calls in flight, by upstream',
    labelNames: ['upstream'],
    registers,
    collect() {
      for (const [upstream, value] of Object.entries(sum((s) => s.inFlight))) this.set({ upstream }, value);
    },
  });
  new Gauge({
    name: 'nmi_upstream_queue_depth',
    help: 'Upstream calls waiting for their turn, by upstream and kind (first token or refresh)',
    labelNames: ['upstream', 'kind'],
    registers,
    collect() {
      for (const kind of ['first', 'refresh'] as const) {
        for (const [upstream, value] of Object.entries(sum((s) => s.queued[kind]))) this.set({ upstream, kind }, value);
      }
    },
  });
  exposeCounts(registry, 'nmi_upstream_throttled_total', 'Upstream answers of 429 (the budget exists to keep this at 0), by upstream', 'upstream', upstreams, () => sum((s) => s.throttled));
  exposeCounts(registry, 'nmi_budget_refusals_total', 'Requests answered 429 by nmi, by reason: a pod over its tokens or waiting calls, or no turn in time', 'reason', throttleReasons, () => budgets.throttles());
}
