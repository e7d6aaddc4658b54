// Dropping the startup pages of node's binary: which smaps mappings qualify,
// and the real thing on this very process (it must shrink its file RSS and run on).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { cleanFileMappings, dropStartupPages, rssFileKiB } from '../../src/lifecycle/startup-pages.js';

const mapping = (range: string, perms: string, path: string, anonymous: number, flags = 'rd ex mr mw me') => `${range} ${perms} 00000000 08:01 1234 ${path}
Size:               1024 kB
Rss:                 512 kB
Anonymous:        ${anonymous} kB
VmFlags: ${flags}`;

test("only clean, read-only mappings of node's binary qualify", () => {
  const smaps = [
    mapping('00400000-00b6f000', 'r--p', '/usr/bin/node', 0),
    mapping('00b72000-025fe000', 'r-xp', '/usr/bin/node', 0),
    mapping('0563a000-0563c000', 'r--p', '/usr/bin/node', 8), // relocated (RELRO): copied on write
    mapping('0563e000-0565d000', 'rw-p', '/usr/bin/node', 0), // writable data
    mapping('06d79000-072d4000', 'rw-p', '[heap]', 4992),
    mapping('7ff26fe40000-7ff26ffd2000', 'r-xp', '/usr/bin/node', 0, 'rd ex mr mw me lo'), // mlocked
    mapping('7ff277e44000-7ff277f9a000', 'r-xp', '/usr/lib/x86_64-linux-gnu/libc.so.6', 0), // the native server's hot path
    mapping('7ff277f9a000-7ff277f9c000', 'r-xp', '/opt/nmi/build/Release/nmi.node', 0),
    mapping('7ff300004000-7ff300005000', 'r--p', '[vvar]', 0),
    `7ff300006000-7ff300007000 r--p 00000000 08:01 99 /usr/bin/node`, // no Anonymous line: not known clean
  ].join('\n');
  assert.deepEqual(
    cleanFileMappings(smaps, '/usr/bin/node').map((m) => `${m.start.toString(16)}-${m.end.toString(16)} ${m.path}`),
    ['400000-b6f000 /usr/bin/node', 'b72000-25fe000 /usr/bin/node'],
  );
  assert.deepEqual(cleanFileMappings(smaps.replaceAll('/usr/bin/node', '/opt/with space/node'), '/opt/with space/node').length, 2);
  assert.deepEqual(cleanFileMappings('', '/usr/bin/node'), []);
});

test('this process drops its startup pages and runs on', async () => {
  const dropped = dropStartupPages();
  assert.deepEqual(dropped.errors, []);
  assert.ok(dropped.mappings > 0, "node's binary has clean mappings");
  const [before, after] = dropped.rssFileKiB;
  // The test runner's startup touched far more of node's binary than the next statement needs.
  assert.ok(after < before - 4096, `file RSS ${before} KiB → ${after} KiB: less than 4 MiB dropped`);
  // Code and read-only data come back from the page cache as they are used.
  const { createHash } = await import('node:crypto');
  assert.equal(createHash('sha256').update('nmi').digest('hex').length, 64);
  assert.equal(JSON.parse(JSON.stringify({ a: [1, 'b'] })).a[1], 'b');
  assert.ok(rssFileKiB() > after, 'used pages were faulted back in');
});
