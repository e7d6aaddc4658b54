// deploy/monitoring/ against the registry and against Prometheus itself: every
// metric an alert or a dashboard panel asks for is one nmi registers (or
// Prometheus's own `up`), with labels it has; promtool checks the rule file and
// runs its unit tests (test/metrics/alerts.test.yaml).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { accessSync, constants, readFileSync } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { parse } from 'yaml';
import { registeredMetrics, seriesNames, type MetricInfo } from '../harness/metric-names.js';
import { projectRoot } from '../harness/netns.js';

const alertsFile = path.join(projectRoot, 'deploy', 'monitoring', 'alerts.yaml');
const alertTestsFile = path.join(projectRoot, 'test', 'metrics', 'alerts.test.yaml');
const dashboardFile = path.join(projectRoot, 'deploy', 'monitoring', 'grafana-dashboard.json');

/** Words of PromQL that are neither metrics nor followed by "(" where they are used. */
const KEYWORDS = new Set(['by', 'without', 'on', 'ignoring', 'group_left', 'group_right', 'bool', 'offset', 'and', 'or', 'unless', 'inf', 'nan']);

/** The metric names an expression selects, each with the label names its matcher uses. */
function selectors(expr: string): { name: string; labels: string[] }[] {
  const found: { name: string; labels: string[] }[] = [];
  const text = expr
    // String literals first: they may hold anything, braces and metric-like words included.
    .replace(/"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`/g, '""')
    .replace(/#[^\n]*/g, '')
    // Ranges and subqueries ([5m], [$__rate_interval], [1h:5m]), offsets, Grafana's variables.
    .replace(/\[[^\]]*\]/g, ' ')
    .replace(/\boffset\s+-?[\w$]+/g, ' ')
    .replace(/\$\{?\w+\}?/g, ' ')
    // Label lists of grouping and matching.
    .replace(/\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, ' ');
  // A name, optionally with a matcher; a bare matcher ({__name__=...}) is refused below.
  const token = /([A-Za-z_:][\w:]*)?(\s*\{[^}]*\})?/g;
  for (let m = token.exec(text); m; m = token.exec(text)) {
    if (m[0] === '') {
      token.lastIndex++;
      continue;
    }
    const [whole, name, matcher] = m;
    const start = m.index;
    // A number's exponent or a digit-led word (1e3, 5m) is no name.
    if (name && start > 0 && /[\w.]/.test(text[start - 1]!)) continue;
    const labels = matcher ? [...matcher.matchAll(/([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)/g)].map((l) => l[1]!) : [];
    if (!name) {
      if (labels.length > 0) found.push({ name: '', labels });
      continue;
    }
    const after = text.slice(start + whole.length);
    if (!matcher && /^\s*\(/.test(after)) continue; // a function or aggregation
    if (KEYWORDS.has(name.toLowerCase())) continue;
    found.push({ name, labels });
  }
  return found;
}

/** Problems of one expression: names nmi does not register, labels its metric does not have. */
function check(where: string, expr: string, metrics: Map<string, MetricInfo>, series: Set<string>): string[] {
  const problems: string[] = [];
  for (const { name, labels } of selectors(expr)) {
    if (name === '') {
      problems.push(`${where}: a selector without a metric name (${expr}); name the metric so it can be checked`);
      continue;
    }
    if (name !== 'up' && !series.has(name)) {
      problems.push(`${where}: ${name} is not a metric nmi registers${metrics.has(name) ? ' as a series (a histogram is read through _bucket, _sum, _count)' : ''}`);
      continue;
    }
    const base = name.replace(/_(bucket|sum|count)$/, '');
    const info = metrics.get(name) ?? metrics.get(base);
    const known = new Set(['job', 'instance', ...(info?.labels ?? []), ...(name.endsWith('_bucket') ? ['le'] : [])]);
    for (const label of labels) if (!known.has(label)) problems.push(`${where}: ${name} has no label ${label}`);
  }
  return problems;
}

interface Rule {
  alert?: string;
  record?: string;
  expr: string;
  for?: string;
  labels?: Record<string, string>;
  annotations?: Record<string, string>;
}
const rules = (parse(readFileSync(alertsFile, 'utf8')) as { groups: { name: string; rules: Rule[] }[] }).groups.flatMap((g) => g.rules);

interface Panel {
  type: string;
  title: string;
  id: number;
  datasource?: { type: string; uid: string };
  targets?: { expr: string; refId: string }[];
  panels?: Panel[];
}
interface Dashboard {
  panels: Panel[];
  templating: { list: { name: string; type: string; query: string | { query: string } }[] };
}
const dashboard = JSON.parse(readFileSync(dashboardFile, 'utf8')) as Dashboard;
const allPanels = (panels: Panel[]): Panel[] => panels.flatMap((p) => [p, ...allPanels(p.panels ?? [])]);

const metrics = await registeredMetrics();
const series = seriesNames(metrics);

test('every alert asks only for metrics and labels nmi registers', () => {
  const problems = rules.flatMap((r) => check(`alerts.yaml ${r.alert ?? r.record}`, r.expr, metrics, series));
  assert.deepEqual(problems, []);
});

test('every dashboard query asks only for metrics and labels nmi registers', () => {
  const problems: string[] = [];
  for (const panel of allPanels(dashboard.panels)) {
    for (const target of panel.targets ?? []) problems.push(...check(`dashboard panel "${panel.title}" ${target.refId}`, target.expr, metrics, series));
  }
  for (const variable of dashboard.templating.list) {
    if (variable.type !== 'query') continue;
    const query = typeof variable.query === 'string' ? variable.query : variable.query.query;
    // Grafana's label_values(selector, label): the label is no metric.
    const selector = /^label_values\((.*),\s*\w+\)$/.exec(query)?.[1] ?? query;
    problems.push(...check(`dashboard variable $${variable.name}`, selector, metrics, series));
  }
  assert.deepEqual(problems, []);
});

test('every alert waits (for:), has a severity and says what to check', () => {
  const problems: string[] = [];
  for (const rule of rules.filter((r) => r.alert)) {
    if (rule.for === undefined) problems.push(`${rule.alert}: no for:`);
    if (!['critical', 'warning', 'info'].includes(rule.labels?.severity ?? '')) problems.push(`${rule.alert}: severity ${rule.labels?.severity}`);
    if (!rule.annotations?.summary || !rule.annotations.description) problems.push(`${rule.alert}: no summary or description`);
  }
  assert.deepEqual(problems, []);
});

test('the dashboard reads its data source from the ${datasource} variable, and has a node variable', () => {
  const variables = new Map(dashboard.templating.list.map((v) => [v.name, v]));
  assert.equal(variables.get('datasource')?.type, 'datasource');
  assert.equal(variables.get('datasource')?.query, 'prometheus');
  assert.equal(variables.get('instance')?.type, 'query');
  const panels = allPanels(dashboard.panels).filter((p) => p.type !== 'row');
  const ids = allPanels(dashboard.panels).map((p) => p.id);
  assert.equal(new Set(ids).size, ids.length, 'panel ids are unique');
  for (const panel of panels) {
    assert.deepEqual(panel.datasource, { type: 'prometheus', uid: '${datasource}' }, panel.title);
    assert.ok((panel.targets ?? []).length > 0, `${panel.title} has a query`);
    for (const target of panel.targets ?? []) assert.match(target.expr, /\{[^}]*instance=~"\$instance"/, `${panel.title}: every selector filtered by $instance`);
  }
});

test('every alert has a promtool test in which it fires', () => {
  const tests = (parse(readFileSync(alertTestsFile, 'utf8')) as { tests: { alert_rule_test?: { alertname: string; exp_alerts: unknown[] }[] }[] }).tests;
  const firing = new Set(tests.flatMap((t) => t.alert_rule_test ?? []).filter((a) => a.exp_alerts.length > 0).map((a) => a.alertname));
  assert.deepEqual(rules.filter((r) => r.alert && !firing.has(r.alert)).map((r) => r.alert), []);
});

/** promtool from Debian's prometheus package, unpacked by scripts/install-deps.sh; NMI_PROMTOOL or PATH otherwise. */
function promtool(): string {
  const cache = process.env.NMI_TEST_CACHE ?? '/var/cache/nmi-test';
  const candidates = [process.env.NMI_PROMTOOL, path.join(cache, 'promtool'), ...(process.env.PATH ?? '').split(':').map((dir) => path.join(dir, 'promtool'))];
  for (const candidate of candidates) {
    if (!candidate) continue;
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // next
    }
  }
  assert.fail(`promtool not found (NMI_PROMTOOL, ${path.join(cache, 'promtool')}, PATH): run \`bash scripts/install-deps.sh\` as root, which unpacks it from Debian's prometheus package`);
}

async function run(args: string[]): Promise<void> {
  const tool = promtool();
  try {
    await promisify(execFile)(tool, args, { cwd: projectRoot, encoding: 'utf8' });
  } catch (err) {
    const { stdout, stderr } = err as { stdout?: string; stderr?: string };
    assert.fail(`promtool ${args.join(' ')} failed:\n${stdout ?? ''}${stderr ?? ''}`);
  }
}

test('promtool check rules deploy/monitoring/alerts.yaml', () => run(['check', 'rules', path.relative(projectRoot, alertsFile)]));

test('promtool test rules test/metrics/alerts.test.yaml', () => run(['test', 'rules', path.relative(projectRoot, alertTestsFile)]));

test('the PromQL reader finds names and labels, not functions, keywords, durations or strings', () => {
  const names = (expr: string) => selectors(expr).map((s) => (s.labels.length ? `${s.name}{${s.labels.join(',')}}` : s.name));
  assert.deepEqual(names('sum by (job, instance) (rate(nmi_a_total{kind!="client"}[10m])) / sum by (job) (rate(nmi_b_total[5m] offset 1h)) > 0.1'), ['nmi_a_total{kind}', 'nmi_b_total']);
  assert.deepEqual(names('histogram_quantile(0.99, sum by (le) (rate(nmi_c_bucket{job="$job", instance=~"$instance"}[$__rate_interval])))'), ['nmi_c_bucket{job,instance}']);
  assert.deepEqual(names('time() - nmi_d > 300 and on (instance) nmi_e == bool 1 unless absent(up{job="nmi"})'), ['nmi_d', 'nmi_e', 'up{job}']);
  assert.deepEqual(names('label_replace(nmi_f, "dst", "nmi_not_a_metric{x}", "src", "(.*)") * 1e3 + vector(2)'), ['nmi_f']);
  assert.deepEqual(names('sum(nmi_g) by (reason) or max without (le) (nmi_h) [1h:5m]'), ['nmi_g', 'nmi_h']);
  assert.deepEqual(names('{__name__="nmi_i"}'), ['{__name__}']);
});
