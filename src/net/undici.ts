// The parts of undici nmi uses: Agent, Pool and request(). undici's index loads
// all of undici (fetch, WebSocket, EventSource, cache stores, mocks, proxies):
// ~1.1 MB of source and ~3 MiB of heap (`node --expose-gc`, heapUsed after a
// full GC: 4.9 MiB for the index, 1.8 MiB for these) that a daemon kept under
// 80 MB cannot spare. undici has no "exports" map, so its files are reachable;
// the lockfile pins the version these paths were read from, and every caller's
// tests go through them.
import { createRequire } from 'node:module';
import type * as Undici from 'undici';

const load = createRequire(import.meta.url);

export const Agent = load('undici/lib/dispatcher/agent.js') as typeof Undici.Agent;
export const Pool = load('undici/lib/dispatcher/pool.js') as typeof Undici.Pool;
export type Agent = Undici.Agent;
export type Pool = Undici.Pool;
export type { Dispatcher } from 'undici';

// What undici's index does before anything is used: the request API on every dispatcher.
const DispatcherBase = load('undici/lib/dispatcher/dispatcher.js') as { prototype: object };
Object.assign(DispatcherBase.prototype, load('undici/lib/api/index.js'));
const { getGlobalDispatcher } = load('undici/lib/global.js') as { getGlobalDispatcher(): Undici.Dispatcher };

export type RequestOptions = Partial<Omit<Undici.Dispatcher.RequestOptions, 'origin' | 'path'>> & { dispatcher?: Undici.Dispatcher };

/** undici's request(url, options): the dispatcher given, or undici's global one. */
export function request(url: string | URL, options: RequestOptions = {}): Promise<Undici.Dispatcher.ResponseData> {
  const { dispatcher = getGlobalDispatcher(), ...rest } = options;
  const target = new URL(url);
  return dispatcher.request({ ...rest, method: rest.method ?? 'GET', origin: target.origin, path: `${target.pathname}${target.search}` });
}
