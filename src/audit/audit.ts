// The audit stream's records (CONTRACT.md, "Audit"): which pod got which token.
//   served   when the core first answers a pod a token (its uti and oid claims, read
//            from the token unverified; never the token), written before the answer;
//   usage    each interval and at stop, one per (pod, identity, resource) answered in
//            it, the native server's own answers included (its per-entry counts, taken
//            each interval: no line and no lock per request);
//   refused  each interval, one per (pod or caller address, refusal kind).
// Every map is bounded (limits below); what a bound keeps out is counted as dropped.
import { IdentityType, identityKey, type AzureIdentity } from '../bindings/model.js';
import { limits } from '../config/limits.js';
import { serviceAccountName, type Pod } from '../kubelet/pod.js';
import { problems } from '../server/answers.js';
import type { RefusalDetail, RefusalKind, RefusalSink } from '../server/refusal.js';
import { podScoped, tokenKey } from '../server/tables.js';
import type { Token } from '../tokens/token.js';
import { jwtClaims } from '../util/jwt.js';
import type { AuditStream } from './stream.js';

export const auditLimits = {
  /** Last token served per (pod, identity, resource) (limits.ts says why this many). */
  served: limits.auditRows,
  /** Keys of one interval's usage records: as many. */
  usage: limits.auditRows,
  /** Keys of one interval's refusal records: (pod or address) × kind. */
  refused: 4_096,
} as const;

/** A pod as the records name it. */
interface RecordPod {
  namespace: string;
  name: string;
  uid: string;
  serviceAccount: string;
}

/** The last token a pod was served for one identity and resource, as `nmi explain` shows it. */
export interface ServedToken {
  identity: string;
  clientId: string;
  resource: string;
  source: TokenSource;
  tokenId: string;
  objectId: string;
  expiresOn: string;
  servedAt: string;
}

export type TokenSource = 'imds' | 'entra' | 'federation';

interface Served extends ServedToken {
  pod: RecordPod;
}

interface Usage {
  pod: RecordPod;
  clientId: string;
  resource: string;
  count: number;
}

interface Refused {
  who: { pod: RecordPod } | { caller: string };
  reason: RefusalKind;
  status: number;
  count: number;
}

export interface AuditOptions {
  stream: Pick<AuditStream, 'write' | 'dropped' | 'close'>;
  /** This node's name, in served records. */
  node: string;
  intervalMs: number;
  now?: () => number;
}

const sources: Record<IdentityType, TokenSource> = {
  [IdentityType.UserAssignedMSI]: 'imds',
  [IdentityType.ServicePrincipal]: 'entra',
  [IdentityType.ServicePrincipalCertificate]: 'entra',
  [IdentityType.Federated]: 'federation',
};

/** What records say of a token: its claims and its expiry, read once per token object (tokens are shared, so once per token). */
interface TokenFacts {
  tokenId: string;
  objectId: string;
  expiresOn: string;
}
const factsOf = new WeakMap<Token, TokenFacts>();

function tokenFacts(token: Token): TokenFacts {
  let facts = factsOf.get(token);
  if (!facts) {
    const { uti, oid } = jwtClaims(token.accessToken);
    facts = { tokenId: typeof uti === 'string' ? uti : '', objectId: typeof oid === 'string' ? oid : '', expiresOn: new Date(token.expiresOn * 1000).toISOString() };
    factsOf.set(token, facts);
  }
  return facts;
}

function recordPod(pod: Pod): RecordPod {
  return { namespace: pod.namespace, name: pod.name, uid: pod.uid, serviceAccount: serviceAccountName(pod) };
}

export class Audit implements RefusalSink {
  readonly #stream: AuditOptions['stream'];
  readonly #node: string;
  readonly #now: () => number;
  /** By the token's key in the tables (per pod), least recently served first. */
  readonly #served = new Map<string, Served>();
  #usage = new Map<string, Usage>();
  #refused = new Map<string, Refused>();
  #from: number;
  readonly #timer: NodeJS.Timeout;
  /** The native server's answers per token key since it was last asked. */
  #nativeHits: (() => Iterable<[string, number]>) | undefined;

  constructor(options: AuditOptions) {
    this.#stream = options.stream;
    this.#node = options.node;
    this.#now = options.now ?? Date.now;
    this.#from = this.#now();
    this.#timer = setInterval(() => this.flush(), options.intervalMs);
    this.#timer.unref();
  }

  /** Where the native server's own answers are counted; taken at every flush. */
  countNative(hits: () => Iterable<[string, number]>): void {
    this.#nativeHits = hits;
  }

  /** Told each token the core answers a pod (server/tables.ts's TokenServedListener): written before the answer. */
  readonly served = (identity: AzureIdentity, resource: string, token: Token, pod?: Pod): void => {
    if (!pod) return;
    const key = tokenKey({ identityKey: podScoped(pod.uid, identityKey(identity)), resource });
    const { tokenId, objectId, expiresOn } = tokenFacts(token);
    const last = this.#served.get(key);
    if (!last || last.tokenId !== tokenId || last.expiresOn !== expiresOn) {
      const time = new Date(this.#now()).toISOString();
      const entry: Served = {
        pod: recordPod(pod),
        identity: identityKey(identity),
        clientId: identity.clientID,
        resource,
        source: sources[identity.type],
        tokenId,
        objectId,
        expiresOn,
        servedAt: time,
      };
      this.#stream.write({
        kind: 'served',
        time,
        node: this.#node,
        pod: entry.pod,
        identity: { clientId: identity.clientID, namespace: identity.namespace, name: identity.name, type: identity.type },
        resource,
        source: entry.source,
        tokenId,
        objectId,
        expiresOn,
      });
      this.#served.set(key, entry);
      if (this.#served.size > auditLimits.served) this.#served.delete(this.#served.keys().next().value!);
    }
    this.#count(key, 1);
  };

  refused(pod: Pod, kind: RefusalKind, detail: RefusalDetail): void {
    this.#refusal(`${pod.uid}\n${kind}`, () => ({ who: { pod: recordPod(pod) }, reason: kind, status: detail.status, count: 0 }));
  }

  unknownCaller(address: string): void {
    this.#refusal(`${address}\nunknown-caller`, () => ({ who: { caller: address }, reason: 'unknown-caller', status: problems.unknownCaller.status, count: 0 }));
  }

  /** A sink telling `sink` and this audit each refusal. */
  alsoTelling(sink: RefusalSink): RefusalSink {
    return {
      refused: (pod, kind, detail) => {
        sink.refused(pod, kind, detail);
        this.refused(pod, kind, detail);
      },
      unknownCaller: (address) => {
        sink.unknownCaller(address);
        this.unknownCaller(address);
      },
    };
  }

  /** The pod's last served token per identity and resource, newest first. */
  servedTo(podUid: string): ServedToken[] {
    const found: ServedToken[] = [];
    for (const { pod, ...token } of this.#served.values()) if (pod.uid === podUid) found.unshift(token);
    return found;
  }

  /** Writes the interval's usage and refusal records and starts the next interval. */
  flush(): void {
    for (const [key, count] of this.#nativeHits?.() ?? []) this.#count(key, count);
    const to = this.#now();
    const from = new Date(this.#from).toISOString();
    const until = new Date(to).toISOString();
    for (const { pod, clientId, resource, count } of this.#usage.values()) {
      this.#stream.write({ kind: 'usage', from, to: until, pod, identity: { clientId }, resource, count });
    }
    for (const { who, reason, status, count } of this.#refused.values()) {
      this.#stream.write({ kind: 'refused', from, to: until, ...who, reason, status, count });
    }
    this.#usage = new Map();
    this.#refused = new Map();
    this.#from = to;
  }

  /** The last interval's records, then the file closed. */
  stop(): void {
    clearInterval(this.#timer);
    this.flush();
    this.#stream.close();
  }

  #count(key: string, n: number): void {
    const served = this.#served.get(key);
    if (served) {
      // The most recently served last: what a bound evicts is what no pod asks for lately.
      this.#served.delete(key);
      this.#served.set(key, served);
    }
    const usage = this.#usage.get(key);
    if (usage) {
      usage.count += n;
      return;
    }
    // Answered from an entry whose served record was evicted, or past the interval's bound: counted as dropped.
    if (!served || this.#usage.size >= auditLimits.usage) return this.#stream.dropped(n);
    this.#usage.set(key, { pod: served.pod, clientId: served.clientId, resource: served.resource, count: n });
  }

  #refusal(key: string, make: () => Refused): void {
    let refused = this.#refused.get(key);
    if (!refused) {
      if (this.#refused.size >= auditLimits.refused) return this.#stream.dropped();
      this.#refused.set(key, (refused = make()));
    }
    refused.count++;
  }
}
