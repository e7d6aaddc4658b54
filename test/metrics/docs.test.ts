// The README's Metrics tables against the registry itself (test/harness/metric-names.ts):
// every metric documented, nothing documented that is not registered, each row's type
// and label names as registered, and the label values the code lists, as listed.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { refusals } from '../../src/attest/attestation.js';
import { hostRefusals } from '../../src/attest/host-callers.js';
import { throttleReasons } from '../../src/budget/budget.js';
import { upstreams } from '../../src/budget/budgets.js';
import { refreshReasons } from '../../src/kubelet/pod-index.js';
import { ROUTES } from '../../src/server/request-counts.js';
import { upstreamKinds } from '../../src/tokens/upstream-error.js';
import { registeredMetrics } from '../harness/metric-names.js';
import { projectRoot } from '../harness/netns.js';

interface Row {
  line: number;
  type: string;
  labels: string[];
  /** Per label, the values the row lists (none for a label described in words only). */
  values: Map<string, string[]>;
}

const ticked = (text: string): string[] => [...text.matchAll(/`([^`]+)`/g)].map((m) => m[1]!);

/** Metric name → its row, from every table of the README's "## Metrics" section. */
function documentedMetrics(readme: string): Map<string, Row> {
  const lines = readme.split('\n');
  const start = lines.indexOf('## Metrics');
  assert.ok(start >= 0, 'README.md has no "## Metrics" section');
  const end = lines.findIndex((l, i) => i > start && l.startsWith('## '));
  const rows = new Map<string, Row>();
  for (let i = start + 1; i < (end < 0 ? lines.length : end); i++) {
    const cells = lines[i]!.split('|').slice(1, -1).map((c) => c.trim());
    const names = ticked(cells[0] ?? '').filter((n) => n.startsWith('nmi_'));
    if (!lines[i]!.startsWith('|') || names.length === 0) continue;
    // "`a`: `x`, `y` (a note); `b`" names labels a and b, and a's values x and y.
    const values = new Map<string, string[]>();
    for (const part of (cells[2] ?? '').split(';')) {
      const colon = part.indexOf(':');
      const labels = ticked(colon < 0 ? part : part.slice(0, colon));
      const listed = colon < 0 ? [] : ticked(part.slice(colon + 1).replace(/\([^)]*\)/g, ''));
      for (const label of labels) values.set(label, listed);
    }
    for (const name of names) {
      assert.ok(!rows.has(name), `README.md:${i + 1}: ${name} is in the Metrics tables twice`);
      rows.set(name, { line: i + 1, type: cells[1] ?? '', labels: [...values.keys()].sort(), values });
    }
  }
  return rows;
}

const readme = readFileSync(path.join(projectRoot, 'README.md'), 'utf8');
const documented = documentedMetrics(readme);
const registered = await registeredMetrics();

test('every registered metric is in the README', () => {
  const missing = [...registered.keys()].filter((name) => !documented.has(name));
  assert.deepEqual(missing, [], `registered but not in README.md's Metrics tables: ${missing.join(', ')}`);
});

test('every metric in the README is registered', () => {
  const extra = [...documented].filter(([name]) => !registered.has(name)).map(([name, row]) => `${name} (README.md:${row.line})`);
  assert.deepEqual(extra, [], `in README.md's Metrics tables but registered by no src/*/metrics.ts: ${extra.join(', ')}`);
});

test("each README row's type and label names are the registered ones", () => {
  const wrong: string[] = [];
  for (const [name, row] of documented) {
    const metric = registered.get(name);
    if (!metric) continue;
    if (row.type !== metric.type) wrong.push(`${name} (README.md:${row.line}): type ${row.type}, registered as ${metric.type}`);
    if (row.labels.join(',') !== metric.labels.join(',')) {
      wrong.push(`${name} (README.md:${row.line}): labels [${row.labels.join(', ')}], registered with [${metric.labels.join(', ')}]`);
    }
  }
  assert.deepEqual(wrong, []);
});

test('label values the code lists are the ones the README lists', () => {
  const lists: Record<string, readonly string[]> = {
    'nmi_budget_refusals_total reason': throttleReasons,
    'nmi_upstream_budget_limit upstream': upstreams,
    'nmi_kubelet_refreshes_total reason': refreshReasons,
    'nmi_caller_refusals_total reason': refusals,
    'nmi_host_token_refusals_total reason': hostRefusals,
    'nmi_upstream_errors_total kind': upstreamKinds,
    'nmi_http_requests_total route': ROUTES,
  };
  const wrong: string[] = [];
  for (const [key, values] of Object.entries(lists)) {
    const [name, label] = key.split(' ') as [string, string];
    const listed = documented.get(name)?.values.get(label) ?? [];
    if ([...listed].sort().join(',') !== [...values].sort().join(',')) wrong.push(`${name} ${label}: README lists [${listed.join(', ')}], the code [${values.join(', ')}]`);
  }
  assert.deepEqual(wrong, []);
});

test('the table reader takes names, types, labels and values as written', () => {
  const rows = documentedMetrics(
    [
      '## Metrics',
      '| metric | type | labels | what |',
      '|---|---|---|---|',
      '| `nmi_a_total` | counter | `reason`: `x` (see `--flag`), `y`; `kind` | a |',
      '| `nmi_b`, `nmi_c` | gauge | — |',
      '| `nmi_d` | gauge | `version`, `major` |',
      '## Next',
      '| `nmi_e` | gauge | — |',
    ].join('\n'),
  );
  assert.deepEqual([...rows.keys()], ['nmi_a_total', 'nmi_b', 'nmi_c', 'nmi_d']);
  assert.deepEqual(rows.get('nmi_a_total')?.labels, ['kind', 'reason']);
  assert.deepEqual(rows.get('nmi_a_total')?.values.get('reason'), ['x', 'y']);
  assert.deepEqual(rows.get('nmi_c')?.labels, []);
  assert.deepEqual(rows.get('nmi_d')?.labels, ['major', 'version']);
});
