// Issue 27's hostile callers (test/e2e/hostile.test.ts, the image test, bench/hostile.ts):
// the attacks, run from a pod namespace by hostile-client.ts; nmi's memory sampled
// while one runs; and another pod asking for its token meanwhile.
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { crd, TOKEN_URL, type Cluster, type ClusterPod } from './cluster.js';
import { projectRoot, type PodAgent, type PodNs } from './netns.js';
import type { ImdsStandin, StandinRequest } from '../standins/imds.js';
import type { Attack, AttackResult } from './hostile-client.js';

export type * from './hostile-client.js';

const MGMT = 'https://management.azure.com/';
/** The token every bound pod of these tests asks for: a cache hit once one pod has. */
export const TOKEN_QUERY = `${TOKEN_URL}?api-version=2018-02-01&resource=${encodeURIComponent(MGMT)}`;
const TOKEN_TARGET = TOKEN_QUERY.slice('http://169.254.169.254'.length);
/** The DaemonSet's memory limit (deploy/base/daemonset.yaml). */
export const LIMIT_KIB = 128 * 1024;

/** Issue 27's attacks; `from` says whose namespace runs each: a bound pod's, or a stranger's (an address no pod of the node has). */
export const attacks = {
  a: { label: 'answers never read', from: 'bound', attack: { kind: 'unread', target: TOKEN_TARGET, durationMs: 10_000 } },
  b: {
    label: '1 MiB bodies, token path',
    from: 'stranger',
    attack: { kind: 'requests', connections: 8, perConnection: 32, durationMs: 15_000, requests: [{ method: 'GET', target: TOKEN_TARGET, bodyBytes: 1 << 20 }] },
  },
  c: {
    label: 'stranger, proxied paths',
    from: 'stranger',
    attack: {
      kind: 'requests', connections: 2, perConnection: 16, durationMs: 10_000,
      requests: [
        { method: 'GET', target: '/metadata/instance?api-version=2021-02-01', bodyBytes: 0 },
        { method: 'POST', target: '/metadata/scheduledevents?api-version=2020-07-01', bodyBytes: 64 },
      ],
    },
  },
  // 64 is --max-connections-per-source's default.
  d: { label: '64 + 4 connections', from: 'bound', attack: { kind: 'connections', target: TOKEN_TARGET, held: 64, extra: 4, holdMs: 4_000 } },
  e: { label: 'streaming past Connection: close', from: 'bound', attack: { kind: 'close-then-stream', target: TOKEN_TARGET, durationMs: 8_000 } },
} as const satisfies Record<string, { label: string; from: 'bound' | 'stranger'; attack: Attack }>;
export type AttackName = keyof typeof attacks;

const client = path.join(projectRoot, 'dist', 'test', 'harness', 'hostile-client.js');

/** Runs `attack` from the pod's namespace; aborting `signal` kills it (resolving undefined). */
export async function attackFrom<R extends AttackResult>(pod: Pick<PodNs, 'name'>, attack: Attack, signal?: AbortSignal): Promise<R | undefined> {
  try {
    // `ip netns exec` execs node, so the signal reaches the client itself.
    const { stdout } = await promisify(execFile)('ip', ['netns', 'exec', pod.name, process.execPath, client, JSON.stringify(attack), pod.name], { encoding: 'utf8', signal, timeout: 60_000 });
    return JSON.parse(stdout) as R;
  } catch (err) {
    if (signal?.aborted) return undefined;
    throw err;
  }
}

export interface RssSeen {
  /** The largest VmRSS sampled. */
  peakKiB: number;
  /** VmHWM once the run is over: the process's peak, start included. */
  hwmKiB: number;
  /** The process ended meanwhile (killed for memory, say). */
  died: boolean;
  /** Set when the run was stopped for going past the ceiling: the VmRSS that did it, and when. */
  stoppedAtKiB?: number;
  stoppedAfterMs?: number;
}

function statusKiB(pid: number, field: 'VmRSS' | 'VmHWM'): number | undefined {
  try {
    const kib = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1];
    return kib === undefined ? undefined : Number(kib); // a zombie has no memory lines: as good as gone
  } catch {
    return undefined; // gone
  }
}

/**
 * Runs `run` while sampling `pid`'s VmRSS every 100 ms. Past `ceilingKiB` the run is
 * aborted through its signal: the machine is shared, and an unbounded buffer grows by
 * gigabytes in seconds.
 */
export async function sampleRss<T>(pid: number, run: (signal: AbortSignal) => Promise<T>, ceilingKiB = 1024 * 1024): Promise<{ result: T; rss: RssSeen }> {
  const stop = new AbortController();
  const rss: RssSeen = { peakKiB: statusKiB(pid, 'VmRSS') ?? 0, hwmKiB: 0, died: false };
  const started = Date.now();
  let running = true;
  const sampler = (async () => {
    while (running) {
      const kib = statusKiB(pid, 'VmRSS');
      if (kib === undefined) {
        rss.died = true;
        return;
      }
      rss.peakKiB = Math.max(rss.peakKiB, kib);
      if (kib > ceilingKiB && !stop.signal.aborted) {
        rss.stoppedAtKiB = kib;
        rss.stoppedAfterMs = Date.now() - started;
        stop.abort();
      }
      await sleep(100);
    }
  })();
  try {
    return { result: await run(stop.signal), rss };
  } finally {
    running = false;
    await sampler;
    rss.hwmKiB = statusKiB(pid, 'VmHWM') ?? rss.peakKiB;
  }
}

export interface Meanwhile {
  /** By status, or `error:<code>`. */
  counts: Record<string, number>;
  longestMs: number;
}

/** Runs `run` while `other` (another bound pod) asks for its token every 100 ms, each on a new connection. */
export async function tokenMeanwhile<T>(other: PodAgent, run: () => Promise<T>): Promise<{ result: T; other: Meanwhile }> {
  const seen: Meanwhile = { counts: {}, longestMs: 0 };
  let running = true;
  const asking = (async () => {
    while (running) {
      const r = await other.http(TOKEN_QUERY, { headers: { Metadata: 'true' } });
      const key = r.error ? `error:${r.error}` : String(r.status);
      seen.counts[key] = (seen.counts[key] ?? 0) + 1;
      seen.longestMs = Math.max(seen.longestMs, Math.round(r.ms ?? 0));
      await sleep(100);
    }
  })();
  try {
    return { result: await run(), other: seen };
  } finally {
    running = false;
    await asking;
  }
}

/** What reaches the IMDS stand-in from now on: call the returned function once the attack is over. */
export function upstreamFromNow(imds: Pick<ImdsStandin, 'requests'>): () => StandinRequest[] {
  // By identity: its record keeps the last 100, so counting by index would miss what shifted out.
  const before = new Set(imds.requests);
  return () => imds.requests.filter((r) => !before.has(r));
}

/** A node's pods for the attacks: the attacker and another pod, both bound to one identity, and a stranger. */
export interface HostileNode {
  attacker: ClusterPod;
  stranger: ClusterPod;
  /** The attacker's agent, for its token before an attack. */
  attackerAgent: PodAgent;
  other: PodAgent;
  close(): Promise<void>;
}

export async function hostileNode(cluster: Cluster): Promise<HostileNode> {
  const attacker = cluster.addPod({ name: 'attacker', labels: { aadpodidbinding: 'a' } });
  const otherPod = cluster.addPod({ name: 'other', labels: { aadpodidbinding: 'a' } });
  const stranger = cluster.addPod({ name: 'stranger', listed: false });
  cluster.writeBindings([
    crd.userAssigned('id-a', '11111111-1111-1111-1111-111111111111', '/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a'),
    crd.binding('bind-a', 'id-a', 'a'),
  ]);
  const [attackerAgent, other] = await Promise.all([attacker.ns.agent(), otherPod.ns.agent()]);
  return {
    attacker, stranger, attackerAgent, other,
    close: async () => void (await Promise.all([attackerAgent.close(), other.close()])),
  };
}

export interface Seen<R> {
  /** undefined when the attack was stopped at the RSS ceiling. */
  result: R | undefined;
  rss: RssSeen;
  meanwhile: Meanwhile;
  /** What reached the IMDS stand-in, as `<method> <path>`. */
  upstream: string[];
}

/**
 * An attack (or `idle`: as long a wait) against the nmi whose pid is given, once both bound
 * pods got their token (cached from then on): its RSS sampled, the other pod asking meanwhile.
 */
export async function runAttack<R extends AttackResult>(node: HostileNode, cluster: Cluster, pid: number, name: AttackName | 'idle'): Promise<Seen<R>> {
  for (const agent of [node.other, node.attackerAgent]) {
    const r = await agent.http(TOKEN_QUERY, { headers: { Metadata: 'true' } });
    if (r.status !== 200) throw new Error(`no token before the attack: ${r.status} ${r.body}`);
  }
  const upstream = upstreamFromNow(cluster.imds);
  const run = (signal: AbortSignal): Promise<R | undefined> => {
    if (name === 'idle') return sleep(attacks.a.attack.durationMs, undefined, { signal }).catch(() => undefined);
    const { from, attack } = attacks[name];
    return attackFrom<R>((from === 'bound' ? node.attacker : node.stranger).ns, attack, signal);
  };
  const { result: { result, other: meanwhile }, rss } = await sampleRss(pid, (signal) => tokenMeanwhile(node.other, () => run(signal)));
  return { result, rss, meanwhile, upstream: upstream().map((r) => `${r.method} ${r.path}`) };
}

export function mib(kib: number): string {
  return `${(kib / 1024).toFixed(1)} MiB`;
}
