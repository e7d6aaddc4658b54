// Once started, the daemon drops its mappings of the clean pages of node's own
// binary it touched while starting (V8's bootstrap, the module compiler, code
// run once): ~35 MiB of RSS a long-running agent never needs again. A page
// still in use is faulted back in from the page cache, so what stays resident
// is the working set. Only node's binary: the addon and the C libraries carry
// the native server's hot path, whose thread must not take page faults while
// it serves. Only mappings that cannot hold private changes are dropped: not
// writable, not locked, and without one anonymous (copied-on-write) page, as
// the kernel reports in /proc/self/smaps; dropping a page that was written to
// would lose what was written.
import { readFileSync, realpathSync } from 'node:fs';
import { messageOf } from '../errors/errors.js';
import { addon, type NativeAddon } from '../native/addon.js';

export interface Mapping {
  start: bigint;
  end: bigint;
  path: string;
}

const header = /^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \d+ *(.*)$/;
/** smaps VmFlags that madvise(MADV_DONTNEED) refuses or that are not plain page-cache pages: locked, I/O, PFN-mapped, hugetlb. */
const refusedFlags = new Set(['lo', 'io', 'pf', 'ht']);

/** The mappings of `file` in a /proc/<pid>/smaps text whose pages can be dropped and read back from the file unchanged. */
export function cleanFileMappings(smaps: string, file: string): Mapping[] {
  const out: Mapping[] = [];
  let current: (Mapping & { eligible: boolean; anonymous?: number; flags?: string[] }) | undefined;
  const finish = () => {
    if (current?.eligible && current.anonymous === 0 && current.flags && !current.flags.some((f) => refusedFlags.has(f))) {
      out.push({ start: current.start, end: current.end, path: current.path });
    }
  };
  for (const line of smaps.split('\n')) {
    const m = header.exec(line);
    if (m) {
      finish();
      const [, start, end, perms, path] = m as unknown as [string, string, string, string, string];
      current = {
        start: BigInt(`0x${start}`),
        end: BigInt(`0x${end}`),
        path,
        eligible: !perms.includes('w') && path === file,
      };
    } else if (current && line.startsWith('Anonymous:')) {
      current.anonymous = Number(/(\d+)/.exec(line)?.[1] ?? NaN);
    } else if (current && line.startsWith('VmFlags:')) {
      current.flags = line.slice('VmFlags:'.length).trim().split(/\s+/);
    }
  }
  finish();
  return out;
}

/** This process's file-backed RSS in KiB. */
export function rssFileKiB(): number {
  return Number(/^RssFile:\s+(\d+)/m.exec(readFileSync('/proc/self/status', 'utf8'))?.[1] ?? NaN);
}

export interface Dropped {
  mappings: number;
  /** RSS file pages before and after, KiB. */
  rssFileKiB: [number, number];
  /** Mappings madvise refused, with why. */
  errors: string[];
}

export function dropStartupPages(native: NativeAddon = addon()): Dropped {
  const before = rssFileKiB();
  const mappings = cleanFileMappings(readFileSync('/proc/self/smaps', 'utf8'), realpathSync(process.execPath));
  const errors: string[] = [];
  for (const m of mappings) {
    try {
      native.dropPages(m.start, m.end - m.start);
    } catch (err) {
      errors.push(`${m.path} ${m.start.toString(16)}: ${messageOf(err)}`);
    }
  }
  return { mappings: mappings.length, rssFileKiB: [before, rssFileKiB()], errors };
}
