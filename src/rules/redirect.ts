// What the rules do, independent of the backend that installs them.
export const CHAIN = 'aad-metadata';
export const NFT_TABLE = 'aad-metadata';
export const NFT_CHAIN = 'prerouting';
/** Before iptables' nat (-100), so our DNAT decides first. */
export const NFT_PRIORITY = -101;

export interface Redirect {
  metadataIp: string;
  metadataPort: number;
  targetIp: string;
  targetPort: number;
}

export type EnsureResult = 'unchanged' | 'installed' | 'repaired';

/** One rule as `nmi status` shows it. */
export interface InstalledRule {
  text: string;
  packets: number;
  bytes: number;
}

export interface BackendStatus {
  backend: string;
  installed: boolean;
  rules: InstalledRule[];
}

export interface RulesBackend {
  readonly name: 'iptables' | 'nftables' | 'ebpf' | 'none';
  /** Makes the installed rules exactly the wanted ones, in one transaction; says what it had to do. */
  ensure(redirect: Redirect): Promise<EnsureResult>;
  /** Removes everything this backend may have installed; returns a line per removed thing. */
  remove(): Promise<string[]>;
  status(): Promise<BackendStatus>;
}
