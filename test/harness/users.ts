// A test's process as another user, through setpriv. It keeps CAP_DAC_READ_SEARCH so it
// can still read the checkout wherever it lies (CI clones into a root-only temporary
// folder), while it is that user for all that nmi checks: a socket's owner, a peer's
// credentials, the ownership of its /proc files.
export const NOBODY = 65534;

export function asUser(uid = NOBODY): string[] {
  return ['setpriv', `--reuid=${uid}`, `--regid=${uid}`, '--clear-groups', '--inh-caps=+dac_read_search', '--ambient-caps=+dac_read_search', '--'];
}
