// The iptables backend: chain aad-metadata in nat, jumped to first from
// PREROUTING. State is read with iptables-save, the wanted state rendered by pure
// functions and applied by one `iptables-restore --noflush -w` transaction, so a
// repair never leaves a moment with the chain empty or the jump missing.
import { readFileSync } from 'node:fs';
import { NmiError, codes, messageOf } from '../errors/errors.js';
import { exec, execOk, which } from './exec.js';
import { CHAIN, type BackendStatus, type EnsureResult, type InstalledRule, type Redirect, type RulesBackend } from './redirect.js';

/** Seconds to wait for the xtables lock: crash loops on a held lock are a peer's bug, not ours. */
const LOCK_WAIT_SECONDS = '10';

export interface NatRule {
  chain: string;
  /** The rule as iptables-save prints it after `-A <chain> `. */
  spec: string;
  packets: number;
  bytes: number;
}

export interface NatState {
  chains: Set<string>;
  rules: NatRule[];
}

/** Parses `iptables-save [-c] -t <table>` (nat unless said). */
export function parseNat(text: string, table = 'nat'): NatState {
  const chains = new Set<string>();
  const rules: NatRule[] = [];
  let inNat = false;
  for (const line of text.split('\n')) {
    if (line.startsWith('*')) inNat = line === `*${table}`;
    if (!inNat) continue;
    if (line.startsWith(':')) chains.add(line.slice(1).split(' ')[0] as string);
    const m = /^(?:\[(\d+):(\d+)\] )?-A (\S+) (.*)$/.exec(line);
    if (m) rules.push({ chain: m[3] as string, spec: m[4] as string, packets: Number(m[1] ?? 0), bytes: Number(m[2] ?? 0) });
  }
  return { chains, rules };
}

export function dnatSpec(r: Redirect): string {
  return `-d ${r.metadataIp}/32 -p tcp -m tcp --dport ${r.metadataPort} -j DNAT --to-destination ${r.targetIp}:${r.targetPort}`;
}

/** A chain of nmi's own holding one rule, jumped to first from PREROUTING: the redirect, or the eBPF backend's backstop (backstop.ts). */
export interface IptablesRules {
  table: 'nat' | 'raw';
  chain: string;
  spec(r: Redirect): string;
  /** What `nmi status` and `nmi cleanup` call it, when it is not the iptables backend's redirect. */
  title?: string;
}

export const redirectRules: IptablesRules = { table: 'nat', chain: CHAIN, spec: dnatSpec };

function jumpsTo(state: NatState, chain: string): NatRule[] {
  return state.rules.filter((rule) => rule.spec === `-j ${chain}` || rule.spec.endsWith(` -j ${chain}`));
}

/** True when the installed state is exactly the wanted one. */
export function isCurrent(state: NatState, r: Redirect, { chain, spec } = redirectRules): boolean {
  const chainRules = state.rules.filter((rule) => rule.chain === chain).map((rule) => rule.spec);
  const prerouting = state.rules.filter((rule) => rule.chain === 'PREROUTING');
  return (
    state.chains.has(chain) &&
    chainRules.length === 1 &&
    chainRules[0] === spec(r) &&
    prerouting[0]?.spec === `-j ${chain}` &&
    jumpsTo(state, chain).length === 1
  );
}

/** One transaction that turns any state into the wanted one. Declaring the chain flushes it in the same commit. */
export function renderEnsure(state: NatState, r: Redirect, { table, chain, spec } = redirectRules): string {
  const lines = [`*${table}`, `:${chain} - [0:0]`, `-A ${chain} ${spec(r)}`];
  for (const rule of jumpsTo(state, chain)) lines.push(`-D ${rule.chain} ${rule.spec}`);
  lines.push(`-I PREROUTING 1 -j ${chain}`, 'COMMIT', '');
  return lines.join('\n');
}

/** One transaction removing every jump to the chain, then the chain; empty when there is nothing. */
export function renderRemove(state: NatState, { table, chain } = redirectRules): string {
  const jumps = jumpsTo(state, chain);
  if (jumps.length === 0 && !state.chains.has(chain)) return '';
  const lines = [`*${table}`];
  for (const rule of jumps) lines.push(`-D ${rule.chain} ${rule.spec}`);
  if (state.chains.has(chain)) lines.push(`-F ${chain}`, `-X ${chain}`);
  lines.push('COMMIT', '');
  return lines.join('\n');
}

/** One iptables flavour's tools. */
export interface IptablesTools {
  /** `iptables`, or the flavour's name when both are installed. */
  label: string;
  save: string;
  restore: string;
  /** Known for the named flavours; the plain commands say theirs in `--version`. */
  legacy?: boolean;
}

const plain: IptablesTools = { label: 'iptables', save: 'iptables-save', restore: 'iptables-restore' };
const flavours: IptablesTools[] = [
  { label: 'iptables-nft', save: 'iptables-nft-save', restore: 'iptables-nft-restore', legacy: false },
  { label: 'iptables-legacy', save: 'iptables-legacy-save', restore: 'iptables-legacy-restore', legacy: true },
];

/**
 * Whether this network namespace has an iptables-legacy table of that name. Asking
 * iptables-legacy about a table creates it, and from then on every
 * iptables-nft-save warns "iptables-legacy tables present"; the kernel lists
 * the tables that exist without creating any.
 */
function legacyTableExists(table: string): boolean {
  try {
    return readFileSync('/proc/net/ip_tables_names', 'utf8').split('\n').includes(table);
  } catch (err) {
    // No ip_tables in this kernel (or no /proc/net): there is no legacy table to read.
    return (err as NodeJS.ErrnoException).code !== 'ENOENT';
  }
}

/** The iptables tools on this host: both flavours when both are installed, else the plain commands, else none. */
export function installedTools(): IptablesTools[] {
  const both = flavours.filter((f) => which(f.save) !== undefined && which(f.restore) !== undefined);
  if (both.length === 2) return both;
  return which(plain.save) !== undefined && which(plain.restore) !== undefined ? [plain] : [];
}

function ruleCount(save: string): number {
  return save.split('\n').filter((line) => line.startsWith('-A ')).length;
}

/**
 * With both flavours installed (a container image on an unknown host), use the
 * one the host's kube-proxy writes to, as kube-proxy's own iptables-wrapper
 * decides: the flavour holding more rules; nft on a tie.
 */
export async function chooseTools(): Promise<IptablesTools | undefined> {
  const tools = installedTools();
  if (tools.length < 2) return tools[0];
  const counts = await Promise.all(tools.map(async (t) => ruleCount((await exec(t.save, [])).stdout)));
  return (counts[1] ?? 0) > (counts[0] ?? 0) ? tools[1] : tools[0];
}

export class IptablesBackend implements RulesBackend {
  readonly name = 'iptables' as const;
  private legacy: Promise<boolean> | undefined;
  private readonly label: string;
  constructor(
    readonly tools: IptablesTools,
    private readonly rules = redirectRules,
  ) {
    this.label = rules.title ? `${rules.title} (${tools.label})` : tools.label;
  }

  private isLegacy(): Promise<boolean> {
    const known = this.tools.legacy;
    this.legacy ??= known !== undefined ? Promise.resolve(known) : exec(this.tools.save, ['--version']).then((r) => /\(legacy\)/.test(r.stdout));
    return this.legacy;
  }

  async read(counters = false): Promise<NatState> {
    const { table } = this.rules;
    if ((await this.isLegacy()) && !legacyTableExists(table)) return { chains: new Set(), rules: [] };
    return parseNat(await execOk(this.tools.save, counters ? ['-c', '-t', table] : ['-t', table], '', codes.RULES_APPLY), table);
  }

  private async restore(text: string): Promise<void> {
    await execOk(this.tools.restore, ['-w', LOCK_WAIT_SECONDS, '--noflush'], text, codes.RULES_APPLY);
  }

  async ensure(r: Redirect): Promise<EnsureResult> {
    const rules = this.rules;
    let state = await this.read();
    if (isCurrent(state, r, rules)) return 'unchanged';
    const fresh = !state.chains.has(rules.chain) && jumpsTo(state, rules.chain).length === 0;
    try {
      await this.restore(renderEnsure(state, r, rules));
    } catch (err) {
      // Another writer changed the table between our read and our restore: read again, once.
      state = await this.read();
      if (isCurrent(state, r, rules)) return fresh ? 'installed' : 'repaired';
      await this.restore(renderEnsure(state, r, rules)).catch((again: unknown) => {
        throw new NmiError(codes.RULES_APPLY, `${this.label}: ${messageOf(again)}`, { cause: err });
      });
    }
    return fresh ? 'installed' : 'repaired';
  }

  async remove(): Promise<string[]> {
    const { table, chain } = this.rules;
    const state = await this.read();
    const text = renderRemove(state, this.rules);
    if (text === '') return [];
    await this.restore(text);
    const removed = jumpsTo(state, chain).map((rule) => `${this.label}: ${table} ${rule.chain} ${rule.spec}`);
    if (state.chains.has(chain)) removed.push(`${this.label}: ${table} chain ${chain} (${state.rules.filter((x) => x.chain === chain).length} rules)`);
    return removed;
  }

  async status(): Promise<BackendStatus> {
    const { table, chain } = this.rules;
    const state = await this.read(true);
    const rules: InstalledRule[] = [...jumpsTo(state, chain), ...state.rules.filter((rule) => rule.chain === chain)].map((rule) => ({
      text: `-t ${table} -A ${rule.chain} ${rule.spec}`,
      packets: rule.packets,
      bytes: rule.bytes,
    }));
    return { backend: this.label, installed: state.chains.has(chain), rules };
  }
}
