// The eBPF backend's netfilter backstop. connect4 sends every pod's connect()
// to the metadata address to nmi before a packet leaves the pod, so nothing a
// pod legitimately sends reaches the node's PREROUTING addressed to
// 169.254.169.254:80. What does was not made by connect(): a raw socket
// (NET_RAW is in most runtimes' default capabilities) or a frame forged on the
// bridge, and it would reach the real IMDS with the node's identities. It is
// dropped there, at raw priority (before conntrack: no entry for it, no NAT).
// The node's own processes and hostNetwork pods send through OUTPUT instead,
// and come back through PREROUTING only on lo, where the metadata address is
// the node's own (a stand-in's): lo is left alone, so nmi's own calls to the
// real IMDS are never dropped.
//
// Installed, verified and removed with the eBPF programs (ebpf.ts), by the same
// code as the redirect of the other backends, in a table or chain of its own:
// nft's table `ip aad-metadata-backstop` (never a rule in another's table), or,
// where nft is absent, iptables' raw table (the flavour kube-proxy uses).
import { chooseTools, installedTools, IptablesBackend, type IptablesRules } from './iptables.js';
import { metadataMatch as nftMatch, NftablesBackend, type NftRules } from './nftables.js';
import type { RulesBackend } from './redirect.js';

export const BACKSTOP = 'aad-metadata-backstop';
/** What status and cleanup call it, before the tool's name. */
export const BACKSTOP_TITLE = 'ebpf backstop';
/** NF_IP_PRI_RAW: before conntrack. */
const RAW_PRIORITY = -300;

export const nftBackstop: NftRules = {
  table: BACKSTOP,
  type: 'filter',
  priority: RAW_PRIORITY,
  expr: (r) => [
    { match: { op: '!=', left: { meta: { key: 'iifname' } }, right: 'lo' } },
    ...nftMatch(r),
    { counter: { packets: 0, bytes: 0 } },
    { drop: null },
  ],
  title: BACKSTOP_TITLE,
};

export const iptablesBackstop: IptablesRules = {
  table: 'raw',
  chain: BACKSTOP,
  // As iptables-save prints it, for the comparison that finds it changed.
  spec: (r) => `-d ${r.metadataIp}/32 ! -i lo -p tcp -m tcp --dport ${r.metadataPort} -j DROP`,
  title: BACKSTOP_TITLE,
};

/** The backstop `nmi run --rules ebpf` installs: nft's when nft is there (libnftables or the command), else iptables', else none. */
export async function chooseBackstop(): Promise<RulesBackend | undefined> {
  const nft = NftablesBackend.create(nftBackstop);
  if (nft) return nft;
  const tools = await chooseTools();
  return tools && new IptablesBackend(tools, iptablesBackstop);
}

/** Every place a backstop may be on this host (an nmi elsewhere may have chosen otherwise), for cleanup and status. */
export function presentBackstops(): RulesBackend[] {
  const backstops: RulesBackend[] = installedTools().map((tools) => new IptablesBackend(tools, iptablesBackstop));
  const nft = NftablesBackend.create(nftBackstop);
  if (nft) backstops.push(nft);
  return backstops;
}
