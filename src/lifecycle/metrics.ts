// The start gate (--start-taint) as a Prometheus gauge: a gate that stays closed is unused capacity.
import { Gauge, type Registry } from 'prom-client';
import type { StartGate } from './start-gate.js';

export function registerStartGateMetrics(registry: Registry, gate: StartGate): void {
  new Gauge({
    name: 'nmi_start_gate_open',
    help: '1 once the start taint is off this node (--start-taint)',
    registers: [registry],
    collect() {
      this.set(gate.opened ? 1 : 0);
    },
  });
}
