// The redirect's state as Prometheus metrics, read from the keeper at scrape time.
import { Gauge, type Registry } from 'prom-client';
import { exposeCount } from '../metrics/registry.js';
import type { RulesKeeper } from './keeper.js';

export function registerRuleMetrics(registry: Registry, keeper: RulesKeeper): void {
  exposeCount(registry, 'nmi_rule_repairs_total', 'Times the installed rules were found changed and repaired', () => keeper.repairs);
  new Gauge({
    name: 'nmi_rules_installed',
    help: '1 when the redirect rules are installed',
    labelNames: ['backend'],
    registers: [registry],
    collect() {
      this.set({ backend: keeper.backend.name }, keeper.installed ? 1 : 0);
    },
  });
}
