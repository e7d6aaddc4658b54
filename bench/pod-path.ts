// The pod path: a throwaway node namespace (the bench enters it, so every server
// and stand-in lives there) and one pod namespace joined to it, whose requests
// to 169.254.169.254:80 reach the server under test through nmi's own DNAT rule.
import { execFile } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import {
  createNodeNamespace,
  createPodNamespace,
  deleteNamespace,
  enterNamespace,
  listNamespaces,
  NODE_IP,
} from '../src/netns/netns.js';
import { chooseTools, IptablesBackend } from '../src/rules/iptables.js';
import type { Redirect } from '../src/rules/redirect.js';
import { interrupt } from './common.js';

export { NODE_IP };
export const NODE_NS = 'nmi-bench-node';
export const POD_NS = 'nmi-bench-pod';
export const METADATA_IP = '169.254.169.254';
/** nmi's default --port: where the DNAT rule sends pods. */
export const NMI_PORT = 2579;

const rawGetBin = path.join(path.dirname(fileURLToPath(import.meta.url)), 'raw-get.js');
const run = promisify(execFile);

/** Removes namespaces a killed bench left, creates the node and pod namespaces, enters the node; returns the pod's address. */
export function setUpNamespaces(): string {
  removeNamespaces();
  createNodeNamespace(NODE_NS);
  enterNamespace(NODE_NS);
  return createPodNamespace(NODE_NS, POD_NS, 1);
}

export function removeNamespaces(): void {
  for (const ns of listNamespaces()) if (ns.startsWith('nmi-bench-')) deleteNamespace(ns);
}

export interface RedirectRule {
  install(): Promise<void>;
  remove(): Promise<void>;
}

/**
 * The rule `nmi run --rules iptables` installs, installed by the same code (flavour
 * chosen the same way), for the trials of servers that install none themselves.
 */
export async function redirectRule(): Promise<RedirectRule> {
  const tools = await chooseTools();
  if (!tools) throw new Error('the pod path needs iptables (iptables-save and iptables-restore)');
  const backend = new IptablesBackend(tools);
  const redirect: Redirect = { metadataIp: METADATA_IP, metadataPort: 80, targetIp: NODE_IP, targetPort: NMI_PORT };
  return {
    install: async () => void (await backend.ensure(redirect)),
    remove: async () => void (await backend.remove()),
  };
}

/** One keep-alive token request from inside the pod, to the metadata address; the answer's bytes. */
export async function podGet(target: string): Promise<Buffer> {
  const { stdout } = await run('ip', ['netns', 'exec', POD_NS, process.execPath, rawGetBin, METADATA_IP, '80', target], {
    signal: interrupt.signal,
  }).catch((err: unknown) => {
    throw new Error(`request from the pod: ${String((err as { stderr?: string }).stderr ?? (err as Error).message).trim()}`);
  });
  return Buffer.from(stdout.trim(), 'base64');
}
