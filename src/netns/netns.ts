// Throwaway network namespaces for `nmi demo` and the tests: a "node" with an
// uplink holding the node address and a default route, and "pods" joined to it
// by veth pairs, each pod on its own /24 with the node side as its gateway.
import { execFileSync } from 'node:child_process';
import { NmiError, codes, messageOf } from '../errors/errors.js';
import { addon } from '../native/addon.js';

export const NODE_IP = '10.240.0.4';
const GATEWAY = '10.240.0.1';

function ip(args: string[]): string {
  try {
    return execFileSync('ip', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (err) {
    const stderr = String((err as { stderr?: string }).stderr ?? '').trim();
    throw new NmiError(codes.NETNS, `ip ${args.join(' ')}: ${stderr || messageOf(err)}`);
  }
}

/** Runs a command in a namespace; returns its stdout. */
export function nsExec(ns: string, cmd: string, args: string[], input?: string): string {
  return execFileSync('ip', ['netns', 'exec', ns, cmd, ...args], { encoding: 'utf8', input, stdio: ['pipe', 'pipe', 'pipe'] });
}

export function listNamespaces(): string[] {
  return ip(['netns', 'list'])
    .split('\n')
    .map((line) => line.split(' ')[0] ?? '')
    .filter(Boolean);
}

export function deleteNamespace(name: string): void {
  try {
    ip(['netns', 'del', name]);
  } catch {
    // already gone
  }
}

/** Creates a node namespace: lo, an "eth0" with NODE_IP/24 and a default route, forwarding on. */
export function createNodeNamespace(name: string): void {
  ip(['netns', 'add', name]);
  const run = (args: string[]) => ip(['-n', name, ...args]);
  run(['link', 'set', 'lo', 'up']);
  // Kernels without the dummy driver exist: a veth whose peer stays in the node works as the uplink.
  run(['link', 'add', 'eth0', 'type', 'veth', 'peer', 'name', 'uplink']);
  run(['link', 'set', 'uplink', 'up']);
  run(['addr', 'add', `${NODE_IP}/24`, 'dev', 'eth0']);
  run(['link', 'set', 'eth0', 'up']);
  run(['route', 'add', 'default', 'via', GATEWAY, 'dev', 'eth0', 'onlink']);
  nsExec(name, 'sysctl', ['-qw', 'net.ipv4.ip_forward=1']);
}

/** Creates pod namespace number k (1-based) joined to the node; returns its address 10.244.k.2. */
export function createPodNamespace(node: string, name: string, k: number): string {
  const podIp = `10.244.${k}.2`;
  ip(['netns', 'add', name]);
  const hostSide = `veth${k}`;
  ip(['-n', node, 'link', 'add', hostSide, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', name]);
  ip(['-n', node, 'addr', 'add', `10.244.${k}.1/24`, 'dev', hostSide]);
  ip(['-n', node, 'link', 'set', hostSide, 'up']);
  ip(['-n', name, 'link', 'set', 'lo', 'up']);
  ip(['-n', name, 'addr', 'add', `${podIp}/24`, 'dev', 'eth0']);
  ip(['-n', name, 'link', 'set', 'eth0', 'up']);
  ip(['-n', name, 'route', 'add', 'default', 'via', `10.244.${k}.1`]);
  return podIp;
}

/** Moves this process's main thread (where libuv opens sockets and forks) into the namespace. */
export function enterNamespace(name: string): void {
  try {
    addon().setNetns(`/var/run/netns/${name}`);
  } catch (err) {
    throw new NmiError(codes.NETNS, `enter namespace ${name}: ${messageOf(err)}`, { cause: err });
  }
}
