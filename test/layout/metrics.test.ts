// Every metric is registered in src/<concern>/metrics.ts (or is one of
// prom-client's defaults, in src/metrics/registry.ts): a reader finds them all
// there, and test/harness/metric-names.ts, which the README and the alerts are
// checked against, sees every one.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { filesUnder } from '../harness/files.js';
import { projectRoot } from '../harness/netns.js';

const registering = /\bnew\s+(?:Counter|Gauge|Histogram|Summary)\b|\bexposeCounts?\s*\(|\.registerMetric\s*\(|\bcollectDefaultMetrics\s*\(/g;

const sources = (dir: string) => filesUnder(dir, (name) => name.endsWith('.ts'));

/** "file:line: text" of every registering call outside the places for them. */
function misplaced(root: string, files: string[], read: (file: string) => string): string[] {
  return files.flatMap((file) => {
    const relative = path.relative(root, file);
    if (/^[^/]+\/metrics\.ts$/.test(relative) || relative === 'metrics/registry.ts') return [];
    return read(file)
      .split('\n')
      .flatMap((line, i) => (line.match(registering) ? [`src/${relative}:${i + 1}: ${line.trim()}`] : []));
  });
}

test('metrics are registered only in src/<concern>/metrics.ts and src/metrics/registry.ts', () => {
  const root = path.join(projectRoot, 'src');
  assert.deepEqual(misplaced(root, sources(root), (f) => readFileSync(f, 'utf8')), []);
});

test('the check finds each way of registering, and allows the metrics files', () => {
  const text: Record<string, string> = {
    '/s/lifecycle/daemon.ts': "const c = new Counter({ name: 'x' });\nnew  Gauge({});\nexposeCount(registry, 'y');\nregistry.registerMetric(m);",
    '/s/rules/keeper.ts': "exposeCounts(registry, 'z');\nconst h = new Histogram({});\nnew Summary({});\ncollectDefaultMetrics({});",
    '/s/rules/metrics.ts': 'new Gauge({});',
    '/s/metrics/registry.ts': 'new Counter({});',
    '/s/util/counter.ts': 'const Counters = 1; new CounterMap();',
  };
  const found = misplaced('/s', Object.keys(text), (f) => text[f]!).map((l) => l.split(':').slice(0, 2).join(':'));
  assert.deepEqual(found, [
    'src/lifecycle/daemon.ts:1',
    'src/lifecycle/daemon.ts:2',
    'src/lifecycle/daemon.ts:3',
    'src/lifecycle/daemon.ts:4',
    'src/rules/keeper.ts:1',
    'src/rules/keeper.ts:2',
    'src/rules/keeper.ts:3',
    'src/rules/keeper.ts:4',
  ]);
});
