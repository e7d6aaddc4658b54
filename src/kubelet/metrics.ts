// The pod index as Prometheus metrics, read from the index at scrape time.
import { exposeCount } from '../metrics/registry.js';
import { Counter, Gauge, type Registry } from 'prom-client';
import { refreshReasons, type PodIndex } from './pod-index.js';

export function registerKubeletMetrics(registry: Registry, index: PodIndex): void {
  new Gauge({
    name: 'nmi_pods_indexed',
    help: 'Live pods findable by their address in the kubelet pod index',
    registers: [registry],
    collect() {
      this.set(index.size);
    },
  });

  // Counters only go up, so each scrape adds what the index counted since the last one.
  const seen: Record<string, number> = {};
  new Counter({
    name: 'nmi_kubelet_refreshes_total',
    help: 'Kubelet /pods calls, by what asked for them',
    labelNames: ['reason'],
    registers: [registry],
    collect() {
      for (const reason of refreshReasons) {
        const now = index.refreshes[reason];
        this.inc({ reason }, now - (seen[reason] ?? 0));
        seen[reason] = now;
      }
    },
  });

  exposeCount(registry, 'nmi_kubelet_errors_total', 'Kubelet /pods calls that failed (the last good index was kept)', () => index.failures);

  new Gauge({
    name: 'nmi_kubelet_last_sync_timestamp_seconds',
    help: 'Unix time of the last successful kubelet /pods call (0 before the first)',
    registers: [registry],
    collect() {
      this.set((index.lastSuccessAt ?? 0) / 1000);
    },
  });
}
