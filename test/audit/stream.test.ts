// The audit stream's file: rotation by size, and every way a write can fail
// counted and said once, never thrown.
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { AuditStream } from '../../src/audit/stream.js';
import { captureLogs } from '../harness/log-capture.js';

function folder(t: { after(fn: () => void): void }): string {
  const dir = mkdtempSync(path.join(tmpdir(), 'nmi-audit-stream-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

const lines = (file: string) => readFileSync(file, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l) as { n: number });

test('rotated by size: FILE.1 newest to FILE.N, the oldest dropped, no file past the bound', (t) => {
  const file = path.join(folder(t), 'audit.jsonl');
  const stream = new AuditStream({ path: file, maxBytes: 100, keep: 2, log: captureLogs().log });
  // Each record is 30 bytes: three fit in 100.
  for (let n = 0; n < 10; n++) stream.write({ n, pad: 'x'.repeat(15 - String(n).length) });
  stream.close();
  assert.deepEqual(lines(file).map((r) => r.n), [9]);
  assert.deepEqual(lines(`${file}.1`).map((r) => r.n), [6, 7, 8]);
  assert.deepEqual(lines(`${file}.2`).map((r) => r.n), [3, 4, 5]);
  assert.equal(existsSync(`${file}.3`), false);
  for (const f of [file, `${file}.1`, `${file}.2`]) assert.ok(statSync(f).size <= 100);
  assert.deepEqual(stream.counts, { written: 10, failed: 0, dropped: 0 });
});

test('a file that already holds records is appended to, and its size counts toward the bound', (t) => {
  const file = path.join(folder(t), 'audit.jsonl');
  const options = { path: file, maxBytes: 100, keep: 1, log: captureLogs().log };
  const first = new AuditStream(options);
  for (let n = 0; n < 3; n++) first.write({ n, pad: 'x'.repeat(14) });
  first.close();
  const second = new AuditStream(options);
  second.write({ n: 3, pad: 'x'.repeat(14) });
  second.close();
  assert.deepEqual(lines(`${file}.1`).map((r) => r.n), [0, 1, 2]);
  assert.deepEqual(lines(file).map((r) => r.n), [3]);
});

test('a record larger than the bound is still written, once, into a file of its own', (t) => {
  const file = path.join(folder(t), 'audit.jsonl');
  const stream = new AuditStream({ path: file, maxBytes: 10, keep: 1, log: captureLogs().log });
  stream.write({ n: 0, pad: 'x'.repeat(50) });
  stream.write({ n: 1, pad: 'x'.repeat(50) });
  stream.close();
  assert.deepEqual(lines(file).map((r) => r.n), [1]);
  assert.deepEqual(lines(`${file}.1`).map((r) => r.n), [0]);
});

test('a full disk: every record counted as failed, said once, never thrown; a device is never rotated', () => {
  const { log, lines: logged } = captureLogs();
  const stream = new AuditStream({ path: '/dev/full', maxBytes: 1, keep: 1, log });
  for (let n = 0; n < 5; n++) stream.write({ n });
  stream.close();
  assert.deepEqual(stream.counts, { written: 0, failed: 5, dropped: 0 });
  const said = logged().filter((l) => l.msg.startsWith('audit stream: cannot write records'));
  assert.equal(said.length, 1);
  assert.match(String(said[0]!.err), /ENOSPC/);
  assert.ok(existsSync('/dev/full') && !existsSync('/dev/full.1'));
});

test('a file that cannot be opened is tried again; once it can, records are written and that is said', (t) => {
  const dir = path.join(folder(t), 'not-yet');
  const file = path.join(dir, 'audit.jsonl');
  const { log, lines: logged } = captureLogs();
  const stream = new AuditStream({ path: file, maxBytes: 1000, keep: 1, log, reopenMs: 0 });
  stream.write({ n: 0 });
  stream.write({ n: 1 });
  mkdirSync(dir);
  stream.write({ n: 2 });
  stream.close();
  assert.deepEqual(stream.counts, { written: 1, failed: 2, dropped: 0 });
  assert.deepEqual(lines(file).map((r) => r.n), [2]);
  const msgs = logged().map((l) => l.msg).filter((m) => m.startsWith('audit stream'));
  assert.equal(msgs.length, 2);
  assert.match(msgs[0]!, /cannot write records/);
  assert.match(msgs[1]!, /writing again/);
});

test('a path that is a folder: every record counted as failed, never thrown', (t) => {
  const dir = folder(t);
  const { log } = captureLogs();
  const stream = new AuditStream({ path: dir, maxBytes: 1000, keep: 1, log, reopenMs: 60_000 });
  for (let n = 0; n < 3; n++) stream.write({ n });
  assert.deepEqual(stream.counts, { written: 0, failed: 3, dropped: 0 });
});

test('standard output closed by its reader (EPIPE): records counted as failed, the process lives on', async () => {
  const stream = new URL('../../src/audit/stream.js', import.meta.url).href;
  const logger = new URL('../../src/log/logger.js', import.meta.url).href;
  const script = `
    import { AuditStream } from '${stream}';
    import { silentLogger } from '${logger}';
    const s = new AuditStream({ path: '-', maxBytes: 1, keep: 1, log: silentLogger });
    const write = () => { for (let n = 0; n < 3; n++) s.write({ n }); };
    setTimeout(write, 200);
    setTimeout(() => { write(); setTimeout(() => process.stderr.write(JSON.stringify(s.counts)), 100); }, 400);`;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'pipe'] });
  child.stdout.destroy();
  let stderr = '';
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const [code] = (await once(child, 'exit')) as [number];
  assert.equal(code, 0, stderr);
  const counts = JSON.parse(stderr) as { written: number; failed: number };
  assert.equal(counts.written, 0);
  assert.equal(counts.failed, 6);
});
