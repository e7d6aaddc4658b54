// Issue 17's benchmark: one pod floods IMDS through nmi with distinct resources
// (48 at a time, round and round), and 1 s into the flood a second pod asks for
// its first token. Side by side in one run, against a stand-in IMDS that
// throttles as IMDS documents (429 past 5 concurrent or 20 per second, --latency-ms
// per call):
//   quiet        the second pod's first token, no flood
//   flood        the same 1 s into a flood, nmi's budget at its defaults
//   flood, off   the same with the budget opened up (limits far above IMDS's: nmi as it was)
// Printed: the second pod's first-token latency (p50/p99 over --trials, each a
// fresh flooding pod and a fresh resource), upstream calls per second during the
// flood, upstream 429s, and the flood's answers; the goal: flood p99 within 2x of
// quiet p99, and 0 upstream 429s.
//
//   sudo node dist/bench/budget.js [--trials 15] [--latency-ms 100] [--flood-ms 3000]
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { createCluster, crd, TOKEN_URL, type Cluster } from '../test/harness/cluster.js';
import type { PodAgent } from '../test/harness/netns.js';
import type { NmiProcess } from '../test/harness/nmi-process.js';
import { positiveFlags } from './common.js';

const { values } = parseArgs({
  options: {
    trials: { type: 'string', default: '15' },
    'latency-ms': { type: 'string', default: '100' },
    'flood-ms': { type: 'string', default: '3000' },
  },
});
const { trials, 'latency-ms': latencyMs, 'flood-ms': floodMs } = positiveFlags('budget', values, ['trials', 'latency-ms', 'flood-ms']);

const META = { Metadata: 'true' };
const url = (resource: string) => `${TOKEN_URL}?api-version=2018-02-01&resource=${encodeURIComponent(resource)}`;
const OPEN = ['--imds-max-concurrent', '100000', '--imds-max-rate', '100000/s', '--max-pending-per-pod', '100000', '--max-tokens-per-pod', '100000'];

interface Sample {
  firstTokenMs: number;
  upstreamPerSec: number;
  upstream429: number;
  floodAnswers: Record<string, number>;
}

const cluster: Cluster = await createCluster({ imds: { throttle: { maxConcurrent: 5, perSecond: 20, latencyMs } } });
const agents: PodAgent[] = [];
let serial = 0;
try {
  cluster.writeBindings([
    crd.userAssigned('flood', '11111111-0000-0000-0000-000000000000', '/subscriptions/s/x/flood'),
    crd.binding('bind-flood', 'flood', 'flood'),
    crd.userAssigned('second', '22222222-0000-0000-0000-000000000000', '/subscriptions/s/x/second'),
    crd.binding('bind-second', 'second', 'second'),
  ]);
  const second = await cluster.addPod({ name: 'second', labels: { aadpodidbinding: 'second' } }).ns.agent();
  agents.push(second);

  async function firstToken(): Promise<number> {
    const r = await second.http(url(`https://first-${++serial}.example`), { headers: META });
    if (r.status !== 200) throw new Error(`the second pod got ${r.status}: ${r.body}`);
    return r.ms!;
  }

  async function quiet(): Promise<Sample> {
    return { firstTokenMs: await firstToken(), upstreamPerSec: 0, upstream429: 0, floodAnswers: {} };
  }

  async function flood(): Promise<Sample> {
    // A fresh pod each time: a pod past its bounds is refused at once and floods no more.
    const pod = cluster.addPod({ name: `flood-${++serial}`, labels: { aadpodidbinding: 'flood' } });
    const agent = await pod.ns.agent();
    agents.push(agent);
    const throttled = cluster.imds.throttle!.throttled;
    const calls = cluster.imds.calls;
    const started = Date.now();
    const resources = Array.from({ length: 300 }, (_, i) => url(`https://${pod.name}-${i}.example`));
    const answers = agent.many(resources, 48, META, floodMs);
    await sleep(1_000);
    const firstTokenMs = await firstToken();
    const { counts } = await answers;
    const seconds = (Date.now() - started) / 1000;
    await agent.close();
    return { firstTokenMs, upstreamPerSec: (cluster.imds.calls - calls) / seconds, upstream429: cluster.imds.throttle!.throttled - throttled, floodAnswers: counts };
  }

  const samples: Record<string, Sample[]> = { quiet: [], flood: [], 'flood, off': [] };
  let nmi: NmiProcess = await cluster.startNmi();
  for (let i = 0; i < trials; i++) {
    samples.quiet!.push(await quiet());
    samples.flood!.push(await flood());
    // IMDS's window empties before the next trial, as between two floods.
    await sleep(1_100);
  }
  await nmi.stop('SIGTERM');
  nmi = await cluster.startNmi(OPEN);
  for (let i = 0; i < Math.min(trials, 5); i++) {
    samples['flood, off']!.push(await flood());
    await sleep(1_100);
  }
  await nmi.stop('SIGTERM');

  const pct = (xs: number[], p: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.ceil((p / 100) * xs.length) - 1)]!;
  const quietP99 = pct(samples.quiet!.map((s) => s.firstTokenMs), 99);
  const rows = Object.entries(samples).map(([name, list]) => {
    const ms = list.map((s) => s.firstTokenMs);
    const answers: Record<string, number> = {};
    for (const s of list) for (const [k, n] of Object.entries(s.floodAnswers)) answers[k] = (answers[k] ?? 0) + n;
    return {
      name,
      p50: pct(ms, 50),
      p99: pct(ms, 99),
      ratio: pct(ms, 99) / quietP99,
      perSec: list.reduce((a, s) => a + s.upstreamPerSec, 0) / list.length,
      upstream429: list.reduce((a, s) => a + s.upstream429, 0),
      answers: Object.entries(answers).map(([k, n]) => `${k}: ${n}`).join(', ') || '-',
      trials: list.length,
    };
  });
  process.stdout.write(`\nbench/budget: IMDS stand-in 5 concurrent, 20/s, ${latencyMs} ms a call; flood 48 at a time for ${floodMs} ms; ${trials} trials\n\n`);
  process.stdout.write('| scenario | trials | second pod first token p50 | p99 | p99 vs quiet | upstream calls/s | upstream 429s | flood pod answers |\n|---|---|---|---|---|---|---|---|\n');
  for (const r of rows) {
    process.stdout.write(`| ${r.name} | ${r.trials} | ${r.p50.toFixed(1)} ms | ${r.p99.toFixed(1)} ms | ${r.ratio.toFixed(2)}x | ${r.perSec.toFixed(1)} | ${r.upstream429} | ${r.answers} |\n`);
  }
  const budgeted = rows.find((r) => r.name === 'flood')!;
  const met = budgeted.ratio <= 2 && budgeted.upstream429 === 0;
  process.stdout.write(`\ngoal (flood p99 <= 2x quiet p99, 0 upstream 429s): ${met ? 'met' : 'NOT met'} (${budgeted.ratio.toFixed(2)}x, ${budgeted.upstream429} 429s)\n`);
} finally {
  await Promise.allSettled(agents.map((agent) => agent.close()));
  await cluster.close();
}
