// The nftables backend: nmi's own table `ip aad-metadata`, never a native rule in
// the `ip nat` table iptables-nft manages (that makes iptables-save drop the
// whole table and breaks kube-proxy). Rules are nftables JSON, applied in one
// transaction through libnftables (dlopen'ed by the addon) or `nft -j -f -`.
import { NmiError, codes } from '../errors/errors.js';
import { addon } from '../native/addon.js';
import { exec, which } from './exec.js';
import { NFT_CHAIN, NFT_PRIORITY, NFT_TABLE, type BackendStatus, type EnsureResult, type Redirect, type RulesBackend } from './redirect.js';

type Json = Record<string, unknown>;

/** Packets to the metadata address and port. */
export function metadataMatch(r: Redirect): Json[] {
  return [
    { match: { op: '==', left: { payload: { protocol: 'ip', field: 'daddr' } }, right: r.metadataIp } },
    { match: { op: '==', left: { payload: { protocol: 'tcp', field: 'dport' } }, right: r.metadataPort } },
  ];
}

export function ruleExpr(r: Redirect): Json[] {
  return [...metadataMatch(r), { counter: { packets: 0, bytes: 0 } }, { dnat: { addr: r.targetIp, port: r.targetPort } }];
}

/** A table of nmi's own holding one rule in one `prerouting` chain: the redirect, or the eBPF backend's backstop (backstop.ts). */
export interface NftRules {
  table: string;
  type: 'nat' | 'filter';
  priority: number;
  expr(r: Redirect): Json[];
  /** What `nmi status` and `nmi cleanup` call it, when it is not the nftables backend's redirect. */
  title?: string;
}

export const redirectRules: NftRules = { table: NFT_TABLE, type: 'nat', priority: NFT_PRIORITY, expr: ruleExpr };

/** Create-or-replace in one transaction: `add` makes delete safe when the table is absent. */
export function renderEnsure(r: Redirect, rules = redirectRules): Json {
  const table = { family: 'ip', name: rules.table };
  const chain = { family: 'ip', table: rules.table, name: NFT_CHAIN, type: rules.type, hook: 'prerouting', prio: rules.priority, policy: 'accept' };
  return {
    nftables: [
      { add: { table } },
      { delete: { table } },
      { add: { table } },
      { add: { chain } },
      { add: { rule: { family: 'ip', table: rules.table, chain: NFT_CHAIN, expr: rules.expr(r) } } },
    ],
  };
}

export function renderRemove(rules = redirectRules): Json {
  return { nftables: [{ delete: { table: { family: 'ip', name: rules.table } } }] };
}

interface ListedRule {
  chain: string;
  expr: Json[];
}

interface Listing {
  exists: boolean;
  chains: Json[];
  rules: ListedRule[];
}

export function parseListing(json: string): Listing {
  const items = (JSON.parse(json) as { nftables?: Json[] }).nftables ?? [];
  const chains = items.flatMap((item) => (item.chain ? [item.chain as Json] : []));
  const rules = items.flatMap((item) => (item.rule ? [item.rule as ListedRule] : []));
  return { exists: items.some((item) => item.table), chains, rules };
}

function withoutCounters(expr: Json[]): string {
  return JSON.stringify(expr.map((e) => ('counter' in e ? { counter: null } : e)));
}

export function isCurrent(listing: Listing, r: Redirect, rules = redirectRules): boolean {
  const [chain] = listing.chains;
  return (
    listing.chains.length === 1 &&
    chain?.name === NFT_CHAIN &&
    chain.type === rules.type &&
    chain.hook === 'prerouting' &&
    chain.prio === rules.priority &&
    listing.rules.length === 1 &&
    withoutCounters(listing.rules[0]?.expr ?? []) === withoutCounters(rules.expr(r))
  );
}

export type NftRunner = (commands: string) => Promise<{ ok: boolean; output: string; error: string }>;

/** libnftables when the addon can load it, else the nft command. */
export function defaultRunner(): NftRunner | undefined {
  try {
    if (addon().nftLoad() === null) return async (commands) => addon().nftRun(commands, true);
  } catch {
    // addon unusable: the command may still be there
  }
  if (which('nft') === undefined) return undefined;
  return async (commands) => {
    const args = commands.startsWith('{') ? ['-j', '-f', '-'] : ['-j', ...commands.split(' ')];
    const result = await exec('nft', args, commands.startsWith('{') ? commands : '');
    return { ok: result.code === 0, output: result.stdout, error: result.stderr };
  };
}

export class NftablesBackend implements RulesBackend {
  readonly name = 'nftables' as const;
  private readonly label: string;
  constructor(
    private readonly run: NftRunner,
    private readonly rules = redirectRules,
  ) {
    this.label = rules.title ? `${rules.title} (nftables)` : 'nftables';
  }

  static create(rules = redirectRules): NftablesBackend | undefined {
    const runner = defaultRunner();
    return runner ? new NftablesBackend(runner, rules) : undefined;
  }

  async read(): Promise<Listing> {
    const result = await this.run(`list table ip ${this.rules.table}`);
    if (!result.ok) {
      if (/No such file or directory/.test(result.error)) return { exists: false, chains: [], rules: [] };
      throw new NmiError(codes.RULES_APPLY, `nft list table ip ${this.rules.table}: ${result.error.trim().split('\n')[0]}`);
    }
    return parseListing(result.output);
  }

  private async apply(doc: Json): Promise<void> {
    const result = await this.run(JSON.stringify(doc));
    if (!result.ok) throw new NmiError(codes.RULES_APPLY, `nft: ${result.error.trim().split('\n')[0]}`);
  }

  async ensure(r: Redirect): Promise<EnsureResult> {
    const listing = await this.read();
    if (listing.exists && isCurrent(listing, r, this.rules)) return 'unchanged';
    await this.apply(renderEnsure(r, this.rules));
    return listing.exists ? 'repaired' : 'installed';
  }

  async remove(): Promise<string[]> {
    const listing = await this.read();
    if (!listing.exists) return [];
    await this.apply(renderRemove(this.rules));
    return [`${this.label}: table ip ${this.rules.table} (${listing.rules.length} rules)`];
  }

  async status(): Promise<BackendStatus> {
    const listing = await this.read();
    const rules = listing.rules.map((rule) => {
      const counter = rule.expr.find((e) => 'counter' in e)?.counter as { packets?: number; bytes?: number } | undefined;
      return { text: `table ip ${this.rules.table} chain ${rule.chain}: ${describeExpr(rule.expr)}`, packets: counter?.packets ?? 0, bytes: counter?.bytes ?? 0 };
    });
    return { backend: this.label, installed: listing.exists, rules };
  }
}

function describeExpr(expr: Json[]): string {
  return expr
    .map((e) => {
      const match = e.match as { op?: string; left?: { payload?: { protocol: string; field: string }; meta?: { key: string } }; right?: unknown } | undefined;
      const op = match?.op === '==' ? '' : `${match?.op} `;
      if (match?.left?.payload) return `${match.left.payload.protocol} ${match.left.payload.field} ${op}${String(match.right)}`;
      if (match?.left?.meta) return `${match.left.meta.key} ${op}${String(match.right)}`;
      const dnat = e.dnat as { addr?: string; port?: number } | undefined;
      if (dnat) return `dnat to ${dnat.addr}:${dnat.port}`;
      return Object.keys(e)[0];
    })
    .join(' ');
}
