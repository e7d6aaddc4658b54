// --node-ip's default: the IPv4 address of the interface holding the default route.
import { readFileSync } from 'node:fs';
import os from 'node:os';

export function defaultRouteInterface(routeTable = '/proc/net/route'): string | undefined {
  let text: string;
  try {
    text = readFileSync(routeTable, 'utf8');
  } catch {
    return undefined;
  }
  for (const line of text.split('\n').slice(1)) {
    const [iface, destination, , , , , , mask] = line.trim().split(/\s+/);
    if (destination === '00000000' && mask === '00000000' && iface) return iface;
  }
  return undefined;
}

export function defaultNodeIp(): string | undefined {
  const iface = defaultRouteInterface();
  if (!iface) return undefined;
  return os.networkInterfaces()[iface]?.find((a) => a.family === 'IPv4')?.address;
}
