// `nmi run` wired together: probe server, rules keeper, and (as they land) the
// pod index, bindings, token cache and token server. Order matters: the rules
// go in only once nmi can answer what they redirect.
import type http from 'node:http';
import { Counter, Gauge } from 'prom-client';
import type { RunConfig } from '../config/commands.js';
import { createLogger, type Logger } from '../log/logger.js';
import { createRegistry } from '../metrics/registry.js';
import { Readiness } from '../probe/readiness.js';
import { startProbeServer } from '../probe/probe-server.js';
import { RulesKeeper } from '../rules/keeper.js';
import { selectBackend } from '../rules/select.js';
import type { Redirect } from '../rules/redirect.js';

export interface Daemon {
  log: Logger;
  readiness: Readiness;
  /** Stops serving, then removes or keeps the rules as --on-exit says. */
  stop(): Promise<void>;
}

export async function startDaemon(config: RunConfig): Promise<Daemon> {
  // Resolve everything that can be a usage error before touching the host.
  const backend = selectBackend(config.rules);
  const log = createLogger({ level: config.logLevel, format: config.logFormat });
  const registry = createRegistry();
  const readiness = new Readiness();
  readiness.require('rules');

  const redirect: Redirect = {
    metadataIp: config.metadataIp,
    metadataPort: config.metadataPort,
    targetIp: config.nodeIp,
    targetPort: config.port,
  };
  const repairs = new Counter({ name: 'nmi_rule_repairs_total', help: 'Times the installed rules were found changed and repaired', registers: [registry] });
  const keeper = new RulesKeeper(backend, redirect, config.syncInterval, log, () => repairs.inc());
  new Gauge({
    name: 'nmi_rules_installed',
    help: '1 when the redirect rules are installed',
    labelNames: ['backend'],
    registers: [registry],
    collect() {
      this.set({ backend: backend.name }, keeper.installed ? 1 : 0);
    },
  });

  const probe: http.Server = await startProbeServer(config.probeAddress, readiness, registry);
  log.info({ address: `${config.probeAddress.host}:${config.probeAddress.port}` }, 'probe server listening');

  await keeper.install();
  readiness.set('rules', true);

  return {
    log,
    readiness,
    async stop() {
      readiness.set('rules', false);
      await keeper.stop(config.onExit === 'remove');
      probe.close();
      probe.closeAllConnections();
    },
  };
}
