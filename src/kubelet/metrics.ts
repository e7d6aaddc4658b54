// The pod index as Prometheus metrics, read from the index at scrape time.
import { exposeCount, exposeCounts } from '../metrics/registry.js';
import { Gauge, type Registry } from 'prom-client';
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

  exposeCounts(registry, 'nmi_kubelet_refreshes_total', 'Kubelet /pods calls, by what asked for them', 'reason', refreshReasons, () => index.refreshes);

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
