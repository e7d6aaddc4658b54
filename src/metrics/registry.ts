// One Prometheus registry per daemon; each concern registers its own metrics
// here with bounded label values.
import { Counter, Registry, collectDefaultMetrics } from 'prom-client';

export function createRegistry(): Registry {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: 'nmi_' });
  return registry;
}

/** A Prometheus counter mirroring a count kept elsewhere: each scrape adds what was counted since the last. */
export function exposeCount(registry: Registry, name: string, help: string, read: () => number): void {
  let seen = 0;
  new Counter({
    name,
    help,
    registers: [registry],
    collect() {
      const now = read();
      if (now > seen) this.inc(now - seen);
      seen = now;
    },
  });
}
