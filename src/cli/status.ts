// `nmi status`: installed rules with counters, and the daemon's state if one answers.
import { request } from '../net/undici.js';
import { readMetric } from '../metrics/read.js';
import { throttleReasons } from '../budget/budget.js';
import { upstreams } from '../budget/budgets.js';
import type { HostPort } from '../config/values.js';
import { probeUrl } from '../probe/probe-server.js';
import { BACKSTOP_TITLE } from '../rules/backstop.js';
import { presentBackends } from '../rules/select.js';
import type { BackendStatus } from '../rules/redirect.js';
import { messageOf } from '../errors/errors.js';

interface DaemonState {
  address: string;
  answering: boolean;
  ready?: boolean;
  readiness?: string;
  podsIndexed?: number;
  tokensCached?: number;
  ruleRepairs?: number;
  /** Per upstream: the budget's limits and what it holds now. */
  budgets?: Record<string, { inFlight?: number; queued?: number; maxConcurrent?: number; ratePerSec?: number; throttled?: number }>;
  budgetRefusals?: number;
}


function readBudgets(text: string): Pick<DaemonState, 'budgets' | 'budgetRefusals'> {
  const labelled = (name: string, labels: string) => readMetric(text, `${name}\\{${labels}\\}`);
  const budgets: NonNullable<DaemonState['budgets']> = {};
  for (const u of upstreams) {
    const queued = ['first', 'refresh'].map((kind) => labelled('nmi_upstream_queue_depth', `upstream="${u}",kind="${kind}"`));
    budgets[u] = {
      inFlight: labelled('nmi_upstream_in_flight', `upstream="${u}"`),
      queued: queued.every((q) => q === undefined) ? undefined : queued.reduce((a: number, q) => a + (q ?? 0), 0),
      maxConcurrent: labelled('nmi_upstream_budget_limit', `upstream="${u}",limit="concurrent"`),
      ratePerSec: labelled('nmi_upstream_budget_limit', `upstream="${u}",limit="rate"`),
      throttled: labelled('nmi_upstream_throttled_total', `upstream="${u}"`),
    };
  }
  const refusals = throttleReasons.map((reason) => labelled('nmi_budget_refusals_total', `reason="${reason}"`));
  return { budgets, budgetRefusals: refusals.every((r) => r === undefined) ? undefined : refusals.reduce((a: number, r) => a + (r ?? 0), 0) };
}

async function probeDaemon(address: HostPort): Promise<DaemonState> {
  const base = probeUrl(address, '');
  const state: DaemonState = { address: base, answering: false };
  try {
    const readyz = await request(`${base}/readyz`, { headersTimeout: 2000, bodyTimeout: 2000 });
    state.readiness = (await readyz.body.text()).trim();
    state.ready = readyz.statusCode === 200;
    state.answering = true;
    const metrics = await request(`${base}/metrics`, { headersTimeout: 2000, bodyTimeout: 2000 });
    const text = await metrics.body.text();
    state.podsIndexed = readMetric(text, 'nmi_pods_indexed');
    state.tokensCached = readMetric(text, 'nmi_tokens_cached');
    state.ruleRepairs = readMetric(text, 'nmi_rule_repairs_total');
    Object.assign(state, readBudgets(text));
  } catch {
    // no daemon there: the rules alone are still worth showing
  }
  return state;
}

export async function status(options: { json: boolean; probeAddress: HostPort }): Promise<number> {
  const backends: BackendStatus[] = [];
  const errors: string[] = [];
  for (const backend of presentBackends()) {
    try {
      backends.push(await backend.status());
    } catch (err) {
      errors.push(`${backend.name}: ${messageOf(err)}`);
    }
  }
  const daemon = await probeDaemon(options.probeAddress);
  if (options.json) {
    process.stdout.write(`${JSON.stringify({ backends, daemon, errors }, null, 2)}\n`);
    return errors.length === 0 ? 0 : 1;
  }
  for (const b of backends) {
    // The eBPF backend's backstop is looked for with every tool present; absent, it is no news.
    if (!b.installed && b.backend.startsWith(BACKSTOP_TITLE)) continue;
    process.stdout.write(`${b.backend}: ${b.installed ? 'installed' : 'not installed'}\n`);
    for (const r of b.rules) process.stdout.write(`  ${String(r.packets).padStart(10)} pkts ${String(r.bytes).padStart(12)} bytes  ${r.text}\n`);
  }
  if (!daemon.answering) process.stdout.write(`daemon: not answering on ${daemon.address}\n`);
  else {
    process.stdout.write(`daemon: ${daemon.ready ? 'ready' : `not ready (${daemon.readiness})`} on ${daemon.address}\n`);
    const show = (label: string, value: number | undefined) => value !== undefined && process.stdout.write(`  ${label}: ${value}\n`);
    show('pods indexed', daemon.podsIndexed);
    show('tokens cached', daemon.tokensCached);
    show('rule repairs', daemon.ruleRepairs);
    for (const [upstream, b] of Object.entries(daemon.budgets ?? {})) {
      if (b.maxConcurrent === undefined) continue;
      const per = upstream === 'entra' ? ' per tenant' : '';
      process.stdout.write(`  budget ${upstream}: ${b.inFlight ?? 0}/${b.maxConcurrent} in flight, ${b.queued ?? 0} queued, ${b.ratePerSec}/s${per}; 429s from it: ${b.throttled ?? 0}\n`);
    }
    show('refused by budget', daemon.budgetRefusals);
  }
  for (const e of errors) process.stderr.write(`nmi status: ${e}\n`);
  return errors.length === 0 ? 0 : 1;
}
