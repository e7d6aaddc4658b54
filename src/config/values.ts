// Parsers for flag values. Each returns the parsed value or throws UsageError
// naming the flag, so every bad value becomes one line on stderr and exit 2.
import { closeSync, fstatSync, openSync } from 'node:fs';
import net from 'node:net';
import { UsageError } from '../errors/errors.js';
import { isDnsLabel, isLabelValue, isQualifiedName } from '../kube/names.js';

export type Parser<T> = (raw: string, flag: string) => T;

export const str: Parser<string> = (raw) => raw;

export function nonEmpty(raw: string, flag: string): string {
  if (raw.trim() === '') throw new UsageError(`--${flag}: must not be empty`);
  return raw;
}

/**
 * A file nmi reads again while it runs (certificates, keys and tokens rotate):
 * one it cannot read at start is a configuration error (exit 2, so systemd does
 * not restart it in a loop), where a read failing later is retried.
 */
export function readableFile(raw: string, flag: string): string {
  nonEmpty(raw, flag);
  let fd: number;
  try {
    // Opened, not access(2)ed: under the unit's sandbox root has no CAP_DAC_OVERRIDE, and open is what counts.
    fd = openSync(raw, 'r');
  } catch (err) {
    throw new UsageError(`--${flag}: cannot read ${raw}: ${(err as NodeJS.ErrnoException).code ?? 'error'}`);
  }
  try {
    if (!fstatSync(fd).isFile()) throw new UsageError(`--${flag}: ${raw} is not a file`);
  } finally {
    closeSync(fd);
  }
  return raw;
}

export function ipv4(raw: string, flag: string): string {
  if (!net.isIPv4(raw)) throw new UsageError(`--${flag}: "${raw}" is not an IPv4 address`);
  return raw;
}

export function port(raw: string, flag: string): number {
  const n = /^\d+$/.test(raw) ? Number(raw) : NaN;
  if (!Number.isInteger(n) || n < 1 || n > 65535) throw new UsageError(`--${flag}: "${raw}" is not a port (1-65535)`);
  return n;
}

export function positiveInt(raw: string, flag: string): number {
  const n = /^\d+$/.test(raw) ? Number(raw) : NaN;
  if (!Number.isSafeInteger(n) || n < 1) throw new UsageError(`--${flag}: "${raw}" is not a positive whole number`);
  return n;
}

/** A rate as N/s or N/m (N alone: per second). Returns calls per second. */
export function rate(raw: string, flag: string): number {
  const m = /^(\d+(?:\.\d+)?)(?:\/(s|m))?$/.exec(raw);
  const perSec = m ? Number(m[1]) / (m[2] === 'm' ? 60 : 1) : NaN;
  if (!(perSec > 0) || !Number.isFinite(perSec)) throw new UsageError(`--${flag}: "${raw}" is not a positive rate (like 20/s or 30/m)`);
  return perSec;
}

const units: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };

/** Go-style durations as aad-pod-identity spelled them: 500ms, 5s, 1m30s. Returns milliseconds. */
export function duration(raw: string, flag: string): number {
  const re = /(\d+(?:\.\d+)?)(ms|s|m|h)/g;
  let total = 0;
  let consumed = 0;
  for (const m of raw.matchAll(re)) {
    if (m.index !== consumed) break;
    total += Number(m[1]) * (units[m[2] as string] as number);
    consumed += m[0].length;
  }
  if (raw === '' || consumed !== raw.length || total <= 0) {
    throw new UsageError(`--${flag}: "${raw}" is not a positive duration (like 500ms, 5s, 1m)`);
  }
  return total;
}

export function bool(raw: string, flag: string): boolean {
  if (['true', '1', 'yes'].includes(raw)) return true;
  if (['false', '0', 'no'].includes(raw)) return false;
  throw new UsageError(`--${flag}: "${raw}" is not true or false`);
}

export function oneOf<T extends string>(choices: readonly T[]): Parser<T> {
  return (raw, flag) => {
    if (!(choices as readonly string[]).includes(raw)) {
      throw new UsageError(`--${flag}: "${raw}" is not one of ${choices.join(', ')}`);
    }
    return raw as T;
  };
}

export function httpUrl(raw: string, flag: string): URL {
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw new UsageError(`--${flag}: "${raw}" is not a URL`);
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') {
    throw new UsageError(`--${flag}: "${raw}" must be an http or https URL`);
  }
  return url;
}

export interface HostPort {
  host: string;
  port: number;
}

export function hostPort(raw: string, flag: string): HostPort {
  const i = raw.lastIndexOf(':');
  const host = i > 0 ? raw.slice(0, i).replace(/^\[(.*)\]$/, '$1') : '';
  if (i <= 0 || !net.isIP(host)) throw new UsageError(`--${flag}: "${raw}" is not ADDRESS:PORT`);
  return { host, port: port(raw.slice(i + 1), flag) };
}

/** `off` or ADDRESS:PORT. */
export function offOrHostPort(raw: string, flag: string): HostPort | null {
  return raw === 'off' || raw === '' ? null : hostPort(raw, flag);
}

/** `off` or a filesystem path. */
export function offOrPath(raw: string, flag: string): string | null {
  if (raw === 'off' || raw === '') return null;
  if (!raw.startsWith('/')) throw new UsageError(`--${flag}: "${raw}" must be an absolute path or off`);
  return raw;
}

/** `off`, `-` (standard output) or an absolute file path. */
export function offStdoutOrPath(raw: string, flag: string): string | null {
  if (raw === '-' || raw.startsWith('/')) return raw;
  if (raw === 'off' || raw === '') return null;
  throw new UsageError(`--${flag}: "${raw}" must be an absolute path, - (standard output) or off`);
}

const sizeUnits: Record<string, number> = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3 };

/** A size in bytes as logrotate's `size` takes it: N, NK, NM or NG (powers of 1024; Ki, Mi, Gi too). */
export function byteSize(raw: string, flag: string): number {
  const m = /^(\d+)(?:([KMG])i?)?$/i.exec(raw);
  const n = m ? Number(m[1]) * (sizeUnits[(m[2] ?? '').toUpperCase()] as number) : NaN;
  if (!Number.isSafeInteger(n) || n < 1) throw new UsageError(`--${flag}: "${raw}" is not a size (like 100M, 512K, 1G)`);
  return n;
}

export const taintEffects = ['NoSchedule', 'PreferNoSchedule', 'NoExecute'] as const;
export type TaintEffect = (typeof taintEffects)[number];

export interface Taint {
  key: string;
  value?: string;
  effect: TaintEffect;
}

/** `off`, or a taint as kubelet's --register-with-taints spells one: KEY[=VALUE]:EFFECT. */
export function startTaint(raw: string, flag: string): Taint | null {
  if (raw === 'off' || raw === '') return null;
  const colon = raw.lastIndexOf(':');
  if (colon < 0) throw new UsageError(`--${flag}: "${raw}" is not KEY[=VALUE]:EFFECT`);
  const effect = raw.slice(colon + 1);
  if (!(taintEffects as readonly string[]).includes(effect)) throw new UsageError(`--${flag}: effect "${effect}" is not one of ${taintEffects.join(', ')}`);
  const keyValue = raw.slice(0, colon);
  const eq = keyValue.indexOf('=');
  const key = eq < 0 ? keyValue : keyValue.slice(0, eq);
  const value = eq < 0 ? undefined : keyValue.slice(eq + 1);
  if (!isQualifiedName(key)) throw new UsageError(`--${flag}: "${key}" in "${raw}" is not a taint key ([DNS-subdomain/]name)`);
  if (value !== undefined && !isLabelValue(value)) throw new UsageError(`--${flag}: "${value}" in "${raw}" is not a taint value`);
  return value ? { key, value, effect: effect as TaintEffect } : { key, effect: effect as TaintEffect };
}

export const HOST_ROOT = 'host-root';

/** One --host-token-allow entry. */
export type HostCallerRule = { kind: 'host-root' } | { kind: 'pods'; namespace: string; label: string; value: string };

/** `host-root` and `namespace/label=value` entries, comma-separated; an empty list allows nobody. */
export function hostCallerRules(raw: string, flag: string): HostCallerRule[] {
  return entries(raw).map((entry): HostCallerRule => {
    if (entry === HOST_ROOT) return { kind: 'host-root' };
    const match = /^([^/=]+)\/([^=]+)=(.*)$/.exec(entry);
    const [, namespace = '', label = '', value = ''] = match ?? [];
    if (!match) throw new UsageError(`--${flag}: "${entry}" is not ${HOST_ROOT} or namespace/label=value`);
    if (!isDnsLabel(namespace)) throw new UsageError(`--${flag}: "${namespace}" in "${entry}" is not a namespace name`);
    if (!isQualifiedName(label)) throw new UsageError(`--${flag}: "${label}" in "${entry}" is not a label key`);
    if (!isLabelValue(value)) throw new UsageError(`--${flag}: "${value}" in "${entry}" is not a label value`);
    return { kind: 'pods', namespace, label, value };
  });
}

/** Comma-separated entries, blanks dropped. */
function entries(raw: string): string[] {
  return raw.split(',').map((e) => e.trim()).filter((e) => e !== '');
}

/** `*` for every namespace, or namespace names, comma-separated; empty: none. */
export function namespaceList(raw: string, flag: string): '*' | ReadonlySet<string> {
  if (raw.trim() === '*') return '*';
  const names = entries(raw);
  for (const name of names) if (!isDnsLabel(name)) throw new UsageError(`--${flag}: "${name}" is not a namespace name (or give * alone for every namespace)`);
  return new Set(names);
}

/** Host names, with a port where it is not 443, comma-separated: `login.example.com,login.example.org:8443`. */
export function hostList(raw: string, flag: string): ReadonlySet<string> {
  const hosts = entries(raw).map((entry) => {
    let url: URL;
    try {
      url = new URL(`https://${entry}`);
    } catch {
      throw new UsageError(`--${flag}: "${entry}" is not a host name`);
    }
    if (url.pathname !== '/' || url.username || url.search || url.hash || entry.includes('/')) throw new UsageError(`--${flag}: "${entry}" is not a host name (no scheme, path or user)`);
    return url.host;
  });
  return new Set(hosts);
}
