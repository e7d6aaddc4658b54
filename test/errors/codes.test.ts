// The README's "Error codes" table against src/errors/errors.ts, both ways (as fastify checks its
// codes against its docs): every code has a row, the README names no code that does not exist,
// and every code is used somewhere in src/ besides its declaration.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { codes } from '../../src/errors/errors.js';
import { filesUnder } from '../harness/files.js';
import { projectRoot } from '../harness/netns.js';

const named = (text: string): string[] => [...text.matchAll(/\bNMI_ERR_[A-Z][A-Z_]*\b/g)].map((m) => m[0]);

/** The code of each row of the README's "## Error codes" table, in order. */
function documentedRows(readme: string): string[] {
  const lines = readme.split('\n');
  const start = lines.indexOf('## Error codes');
  assert.ok(start >= 0, 'README.md has no "## Error codes" section');
  const end = lines.findIndex((l, i) => i > start && l.startsWith('## '));
  return lines
    .slice(start + 1, end < 0 ? lines.length : end)
    .filter((l) => l.startsWith('|'))
    .flatMap((l) => named(l.split('|')[1] ?? '').slice(0, 1));
}

/** Each key of `codes` whose `codes.KEY` no file but errors.ts mentions. */
function unusedCodes(sources: Map<string, string>): string[] {
  return Object.keys(codes).filter((key) => {
    const use = new RegExp(`\\bcodes\\.${key}\\b`);
    return ![...sources].some(([file, text]) => file !== path.join('errors', 'errors.ts') && use.test(text));
  });
}

const readme = readFileSync(path.join(projectRoot, 'README.md'), 'utf8');
const rows = documentedRows(readme);
const all: string[] = Object.values(codes);

test('every error code has a row in the README\'s "Error codes"', () => {
  assert.deepEqual(
    all.filter((code) => !rows.includes(code)),
    [],
  );
});

test('every NMI_ERR_ code the README names is in src/errors/errors.ts, and has one row', () => {
  assert.deepEqual(
    named(readme).filter((code) => !all.includes(code)),
    [],
  );
  assert.deepEqual(
    rows.filter((code, i) => rows.indexOf(code) !== i),
    [],
  );
});

test('every error code is used in src/ beyond its declaration', () => {
  const src = path.join(projectRoot, 'src');
  const sources = new Map(filesUnder(src, (name) => name.endsWith('.ts')).map((file) => [path.relative(src, file), readFileSync(file, 'utf8')]));
  assert.deepEqual(unusedCodes(sources), []);
});

test('the checks find a missing row, a stray name and an unused code', () => {
  const table = (...codesListed: string[]) =>
    ['## Error codes', '', '| code | means |', '|---|---|', ...codesListed.map((c) => `| \`${c}\` | see \`NMI_ERR_USAGE\` |`), '', '## Next', '| `NMI_ERR_LATER` |'].join('\n');
  assert.deepEqual(documentedRows(table('NMI_ERR_USAGE', 'NMI_ERR_BUDGET')), ['NMI_ERR_USAGE', 'NMI_ERR_BUDGET']);
  assert.deepEqual(documentedRows(table('NMI_ERR_BUDGET')), ['NMI_ERR_BUDGET'], 'a code named only in another column is no row');
  assert.deepEqual(named('`NMI_ERR_GONE` and [NMI_ERR_...]'), ['NMI_ERR_GONE']);
  const used = Object.keys(codes).filter((key) => key !== 'BUDGET').map((key) => `codes.${key}`).join('\n');
  assert.deepEqual(unusedCodes(new Map([['rules/a.ts', used], [path.join('errors', 'errors.ts'), 'codes.BUDGET']])), ['BUDGET']);
});
