// No core file and no ptrace by nmi's own uid: a watchdog abort (SIGABRT) would
// otherwise write the token cache and the Secrets' values to a core file, and a
// dumpable process's memory is readable through /proc/<pid>/mem and ptrace by any
// process of its uid. Set on the daemon itself at start, whatever the unit or the
// container runtime says (systemd/nmi.service also has LimitCORE=0).
import { codes, NmiError } from '../errors/errors.js';
import { addon, type CoreDumpState } from '../native/addon.js';

/** What is wrong with the state the kernel reports after the call; undefined when it is what was asked. */
export function coreDumpProblem(state: CoreDumpState): string | undefined {
  if (state.dumpable !== 0) return `the process is still dumpable (PR_GET_DUMPABLE ${state.dumpable})`;
  if (state.coreSoft !== 0 || state.coreHard !== 0) return `RLIMIT_CORE is ${state.coreSoft}/${state.coreHard}, not 0/0`;
  return undefined;
}

/** Throws NMI_ERR_NATIVE_CALL when the kernel refused or reports otherwise: the daemon does not run dumpable. */
export function forbidCoreDumps(): void {
  const problem = coreDumpProblem(addon().disableCoreDumps());
  if (problem) throw new NmiError(codes.NATIVE_CALL, `cannot turn core dumps off: ${problem}`);
}
