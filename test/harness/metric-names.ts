// The metrics nmi can expose, computed from the code rather than copied: one
// registry from createRegistry() with every register… function of every
// src/<concern>/metrics.ts called on it, read without a scrape. The README's table,
// the alert rules and the dashboard are checked against this.
import { readdirSync, existsSync } from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import type { Registry } from 'prom-client';
import { createRegistry } from '../../src/metrics/registry.js';
import { projectRoot } from './netns.js';

export type MetricType = 'counter' | 'gauge' | 'histogram' | 'summary';

export interface MetricInfo {
  type: MetricType;
  /** Sorted; a histogram's `le` and a summary's `quantile` not included, as prom-client lists them. */
  labels: string[];
}

/** src/<concern>/metrics.ts, relative to the project. */
export function metricsModules(): string[] {
  const src = path.join(projectRoot, 'src');
  return readdirSync(src)
    .filter((dir) => existsSync(path.join(src, dir, 'metrics.ts')))
    .sort()
    .map((dir) => path.join('src', dir, 'metrics.ts'));
}

/**
 * Every argument but the registry: registering only keeps its arguments for the
 * scrape, so any use of one now throws, naming the function.
 */
function untouchable(fn: string, index: number): unknown {
  const touched = (): never => {
    throw new Error(`${fn} used its argument ${index} while registering; registration must only keep it for the scrape`);
  };
  return new Proxy(function () {}, { get: touched, set: touched, has: touched, apply: touched, construct: touched, ownKeys: touched, getPrototypeOf: touched });
}

/** The registry the daemon would build with every optional concern on (ebpf attestation, host callers, native server, start gate). */
export async function fullRegistry(): Promise<Registry> {
  const registry = createRegistry();
  for (const module of metricsModules()) {
    const compiled = path.join(projectRoot, 'dist', module.replace(/\.ts$/, '.js'));
    const exports = (await import(pathToFileURL(compiled).href)) as Record<string, unknown>;
    for (const [name, value] of Object.entries(exports)) {
      if (typeof value !== 'function') continue;
      // One findable way to register: a function of another name here would register unseen.
      if (!name.startsWith('register')) throw new Error(`${module} exports ${name}: functions of a metrics module are named register…`);
      const args = Array.from({ length: Math.max(0, value.length - 1) }, (_, i) => untouchable(`${module} ${name}`, i + 1));
      (value as (...a: unknown[]) => unknown)(registry, ...args);
    }
  }
  return registry;
}

/** Name → type and label names, of every metric nmi registers. */
export async function registeredMetrics(): Promise<Map<string, MetricInfo>> {
  const registry = await fullRegistry();
  const metrics = new Map<string, MetricInfo>();
  for (const metric of registry.getMetricsAsArray()) {
    // prom-client's classes and server/metrics.ts's Shared both carry labelNames; the type declares neither.
    const { name, type, labelNames } = metric as unknown as { name: string; type: MetricType; labelNames?: readonly string[] };
    metrics.set(name, { type, labels: [...(labelNames ?? [])].sort() });
  }
  return metrics;
}

/** The series names a scrape can show: a histogram's _bucket/_sum/_count, a summary's _sum/_count, the name itself otherwise. */
export function seriesNames(metrics: Map<string, MetricInfo>): Set<string> {
  const names = new Set<string>();
  for (const [name, { type }] of metrics) {
    if (type === 'histogram') for (const suffix of ['_bucket', '_sum', '_count']) names.add(name + suffix);
    else if (type === 'summary') for (const suffix of ['', '_sum', '_count']) names.add(name + suffix);
    else names.add(name);
  }
  return names;
}
