// malloc's thresholds, fixed by `nmi run`: a process that freed one mmapped
// block keeps large freed blocks below a live one (glibc's default), and gives
// them back once the thresholds are fixed.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { pathToFileURL } from 'node:url';
import path from 'node:path';
import { MALLOC_THRESHOLD_BYTES } from '../../src/lifecycle/malloc.js';
import { addon } from '../../src/native/addon.js';

const mallocModule = pathToFileURL(path.resolve(import.meta.dirname, '../../src/lifecycle/malloc.js')).href;

/** KiB still resident after 40 MiB of 1 MiB blocks, allocated below a 200 KiB block and freed. */
function keptKiB(fixed: boolean): number {
  const script = `
    import { readFileSync } from 'node:fs';
    import { fixMallocThresholds } from ${JSON.stringify(mallocModule)};
    if (${fixed}) { const problem = fixMallocThresholds(); if (problem) throw new Error(problem); }
    const rss = () => Number(/VmRSS:\\s+(\\d+)/.exec(readFileSync('/proc/self/status', 'utf8'))[1]);
    const collect = async () => { for (let i = 0; i < 3; i++) { gc(); await new Promise((r) => setTimeout(r, 20)); } };
    let first = Buffer.allocUnsafeSlow(1 << 20).fill(1);
    first = null;
    await collect();
    const before = rss();
    let blocks = Array.from({ length: 40 }, () => Buffer.allocUnsafeSlow(1 << 20).fill(1));
    const above = Buffer.allocUnsafeSlow(200 * 1024).fill(1);
    blocks = null;
    await collect();
    process.stdout.write(String(rss() - before));
    above.fill(2); // live until measured: the freed blocks lie below it
  `;
  const child = spawnSync(process.execPath, ['--expose-gc', '--input-type=module', '-e', script], { encoding: 'utf8' });
  assert.equal(child.status, 0, child.stderr);
  return Number(child.stdout);
}

test("with malloc's defaults the freed blocks stay resident; with the thresholds fixed they are given back", () => {
  assert.ok(keptKiB(false) > 30 * 1024, 'the default keeps them (else this test shows nothing)');
  assert.ok(keptKiB(true) < 8 * 1024);
});

test('setting the thresholds succeeds (glibc refuses none: musl would, and says so); a wrong argument is a TypeError', () => {
  assert.doesNotThrow(() => addon().setMallocThresholds(MALLOC_THRESHOLD_BYTES));
  assert.throws(() => (addon().setMallocThresholds as (v: unknown) => unknown)('128k'), (err: Error) => (err as { code?: string }).code === 'NMI_ERR_NATIVE_CALL' && err.cause instanceof TypeError);
});
