// Pod events: how many were created, updated as a series, dropped by the rate limit, or refused by the API server.
import type { Registry } from 'prom-client';
import { exposeCounts } from '../metrics/registry.js';
import { eventResults, type PodEvents } from './pod-events.js';

export function registerEventMetrics(registry: Registry, events: PodEvents): void {
  exposeCounts(registry, 'nmi_pod_events_total', 'Kubernetes Events on refused pods: created, series updated, dropped by the rate limit or queue, failed at the API server', 'result', eventResults, () => events.counts);
}
