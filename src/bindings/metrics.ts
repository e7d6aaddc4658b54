// The bindings store as Prometheus metrics, read from the store at scrape time.
import { exposeCount } from '../metrics/registry.js';
import { Gauge, type Registry } from 'prom-client';
import type { BindingStore } from './store.js';

export function registerBindingMetrics(registry: Registry, store: BindingStore): void {
  new Gauge({
    name: 'nmi_bindings_objects',
    help: 'Objects in the current bindings snapshot, by kind',
    labelNames: ['kind'],
    registers: [registry],
    collect() {
      const s = store.snapshot;
      this.set({ kind: 'AzureIdentity' }, s.identities.size);
      this.set({ kind: 'AzureIdentityBinding' }, s.bindings.size);
      this.set({ kind: 'AzurePodIdentityException' }, s.exceptions.size);
      this.set({ kind: 'Secret' }, s.secrets.size);
    },
  });

  new Gauge({
    name: 'nmi_bindings_ready',
    help: '1 once the first complete bindings sync is done',
    registers: [registry],
    collect() {
      this.set(store.ready ? 1 : 0);
    },
  });

  exposeCount(registry, 'nmi_bindings_updates_total', 'Binding sets applied from the source (file reloads, API server changes)', () => store.updates);
}
