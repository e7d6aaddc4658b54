// `--rules` to a backend, and the list every clean-up walks.
import { UsageError } from '../errors/errors.js';
import type { RulesChoice } from '../config/commands.js';
import { presentBackstops } from './backstop.js';
import { EbpfBackend } from './ebpf.js';
import { chooseTools, IptablesBackend, installedTools } from './iptables.js';
import { NftablesBackend } from './nftables.js';
import type { BackendStatus, EnsureResult, Redirect, RulesBackend } from './redirect.js';

class NoRules implements RulesBackend {
  readonly name = 'none' as const;
  async ensure(_r: Redirect): Promise<EnsureResult> {
    return 'unchanged';
  }
  async remove(): Promise<string[]> {
    return [];
  }
  async status(): Promise<BackendStatus> {
    return { backend: this.name, installed: false, rules: [] };
  }
}

export async function selectBackend(choice: RulesChoice, cgroupRoot: string): Promise<RulesBackend> {
  switch (choice) {
    case 'none':
      return new NoRules();
    case 'ebpf':
      return EbpfBackend.forRun(cgroupRoot);
    case 'iptables': {
      const tools = await chooseTools();
      if (!tools) throw new UsageError('--rules: iptables requested but iptables-restore/iptables-save are not in PATH');
      return new IptablesBackend(tools);
    }
    case 'nftables': {
      const backend = NftablesBackend.create();
      if (!backend) throw new UsageError('--rules: nftables requested but neither libnftables nor the nft command is available');
      return backend;
    }
    case 'auto': {
      const tools = await chooseTools();
      if (tools) return new IptablesBackend(tools);
      const backend = NftablesBackend.create();
      if (!backend) throw new UsageError('--rules: auto found neither iptables nor nftables; install one or pass --rules none');
      return backend;
    }
  }
}

/**
 * Every backend present on this host (both iptables flavours when both are installed; eBPF when pinned), and
 * every place the eBPF backend's backstop may be (it stays when the pins are removed by hand), for cleanup and status.
 */
export function presentBackends(): RulesBackend[] {
  const backends: RulesBackend[] = installedTools().map((tools) => new IptablesBackend(tools));
  const nft = NftablesBackend.create();
  if (nft) backends.push(nft);
  backends.push(...presentBackstops());
  const ebpf = EbpfBackend.present();
  if (ebpf) backends.push(ebpf);
  return backends;
}
