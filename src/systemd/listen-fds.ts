// sd_listen_fds(3) without libsystemd: the descriptors systemd passes a service
// it starts (socket activation, or its file descriptor store), numbered from 3,
// with LISTEN_FDNAMES naming them. Read once, then unset, so nmi's children do
// not take them for theirs.
const FIRST = 3; // SD_LISTEN_FDS_START

/** name → descriptors; empty when systemd passed none to this process. */
export function takeListenFds(env: NodeJS.ProcessEnv, pid = process.pid): Map<string, number[]> {
  const fds = listenFds(env, pid);
  delete env.LISTEN_PID;
  delete env.LISTEN_FDS;
  delete env.LISTEN_FDNAMES;
  return fds;
}

/** The same, leaving the variables set: what a re-execution of this process must keep open. */
export function listenFds(env: NodeJS.ProcessEnv, pid = process.pid): Map<string, number[]> {
  const { LISTEN_PID: forPid, LISTEN_FDS: count, LISTEN_FDNAMES: names } = env;
  const fds = new Map<string, number[]>();
  // Another process's (a shell that exported them): not ours to take.
  if (forPid !== String(pid) || !count || !/^\d+$/.test(count)) return fds;
  const nameList = names?.split(':') ?? [];
  for (let i = 0; i < Number(count); i++) {
    const name = nameList[i] || 'unknown';
    fds.set(name, [...(fds.get(name) ?? []), FIRST + i]);
  }
  return fds;
}
