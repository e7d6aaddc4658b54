// One Prometheus registry per daemon; each concern registers its own metrics
// here with bounded label values.
import { Counter, Registry, collectDefaultMetrics } from 'prom-client';

export function createRegistry(): Registry {
  const registry = new Registry();
  // prom-client samples event-loop lag every 10 ms by default: 100 wakeups a second of an
  // otherwise idle daemon, each taking the core from the native server's thread.
  collectDefaultMetrics({ register: registry, prefix: 'nmi_', eventLoopMonitoringPrecision: 100 });
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

/** exposeCount for a count kept per label value, e.g. refusals by reason. */
export function exposeCounts<K extends string>(registry: Registry, name: string, help: string, label: string, keys: readonly K[], read: () => Record<K, number>): void {
  const seen = new Map<K, number>();
  new Counter({
    name,
    help,
    labelNames: [label],
    registers: [registry],
    collect() {
      const now = read();
      for (const key of keys) {
        const delta = now[key] - (seen.get(key) ?? 0);
        // inc with 0 still exposes the series, so a dashboard sees 0 rather than nothing.
        if (delta >= 0) this.inc({ [label]: key }, delta);
        seen.set(key, now[key]);
      }
    },
  });
}
