// `nmi run`: the daemon until SIGTERM/SIGINT. A crash leaves the rules in place
// on purpose (pods fail closed); systemd's ExecStopPost or `nmi cleanup` removes them.
import { once } from 'node:events';
import type { RunConfig } from '../config/commands.js';
import { startDaemon } from '../lifecycle/daemon.js';
import { createLogger } from '../log/logger.js';
import { takeListenFds } from '../systemd/listen-fds.js';
import { SystemdNotifier } from '../systemd/notify.js';

export async function run(config: RunConfig): Promise<number> {
  // Read (and unset) NOTIFY_SOCKET before any child process could inherit it.
  const log = createLogger({ level: config.logLevel, format: config.logFormat });
  const notifier = SystemdNotifier.fromEnv(process.env, log);
  const daemon = await startDaemon(config, log, {
    status: (text) => notifier?.status(text),
    inherited: takeListenFds(process.env),
    keepListeners: notifier && ((listeners, forget) => notifier.store(listeners, forget)),
  });
  notifier?.ready('serving');
  notifier?.startWatchdog();
  log.info({ nodeIp: config.nodeIp, port: config.port }, 'nmi ready');
  const [signal] = (await Promise.race([once(process, 'SIGTERM'), once(process, 'SIGINT')])) as [NodeJS.Signals];
  log.info({ signal }, 'stopping');
  notifier?.stopping('draining requests');
  await daemon.stop();
  notifier?.close();
  log.info('stopped');
  return 0;
}
