// Flows to the metadata address that were set up before the redirect existed
// bypass it for their whole life; deleting their conntrack entries cuts them.
// Only unredirected flows (reply source still the metadata address) are
// deleted, so pods' live connections to nmi survive a repair.
import type { Logger } from '../log/logger.js';
import { exec, which } from './exec.js';
import type { Redirect } from './redirect.js';

export async function flushBypassingFlows(r: Redirect, log: Logger): Promise<number> {
  if (which('conntrack') === undefined) {
    log.warn('conntrack command not found: flows opened before the redirect are not cut');
    return 0;
  }
  const args = ['-D', '-p', 'tcp', '--orig-dst', r.metadataIp, '--dport', String(r.metadataPort), '--reply-src', r.metadataIp];
  const result = await exec('conntrack', args);
  const m = /(\d+) flow entries have been deleted/.exec(result.stderr);
  // conntrack exits 1 when nothing matched; that is the common case, not an error.
  if (!m && result.code !== 0) log.warn({ stderr: result.stderr.trim() }, 'conntrack flush failed');
  return m ? Number(m[1]) : 0;
}
