// Issue 16's benchmark: what a pod asking for its token every 5 ms, each time on
// a new connection, sees while nmi is restarted, side by side in one run:
//   plain restart   SIGTERM, then a new `nmi run` binding its own sockets (before)
//   (a) in turn     the same, the listeners held as systemd's fd store holds them
//   (b) handoff     a new `nmi run --take-over` beside the running one, then SIGTERM to the old
//   plain crash     SIGKILL, 1 s (systemd's RestartSec), a new `nmi run` binding its own
//   (c) crash       the same, the listeners held as systemd's fd store holds them
// Each scenario runs --rounds times; printed (medians of the rounds): failed requests,
// refused connections, the longest single request, and the longest stretch between two
// answers (what a pod that retries on failure waits), with its ratio to the baseline.
//
//   sudo node dist/bench/restart.js [--rounds 3]
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { createCluster, crd, type Cluster } from '../test/harness/cluster.js';
import type { NmiProcess, StartOptions } from '../test/harness/nmi-process.js';
import { failures, HeldSockets, steadyAcross } from '../test/harness/restarts.js';

const { values } = parseArgs({ options: { rounds: { type: 'string', default: '3' } } });
const rounds = Number(values.rounds);
if (!Number.isInteger(rounds) || rounds < 1) {
  process.stderr.write('bench/restart: --rounds must be a positive integer\n');
  process.exit(2);
}
if (process.getuid?.() !== 0) {
  process.stderr.write('bench/restart: needs root (network namespaces, iptables)\n');
  process.exit(2);
}

interface Outcome {
  failed: number;
  refused: number;
  longestMs: number;
  longestGapMs: number;
}

const cluster: Cluster = await createCluster();
const held = new HeldSockets();
try {
  cluster.writeBindings([crd.userAssigned('id-a', '11111111-1111-1111-1111-111111111111', '/subscriptions/s/x/a'), crd.binding('bind-a', 'id-a', 'a')]);
  const agent = await cluster.addPod({ name: 'app', labels: { aadpodidbinding: 'a' } }).ns.agent();
  const handoffSocket = `${cluster.bindingsDir}-handoff.sock`;
  const start = (options: StartOptions = {}, extra: string[] = []) =>
    cluster.startNmi(['--on-exit', 'keep', '--handoff-socket', handoffSocket, ...extra], options);
  const stored = () => ({ listenFds: held.get(cluster.node.nodeIp) });

  /** One round: a first nmi started with `first`, then `act` on it while the pod asks; the survivor is stopped after. */
  async function round(first: () => Promise<NmiProcess>, act: (nmi: NmiProcess) => Promise<NmiProcess>): Promise<Outcome> {
    let nmi = await first();
    const { counts, longestMs, longestGapMs } = await steadyAcross(agent, () => 0, async () => {
      nmi = await act(nmi);
    });
    await nmi.stop('SIGTERM');
    return { failed: failures(counts), refused: counts['error:ECONNREFUSED'] ?? 0, longestMs, longestGapMs };
  }

  const inTurn = (options: () => StartOptions) => async (nmi: NmiProcess) => {
    await nmi.stop('SIGTERM');
    return start(options());
  };
  const crash = (options: () => StartOptions) => async (nmi: NmiProcess) => {
    await nmi.stop('SIGKILL');
    await sleep(1_000);
    return start(options());
  };
  const handoff = async (old: NmiProcess) => {
    const fresh = await start({}, ['--take-over']);
    await old.stop('SIGTERM');
    return fresh;
  };

  const scenarios: { name: string; baseline?: string; run: () => Promise<Outcome> }[] = [
    { name: 'plain restart', run: () => round(() => start(), inTurn(() => ({}))) },
    { name: 'plain crash', run: () => round(() => start(), crash(() => ({}))) },
    { name: '(b) handoff', baseline: 'plain restart', run: () => round(() => start(), handoff) },
    { name: '(a) in turn', baseline: 'plain restart', run: () => round(() => start(stored()), inTurn(stored)) },
    { name: '(c) crash', baseline: 'plain crash', run: () => round(() => start(stored()), crash(stored)) },
  ];
  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
  const results = new Map<string, Outcome>();
  for (const scenario of scenarios) {
    const outcomes: Outcome[] = [];
    for (let i = 0; i < rounds; i++) outcomes.push(await scenario.run());
    results.set(scenario.name, {
      failed: median(outcomes.map((o) => o.failed)),
      refused: median(outcomes.map((o) => o.refused)),
      longestMs: median(outcomes.map((o) => o.longestMs)),
      longestGapMs: median(outcomes.map((o) => o.longestGapMs)),
    });
    process.stderr.write(`${scenario.name}: ${JSON.stringify(outcomes)}\n`);
  }
  held.drop();

  const rows = [['scenario', 'failed', 'refused', 'longest request ms', 'longest without an answer ms', 'without an answer × baseline']];
  for (const scenario of scenarios) {
    const r = results.get(scenario.name)!;
    const base = scenario.baseline ? results.get(scenario.baseline) : undefined;
    const ratio = base ? `${(r.longestGapMs / base.longestGapMs).toFixed(2)} × ${scenario.baseline}` : '';
    rows.push([scenario.name, String(r.failed), String(r.refused), String(r.longestMs), String(r.longestGapMs), ratio]);
  }
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((row) => row[i]!.length)));
  for (const row of rows) process.stdout.write(`${row.map((cell, i) => cell.padEnd(widths[i]!)).join('  ')}\n`);
  process.stdout.write(`medians of ${rounds} rounds; each round a pod asking every 5 ms on new connections for 5 s\n`);
  await agent.close();
} finally {
  held.drop();
  await cluster.close();
}
