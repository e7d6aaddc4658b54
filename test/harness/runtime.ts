// What the tests under real runtimes share: the Debian package, built once per
// `npm test` run however many files ask for it, and the Debian 12 root file
// system (scripts/debian-root.sh, cached between runs) that systemd-nspawn boots
// and podman imports as a base image.
import { execFileSync } from 'node:child_process';
import { readdirSync, rmSync } from 'node:fs';
import path from 'node:path';
import { projectRoot } from './netns.js';

/** scripts/test.js names its run, so all its files share one package (it removes it); a file run alone builds its own and removes it at exit. */
const run = process.env.NMI_TEST_RUN ?? String(process.pid);
export const packageDir = `/tmp/nmi-pkg-${run}`;
if (process.env.NMI_TEST_RUN === undefined) {
  process.on('exit', () => {
    rmSync(packageDir, { recursive: true, force: true });
    rmSync(`${packageDir}.lock`, { force: true });
  });
}

/** dist/nmi_<version>_<arch>.deb as `npm run package` builds it, from this checkout's build. */
export function nmiPackage(): string {
  // flock: parallel test files wait for the first one's build instead of racing it.
  const script = `[ -e "$1/.done" ] || { bash scripts/package.sh "$1" >/dev/null && touch "$1/.done"; }`;
  execFileSync('flock', [`${packageDir}.lock`, 'sh', '-c', script, 'sh', packageDir], { cwd: projectRoot, stdio: ['ignore', 'inherit', 'inherit'], timeout: 600_000 });
  const deb = readdirSync(packageDir).find((f) => /^nmi_.*\.deb$/.test(f));
  if (!deb) throw new Error(`no nmi_*.deb in ${packageDir}`);
  return path.join(packageDir, deb);
}

/** The cached Debian 12 root (debootstrap, minbase plus systemd and the rule tools). Never written to: tests overlay it. */
export function debianRoot(): string {
  return execFileSync('bash', [path.join(projectRoot, 'scripts', 'debian-root.sh')], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], timeout: 900_000 }).trim();
}
