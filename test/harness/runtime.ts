// What the tests under real runtimes share: the Debian package, built once per
// `npm test` run however many files ask for it, and the Debian 12 root file
// system (scripts/debian-root.sh, cached between runs) that systemd-nspawn boots
// and podman imports as a base image.
import { execFileSync } from 'node:child_process';
import { mkdirSync, readdirSync, rmSync } from 'node:fs';
import path from 'node:path';
import { projectRoot } from './netns.js';

/** scripts/test.js names its run, so all its files share one package (it removes it); a file run alone builds its own and removes it at exit. */
const run = process.env.NMI_TEST_RUN ?? String(process.pid);
const packages = `/tmp/nmi-pkg-${run}`;
if (process.env.NMI_TEST_RUN === undefined) process.on('exit', () => rmSync(packages, { recursive: true, force: true }));

/** The machine's architecture as Debian names it (amd64); `nmiPackage` and `debianRoot` build for it unless told `arm64`. */
export const hostArch = execFileSync('dpkg', ['--print-architecture'], { encoding: 'utf8' }).trim();

/** dist/nmi_<version>_<arch>.deb as `npm run package [-- --arch arm64]` builds it, from this checkout's build, alone in its folder. */
export function nmiPackage(arch = hostArch): string {
  const dir = path.join(packages, arch);
  mkdirSync(dir, { recursive: true });
  // flock: parallel test files wait for the first one's build instead of racing it.
  const script = `[ -e "$1/.done" ] || { bash scripts/package.sh --arch "$2" "$1" >/dev/null && touch "$1/.done"; }`;
  execFileSync('flock', [`${dir}.lock`, 'sh', '-c', script, 'sh', dir, arch], { cwd: projectRoot, stdio: ['ignore', 'inherit', 'inherit'], timeout: 600_000 });
  const deb = readdirSync(dir).find((f) => /^nmi_.*\.deb$/.test(f));
  if (!deb) throw new Error(`no nmi_*.deb in ${dir}`);
  return path.join(dir, deb);
}

/** The cached Debian 12 root (debootstrap: minbase plus systemd and the rule tools; for arm64, minbase and the package's libraries). Never written to: tests overlay it. */
export function debianRoot(arch = hostArch): string {
  return execFileSync('bash', [path.join(projectRoot, 'scripts', 'debian-root.sh'), arch], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], timeout: 900_000 }).trim();
}
