// The tables a server answers cache hits from without asking the token core:
// callers (caller address → bound identities), rebuilt from the pods and
// bindings on every change, and tokens, each entering when the core has just
// served it, for a short window, so a token is never served from a table past
// the point where the cache would refresh or drop it by more than that window.
// Only changes cross to the server. Fed to the native server (C++) and to the
// js server's worker thread alike.
import { attestedKey } from '../attest/peers.js';
import { identityKey, identityNameOf, type AzureIdentity, type PodIdentities } from '../bindings/model.js';
import { isCaller, isTerminating } from '../kubelet/pod-index.js';
import type { Pod } from '../kubelet/pod.js';
import { limits } from '../config/limits.js';
import { EXPIRY_MARGIN_MS } from '../tokens/token-cache.js';
import type { Token } from '../tokens/token.js';
import type { TokenServerDeps } from './core.js';

/** A server that answers hits from tables. */
export interface TableFedServer {
  /** Replaces the caller table in one swap. */
  setCallers(callers: CallerEntry[]): void;
  /** Adds or replaces `upserts` and removes `removals` from the token table, in one swap. */
  updateTokens(upserts: TableToken[], removals: TokenId[]): void;
  /** Called each time the token core answers a token, with what it answered. */
  onTokenServed(listener: TokenServedListener): void;
}

/** `pod`: the pod it was answered to; none from callers that are not pods' token requests. */
export type TokenServedListener = (identity: AzureIdentity, resource: string, token: Token, pod?: Pod) => void;

/** A row of the caller table: a caller and the identities bound to it. */
export interface CallerEntry {
  /** The caller's address; with --rules ebpf "address#cgroup". */
  address: string;
  /** Exception pods are always left to the token core (it passes them through). */
  exception: boolean;
  /** Entries given the same array share one list in the table. */
  identities: readonly AzureIdentity[];
  /** Per pod (TableSources.perPod): the pod's uid, which scopes its identities' keys (podScoped). */
  scope?: string;
}

/** Which token: one per (identity, resource). */
export interface TokenId {
  /** The identity's key, pod-scoped (podScoped) when the tables are per pod. */
  identityKey: string;
  /** The resource exactly as requested (after form decoding). */
  resource: string;
}

export interface TableToken extends TokenId {
  /** The identity's own key (identityKey of model.ts), scoped or not. */
  identity: string;
  token: Token;
  /** Wall-clock ms; from then on the token core answers again. */
  serveUntilMs: number;
}

/**
 * The token core's dependencies with getToken and peekToken telling `listeners` what the core served: a token
 * whose serving window ended comes back to the tables the next time the core answers it, from the cache or not.
 */
export function tellingServed<D extends Pick<TokenServerDeps, 'getToken' | 'peekToken'>>(deps: D, listeners: readonly TokenServedListener[]): D {
  const tell = (identity: AzureIdentity, resource: string, token: Token, pod?: Pod) => {
    for (const listener of listeners) listener(identity, resource, token, pod);
  };
  const { peekToken } = deps;
  return {
    ...deps,
    async getToken(identity, resource, pod) {
      const token = await deps.getToken(identity, resource, pod);
      tell(identity, resource, token, pod);
      return token;
    },
    ...(peekToken && {
      peekToken(identity: AzureIdentity, resource: string, pod?: Pod) {
        const token = peekToken(identity, resource, pod);
        if (token) tell(identity, resource, token, pod);
        return token;
      },
    }),
  };
}

/** A caller entry as the servers take it: [address, exception, index of its identity list]. */
export type CallerRow = [string, boolean, number];

/**
 * One list per distinct identities array, each identity as `row` makes it from the identity and its key in the
 * tables: 250 pods bound alike are one list, not 250 (per pod, scoped entries are a list each).
 */
export function packCallers<R>(callers: readonly CallerEntry[], row: (identity: AzureIdentity, key: string) => R): { lists: R[][]; rows: CallerRow[] } {
  const index = new Map<readonly AzureIdentity[], number>();
  const lists: R[][] = [];
  const rows = callers.map(({ address, exception, identities, scope }): CallerRow => {
    let i = scope === undefined ? index.get(identities) : undefined;
    if (i === undefined) {
      i = lists.length;
      if (scope === undefined) index.set(identities, i);
      lists.push(identities.map((identity) => row(identity, podScoped(scope, identityKey(identity)))));
    }
    return [address, exception, i];
  });
  return { lists, rows };
}

/**
 * An identity's key in the tables: per pod, prefixed by the pod's uid, so a server answers a pod only tokens the
 * core served that pod (--audit-log recorded them) and counts its answers per pod.
 */
export function podScoped(scope: string | undefined, key: string): string {
  return scope === undefined ? key : `${scope}/${key}`;
}

export function tokenKey({ identityKey: key, resource }: TokenId): string {
  return `${key}\n${resource}`;
}

export interface TableSources {
  /** Every pod of the last kubelet sync (PodIndex.pods). */
  pods(): readonly Pod[];
  /** The pod's identities as the token core sees them. */
  identitiesFor(pod: Pod): PodIdentities;
  /** BindingStore: 'change' names identities whose tokens must not be served again; 'update' follows every applied set. */
  store?: {
    on(event: 'change', listener: (keys: Set<string>) => void): unknown;
    on(event: 'update', listener: () => void): unknown;
  };
  /** --rules ebpf: the pod's cgroups; caller entries are then keyed "address#cgroup", one per cgroup. */
  cgroupsOf?(pod: Pod): readonly bigint[];
  /** How long a token the core served may be served from the tables [30 s]. */
  serveWindowMs?: number;
  /** How often tokens past their serving window are dropped [5 s]; servers check the window on every answer, so this only frees them. */
  pollMs?: number;
  /** --audit-log: a token row per (pod, identity, resource), entering when the core served it to that pod. */
  perPod?: boolean;
}

export interface Tables {
  /** Rebuilds the caller table from scratch now (call on every pod or bindings change). */
  refresh(): void;
  stop(): void;
}

export function attachTables(server: TableFedServer, sources: TableSources): Tables {
  const serveWindowMs = sources.serveWindowMs ?? 30_000;
  const tokens = new Map<string, TableToken>();
  // What changed since the last push: only that crosses to the server.
  const upserts = new Map<string, TableToken>();
  const removals = new Map<string, TableToken>();
  // The keys of the identities in the caller table: only their tokens are worth a place in the token table.
  let tabled = new Set<string>();

  function push(): void {
    if (upserts.size === 0 && removals.size === 0) return;
    server.updateTokens([...upserts.values()], [...removals.values()]);
    upserts.clear();
    removals.clear();
  }

  function remove(key: string, entry: TableToken): void {
    tokens.delete(key);
    upserts.delete(key);
    removals.set(key, entry);
  }

  // Additions are batched per turn of the event loop; removals are pushed at once.
  let pushScheduled = false;
  function schedulePush(): void {
    if (pushScheduled) return;
    pushScheduled = true;
    setImmediate(() => {
      pushScheduled = false;
      push();
    });
  }

  function refresh(): void {
    const callers = buildCallerEntries(sources.pods(), sources.identitiesFor, sources.cgroupsOf, sources.perPod);
    tabled = new Set<string>();
    // Unscoped, pods bound alike share one identities array: each array once.
    const seen = new Set<readonly AzureIdentity[]>();
    for (const { identities, scope } of callers) {
      if (scope === undefined && seen.has(identities)) continue;
      seen.add(identities);
      for (const identity of identities) tabled.add(podScoped(scope, identityKey(identity)));
    }
    server.setCallers(callers);
    for (const [key, entry] of tokens) if (!tabled.has(entry.identityKey)) remove(key, entry);
    push();
  }

  server.onTokenServed((identity, resource, token, pod) => {
    const now = Date.now();
    const serveUntilMs = Math.min(now + serveWindowMs, token.expiresOn * 1000 - EXPIRY_MARGIN_MS);
    if (sources.perPod && !pod) return;
    const own = identityKey(identity);
    const key = podScoped(sources.perPod ? pod?.uid : undefined, own);
    if (serveUntilMs <= now || !tabled.has(key)) return;
    const entry = { identityKey: key, identity: own, resource, token, serveUntilMs };
    const id = tokenKey(entry);
    // Requests the server leaves to the core (HTTP/1.0, say) would otherwise push the same token on every answer.
    const held = tokens.get(id);
    if (held && held.token === token && held.serveUntilMs > now) return;
    // Per pod, rows are bounded: past the bound, the core answers new ones.
    if (sources.perPod && !held && tokens.size >= limits.auditRows) return;
    tokens.set(id, entry);
    removals.delete(id);
    upserts.set(id, entry);
    schedulePush();
  });
  sources.store?.on('change', (keys) => {
    for (const [key, entry] of tokens) if (keys.has(identityNameOf(entry.identity))) remove(key, entry);
    push();
  });
  // The caller table follows every bindings set (an exception alone changes no identity) and, through refresh(), every pod change.
  sources.store?.on('update', refresh);
  const timer = setInterval(() => {
    for (const [key, entry] of tokens) if (entry.serveUntilMs <= Date.now()) remove(key, entry);
    push();
  }, sources.pollMs ?? 5_000);
  timer.unref();
  refresh();
  return {
    refresh,
    stop() {
      clearInterval(timer);
    },
  };
}

const none: readonly AzureIdentity[] = [];

/**
 * Addresses of exactly one live pod, as PodIndex indexes them; an address two pods claim is left to the token core.
 * With cgroupsOf, an entry per (address, cgroup of that pod): a socket of any other cgroup is left to the token core.
 */
export function buildCallerEntries(
  pods: readonly Pod[],
  identitiesFor: (pod: Pod) => PodIdentities,
  cgroupsOf?: (pod: Pod) => readonly bigint[],
  perPod = false,
): CallerEntry[] {
  const owners = new Map<string, Set<Pod>>();
  for (const pod of pods) {
    // A terminating pod's address may be a new pod's already: the core re-checks it with the kubelet (pod-index.ts).
    if (!isCaller(pod) || isTerminating(pod)) continue;
    for (const ip of pod.ips) owners.set(ip, (owners.get(ip) ?? new Set<Pod>()).add(pod));
  }
  const entries: CallerEntry[] = [];
  for (const [address, set] of owners) {
    const [pod] = set;
    if (!pod || set.size > 1) continue;
    const bound = identitiesFor(pod);
    const keys = cgroupsOf ? cgroupsOf(pod).map((id) => attestedKey(address, id)) : [address];
    const scope = perPod ? pod.uid : undefined;
    for (const key of keys) entries.push({ address: key, exception: bound.exception, identities: bound.exception ? none : bound.identities, ...(scope !== undefined && { scope }) });
  }
  return entries;
}
