// `nmi cleanup`: removes what every backend may have left. Needs no daemon, no
// kubelet, no config; a failure in one backend does not stop the others.
import { presentBackends } from '../rules/select.js';
import { messageOf } from '../errors/errors.js';

export async function cleanup(): Promise<number> {
  const removed: string[] = [];
  const failures: string[] = [];
  for (const backend of presentBackends()) {
    try {
      removed.push(...(await backend.remove()));
    } catch (err) {
      failures.push(`${backend.name}: ${messageOf(err)}`);
    }
  }
  for (const line of removed) process.stdout.write(`removed ${line}\n`);
  if (removed.length === 0 && failures.length === 0) process.stdout.write('nothing to remove\n');
  for (const line of failures) process.stderr.write(`nmi cleanup: ${line}\n`);
  return failures.length === 0 ? 0 : 1;
}
