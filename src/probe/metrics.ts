// /readyz as a Prometheus gauge, so an alert needs no probe of its own.
import { Gauge, type Registry } from 'prom-client';
import type { Readiness } from './readiness.js';

export function registerReadinessMetrics(registry: Registry, readiness: Readiness): void {
  new Gauge({
    name: 'nmi_ready',
    help: '1 when /readyz answers 200 (every readiness condition holds; /readyz names those pending)',
    registers: [registry],
    collect() {
      this.set(readiness.ready ? 1 : 0);
    },
  });
}
