// nmi's benchmark (issue 4). Three modes:
//
//   node dist/bench/bench.js [--servers native,native-audit,js,node,c] [--paths loopback,pod,ebpf] [--trials 3] [--duration 8] [--warmup 2] [--connections 64] [--churn] [--cpu-prof DIR]
//     cache-hit throughput and latency of nmi's servers beside constant servers (servers.ts)
//   node dist/bench/bench.js --rss [--pods 250] [--identities 200] [--resources 5] [--token-bytes 2000] [--bindings kubernetes|file] [--servers native,js]
//     resident memory of the whole daemon with a full cache (rss.ts)
//   node dist/bench/bench.js --runtimes <node>[,<node>...] [--starts 5] [--rss-runs 1] [--trials 3] [the --rss flags] [--duration 8] [--warmup 2] [--connections 64]
//     the native server's start-up, memory and fast path on each node binary, against the first (runtimes.ts)
//
// See bench/README.md. The pod paths need root (network namespaces, iptables, eBPF).
import path from 'node:path';
import { parseArgs } from 'node:util';
import { benchRuntime, interrupt, running, say, type NmiServer } from './common.js';
import { ebpfPathUnsupported, runInPrivateMounts } from './pod-path.js';
import { printRss, runRss, type RssParams } from './rss.js';
import { parseRuntimes, runRuntimes, type RuntimesParams } from './runtimes.js';
import { PATHS, printThroughput, runThroughput, SERVERS, type PathName, type ServerName, type ThroughputParams } from './servers.js';

const options = {
  rss: { type: 'boolean', default: false },
  servers: { type: 'string' },
  paths: { type: 'string' },
  connections: { type: 'string', default: '64' },
  churn: { type: 'boolean', default: false },
  duration: { type: 'string', default: '8' },
  warmup: { type: 'string', default: '2' },
  trials: { type: 'string', default: '3' },
  'cpu-prof': { type: 'string' },
  pods: { type: 'string', default: '250' },
  identities: { type: 'string', default: '200' },
  resources: { type: 'string', default: '5' },
  'token-bytes': { type: 'string', default: '2000' },
  bindings: { type: 'string', default: 'kubernetes' },
  runtimes: { type: 'string' },
  starts: { type: 'string', default: '5' },
  'rss-runs': { type: 'string', default: '1' },
} as const;

const parse = (argv: string[]) => parseArgs({ args: argv, options }).values;
type Values = ReturnType<typeof parse>;

function count(name: string, text: string): number {
  const n = Number(text);
  if (!Number.isInteger(n) || n < 1) throw new Error(`--${name}: a whole number ≥ 1, got ${JSON.stringify(text)}`);
  return n;
}

/** A comma-separated subset of `allowed`, in the order given. */
function list<T extends string>(name: string, text: string, allowed: readonly T[]): T[] {
  const items = text.split(',').filter(Boolean);
  const wrong = items.filter((i) => !allowed.includes(i as T));
  if (wrong.length > 0 || items.length === 0) throw new Error(`--${name}: a comma-separated list of ${allowed.join(', ')}; got ${JSON.stringify(text)}`);
  return items as T[];
}

type Mode = { kind: 'rss'; params: RssParams } | { kind: 'throughput'; params: ThroughputParams } | { kind: 'runtimes'; params: RuntimesParams };

function rssParams(v: Values, servers: NmiServer[]): RssParams {
  return {
    pods: count('pods', v.pods),
    identities: count('identities', v.identities),
    resources: count('resources', v.resources),
    tokenBytes: count('token-bytes', v['token-bytes']),
    bindings: list<'kubernetes' | 'file'>('bindings', v.bindings, ['kubernetes', 'file'])[0]!,
    servers,
  };
}

/** The throughput flags but --servers and --paths. */
function loadParams(v: Values): Omit<ThroughputParams, 'servers' | 'paths'> {
  return {
    connections: count('connections', v.connections),
    churn: v.churn,
    durationS: count('duration', v.duration),
    warmupS: count('warmup', v.warmup),
    trials: count('trials', v.trials),
    cpuProfDir: v['cpu-prof'] === undefined ? undefined : path.resolve(v['cpu-prof']),
  };
}

function parseMode(argv: string[]): Mode {
  const v = parse(argv);
  if (v.runtimes !== undefined) {
    if (v.rss || v.servers !== undefined || v.paths !== undefined) throw new Error('--runtimes: measures the native server (and the C constant, on loopback): without --rss, --servers, --paths');
    const load = loadParams(v);
    return {
      kind: 'runtimes',
      params: {
        runtimes: parseRuntimes(v.runtimes),
        starts: count('starts', v.starts),
        rssRuns: count('rss-runs', v['rss-runs']),
        trials: load.trials,
        rss: rssParams(v, ['native']),
        throughput: { ...load, trials: 1, servers: ['native', 'c'], paths: ['loopback'] },
      },
    };
  }
  if (v.rss) return { kind: 'rss', params: rssParams(v, list<NmiServer>('servers', v.servers ?? 'native,js', ['native', 'js'])) };
  const root = process.getuid?.() === 0;
  const noEbpf = ebpfPathUnsupported();
  const paths = list<PathName>('paths', v.paths ?? (!root ? 'loopback' : noEbpf ? 'loopback,pod' : 'loopback,pod,ebpf'), PATHS);
  const needRoot = paths.find((p) => p !== 'loopback');
  if (needRoot && !root) throw new Error(`--paths ${needRoot} needs root (network namespaces, iptables, eBPF)`);
  if (paths.includes('ebpf') && noEbpf) throw new Error(`--paths ebpf: ${noEbpf}`);
  if (!root && v.paths === undefined) say('not root: loopback only (the pod paths need network namespaces, iptables, eBPF)');
  if (root && noEbpf && v.paths === undefined) say(`no ebpf path: ${noEbpf}`);
  const servers = list<ServerName>('servers', v.servers ?? SERVERS.join(','), SERVERS);
  // The constant servers answer what nmi answered first; nmi goes first.
  servers.sort((a, b) => SERVERS.indexOf(a) - SERVERS.indexOf(b));
  if (!servers.some((server) => server === 'native' || server === 'native-audit' || server === 'js')) throw new Error('--servers: include native, native-audit or js (the constant servers answer what nmi answered)');
  return { kind: 'throughput', params: { ...loadParams(v), servers, paths } };
}

/** Runs the mode; Ctrl-C or SIGTERM stops every process it started. */
async function measure(mode: Mode): Promise<number> {
  // A second signal (Ctrl-C twice, or one to each process of an unshare'd run) must not cut the clean-up short.
  const onSignal = () => {
    if (interrupt.signal.aborted) return;
    say('interrupted: stopping the servers and removing the namespaces');
    interrupt.abort();
    for (const stop of running) void stop();
  };
  process.on('SIGINT', onSignal).on('SIGTERM', onSignal);
  try {
    if (mode.kind === 'rss') printRss(mode.params, await runRss(mode.params, benchRuntime));
    else if (mode.kind === 'throughput') printThroughput(mode.params, await runThroughput(mode.params, benchRuntime));
    else await runRuntimes(mode.params);
    return 0;
  } catch (err) {
    if (interrupt.signal.aborted) return 130;
    throw err;
  } finally {
    process.off('SIGINT', onSignal).off('SIGTERM', onSignal);
  }
}

async function main(argv: string[]): Promise<number> {
  try {
    const mode = parseMode(argv);
    // Its pins must not meet another nmi's: with the ebpf path the bench runs again in a mount namespace of its own.
    const code = mode.kind === 'throughput' && mode.params.paths.includes('ebpf') ? await runInPrivateMounts() : undefined;
    return code ?? (await measure(mode));
  } catch (err) {
    process.stderr.write(`nmi bench: ${(err as Error).message}\n`);
    return 1;
  }
}

process.exitCode = await main(process.argv.slice(2));
