// `nmi run`: the daemon until SIGTERM/SIGINT. A crash leaves the rules in place
// on purpose (pods fail closed); systemd's ExecStopPost or `nmi cleanup` removes them.
import { once } from 'node:events';
import type { RunConfig } from '../config/commands.js';
import { startDaemon } from '../lifecycle/daemon.js';

export async function run(config: RunConfig): Promise<number> {
  const daemon = await startDaemon(config);
  daemon.log.info({ nodeIp: config.nodeIp, port: config.port }, 'nmi ready');
  const signal = await Promise.race([once(process, 'SIGTERM'), once(process, 'SIGINT')]).then(() => 'signal');
  daemon.log.info({ signal }, 'stopping');
  await daemon.stop();
  daemon.log.info('stopped');
  return 0;
}
