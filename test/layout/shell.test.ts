// A bash script under `set -o pipefail` must not pipe into a reader that
// leaves early (grep -q, grep -m, head): the writer's next write then dies of
// SIGPIPE, pipefail fails the pipeline, and the script takes a race for an
// error. CI lost a run to `ldd ... | grep -q libasan` that way.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { filesUnder } from '../harness/files.js';
import { projectRoot } from '../harness/netns.js';

const earlyReader = /\|\s*(?:grep\s+(?:-\w*[qm]\w*\b|--quiet|--max-count)|head\b)/;

/** "file:line: text" of every pipe into an early reader in a pipefail script. */
export function earlyExitPipes(scripts: Record<string, string>): string[] {
  return Object.entries(scripts).flatMap(([file, text]) => {
    if (!/set\s+-\w*o\s+pipefail|set\s+-o\s+pipefail/.test(text)) return [];
    return text
      .split('\n')
      .flatMap((line, i) => (!line.trimStart().startsWith('#') && earlyReader.test(line) ? [`${file}:${i + 1}: ${line.trim()}`] : []));
  });
}

function shellScripts(): Record<string, string> {
  const found: Record<string, string> = {};
  for (const dir of ['scripts', '.ci', 'bench', 'deploy']) {
    for (const full of filesUnder(path.join(projectRoot, dir), () => true)) {
      const text = readFileSync(full, 'utf8');
      if (full.endsWith('.sh') || text.startsWith('#!/usr/bin/env bash')) found[path.relative(projectRoot, full)] = text;
    }
  }
  return found;
}

test('no pipefail script pipes into a reader that exits early', () => {
  const scripts = shellScripts();
  assert.ok(Object.keys(scripts).includes('scripts/asan-test.sh'));
  assert.deepEqual(earlyExitPipes(scripts), []);
});

test('the check finds grep -q, grep -m and head, and only under pipefail', () => {
  const piped = 'ldd x | grep -q libasan\nreadelf -d y | grep -qE z\nsed p f | head -n1\nfoo | grep -m1 bar\nfoo | grep --quiet bar\n';
  assert.equal(earlyExitPipes({ 'a.sh': `set -euo pipefail\n${piped}` }).length, 5);
  assert.equal(earlyExitPipes({ 'b.sh': `set -o pipefail\n${piped}` }).length, 5);
  assert.deepEqual(earlyExitPipes({ 'c.sh': `set -eu\n${piped}` }), []);
  assert.deepEqual(earlyExitPipes({ 'd.sh': 'set -euo pipefail\nfoo | grep bar >/dev/null\n# x | grep -q y\nfoo | awk 1\n' }), []);
});
