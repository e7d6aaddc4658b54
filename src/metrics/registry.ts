// One Prometheus registry per daemon; each concern registers its own metrics
// here with bounded label values.
import { Registry, collectDefaultMetrics } from 'prom-client';

export function createRegistry(): Registry {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: 'nmi_' });
  return registry;
}
