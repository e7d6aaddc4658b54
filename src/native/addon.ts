// The one place the addon's surface is typed and loaded.
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import { NmiError, codes } from '../errors/errors.js';

export interface NftResult {
  ok: boolean;
  output: string;
  error: string;
}

export interface NativeAddon {
  /** null when libnftables is usable, else why not. */
  nftLoad(): string | null;
  /** Runs one nft transaction through libnftables in the caller's network namespace. */
  nftRun(commands: string, json: boolean): NftResult;
  /** Sends one sd_notify datagram; null on success, else the errno text. */
  sdNotify(socketPath: string, message: string): string | null;
  /** Moves the calling (main) thread into the network namespace at path; null on success. */
  setNetns(path: string): string | null;
}

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const candidates = ['build/Release/nmi.node', 'build/Debug/nmi.node'];
let loaded: NativeAddon | undefined;

export function addon(): NativeAddon {
  if (loaded) return loaded;
  const require = createRequire(import.meta.url);
  const errors: string[] = [];
  for (const candidate of candidates) {
    try {
      loaded = require(path.join(root, candidate)) as NativeAddon;
      return loaded;
    } catch (err) {
      errors.push(`${candidate}: ${(err as Error).message.split('\n')[0]}`);
    }
  }
  throw new NmiError(codes.NATIVE_LOAD, `Failed to load native module nmi.node, checked: ${errors.join('; ')}`);
}
