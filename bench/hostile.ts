// Issue 27's benchmark: nmi's peak RSS (VmHWM) idle and under each hostile caller of
// test/harness/hostile.ts ((a) answers never read, (b) 1 MiB bodies on the token path,
// (c) a stranger on the proxied paths, (d) past the per-source connection cap), for each
// server. Every trial is a fresh nmi (start included in its peak, as in the DaemonSet)
// through the real iptables rule, as test/e2e/hostile.test.ts runs it, another pod
// asking for its token all along; idle waits as long as attack (a) lasts. Printed: the
// median VmHWM of the trials and its ratio to idle's in the same run.
//
//   sudo node dist/bench/hostile.js [--trials 3] [--servers native,js] [--attacks a,b,c,d]
import { loadavg } from 'node:os';
import { parseArgs } from 'node:util';
import { createCluster } from '../test/harness/cluster.js';
import { attacks, hostileNode, runAttack, type AttackName } from '../test/harness/hostile.js';
import { mib, positiveFlags, row, say, type NmiServer } from './common.js';

const { values } = parseArgs({
  options: {
    trials: { type: 'string', default: '3' },
    servers: { type: 'string', default: 'native,js' },
    attacks: { type: 'string', default: 'a,b,c,d' },
  },
});
const { trials } = positiveFlags('hostile', { trials: values.trials }, ['trials']);
function list<T extends string>(flag: string, value: string, known: readonly T[]): T[] {
  const items = value.split(',') as T[];
  const bad = items.filter((i) => !known.includes(i));
  if (bad.length > 0) {
    process.stderr.write(`bench/hostile: --${flag}: unknown ${bad.join(', ')} (known: ${known.join(', ')})\n`);
    process.exit(2);
  }
  return items;
}
const servers = list<NmiServer>('servers', values.servers, ['native', 'js']);
const scenarios: Array<AttackName | 'idle'> = ['idle', ...list('attacks', values.attacks, Object.keys(attacks) as AttackName[])];

/** VmHWM in KiB per `<server> <scenario>`, one per trial; `stopped` when a trial hit the RSS ceiling. */
const peaks = new Map<string, { hwmKiB: number[]; stopped: boolean }>();

const cluster = await createCluster();
const node = await hostileNode(cluster);
try {
  say('nmi bench hostile: peak RSS (VmHWM) of a fresh nmi, idle and under each attack');
  say(`  node ${process.version}; ${trials} trials; load average ${loadavg().map((l) => l.toFixed(2)).join(' ')}`);
  for (let trial = 0; trial < trials; trial++) {
    for (const server of servers) {
      for (const scenario of scenarios) {
        const nmi = await cluster.startNmi(['--server', server, '--log-level', 'warn']);
        try {
          const { rss, result, meanwhile } = await runAttack(node, cluster, nmi.child.pid!, scenario);
          const entry = peaks.get(`${server} ${scenario}`) ?? { hwmKiB: [], stopped: false };
          entry.hwmKiB.push(rss.hwmKiB);
          entry.stopped ||= rss.stoppedAtKiB !== undefined;
          peaks.set(`${server} ${scenario}`, entry);
          process.stderr.write(`trial ${trial + 1} ${server} ${scenario}: VmHWM ${mib(rss.hwmKiB)}${rss.stoppedAtKiB ? ' (stopped at the 1 GiB ceiling)' : ''}` +
            `${rss.died ? ' (nmi died)' : ''}; other pod ${JSON.stringify(meanwhile.counts)}; ${JSON.stringify(result)?.slice(0, 300)}\n`);
        } finally {
          await nmi.stop();
        }
      }
    }
  }
} finally {
  await node.close();
  await cluster.close();
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const widths = [36, ...servers.flatMap(() => [14, 8])];
say('');
say(row(['attack', ...servers.flatMap((s) => [`${s} VmHWM`, '× idle'])], widths));
for (const scenario of scenarios) {
  const label = scenario === 'idle' ? 'idle' : `(${scenario}) ${attacks[scenario].label}`;
  const cells = servers.flatMap((server) => {
    const { hwmKiB, stopped } = peaks.get(`${server} ${scenario}`)!;
    const idle = median(peaks.get(`${server} idle`)!.hwmKiB);
    // A trial stopped at the ceiling would have gone higher: its figure is a floor.
    return [`${stopped ? '≥' : ''}${mib(median(hwmKiB))}`, (median(hwmKiB) / idle).toFixed(2)];
  });
  say(row([label, ...cells], widths));
}
say(`medians of ${trials} trials; the DaemonSet's limit is 128 MiB; ≥: a trial reached the 1 GiB ceiling and its attack was stopped there`);
