// The DaemonSet's start gate (--start-taint). Nodes register with a taint
// (kubelet --register-with-taints, AKS's node initialization taints) that
// ordinary pods do not tolerate; nmi removes it from its own Node once the
// redirect is installed and it is ready, so no pod is scheduled on a node whose
// 169.254.169.254 still leads to the real IMDS. A clean stop that removes the
// rules puts the taint back first.
//
// Writes are JSON merge patches of spec.taints carrying the resourceVersion
// read, so the API server refuses (409) a write over anyone else's change to
// the node's taints made in between; nmi then reads again and redoes its one
// change. RBAC: get and patch on nodes.
import { messageOf } from '../errors/errors.js';
import { setTimeout as sleep } from 'node:timers/promises';
import { ApiError, type KubeClient } from '../kube/client.js';
import type { Taint } from '../config/values.js';
import type { Logger } from '../log/logger.js';
import { Backoff } from '../util/backoff.js';

export function formatTaint(t: Taint): string {
  return `${t.key}${t.value ? `=${t.value}` : ''}:${t.effect}`;
}

interface NodeTaint {
  key?: string;
  value?: string;
  effect?: string;
  [field: string]: unknown;
}

interface NodeObject {
  metadata?: { resourceVersion?: string };
  spec?: { taints?: NodeTaint[] };
}

/** A taint is known by key and effect, as the scheduler and `kubectl taint KEY:EFFECT-` know it. */
const same = (a: NodeTaint, b: Taint): boolean => a.key === b.key && a.effect === b.effect;

export interface StartGateOptions {
  client: KubeClient;
  nodeName: string;
  taint: Taint;
  log: Logger;
  backoff?: { initialMs: number; maxMs: number };
}

export class StartGate {
  readonly #client: KubeClient;
  readonly #path: string;
  readonly #taint: Taint;
  readonly #log: Logger;
  readonly #backoff: { initialMs: number; maxMs: number };
  readonly #abort = new AbortController();
  #opened = false;
  #opening: Promise<void> | undefined;

  constructor(options: StartGateOptions) {
    this.#client = options.client;
    this.#path = `/api/v1/nodes/${encodeURIComponent(options.nodeName)}`;
    this.#taint = options.taint;
    this.#log = options.log.child({ startTaint: formatTaint(options.taint), node: options.nodeName });
    this.#backoff = options.backoff ?? { initialMs: 500, maxMs: 30_000 };
  }

  /** True once the node has been seen without the taint (removed by nmi, or absent already). */
  get opened(): boolean {
    return this.#opened;
  }

  /** Removes the taint, retrying until it is gone or the gate is closed; resolves then. */
  open(): Promise<void> {
    this.#opening ??= this.#until(this.#abort.signal, 'absent').then(
      () => {
        this.#opened = true;
      },
      () => undefined, // aborted by close() or stop()
    );
    return this.#opening;
  }

  /** Stops trying to open, then puts the taint back, giving up after timeoutMs (a stop is not held up for long). Last call. */
  async close(timeoutMs: number): Promise<void> {
    this.#abort.abort();
    await this.#opening;
    try {
      await this.#until(AbortSignal.timeout(timeoutMs), 'present');
      this.#opened = false;
    } catch (err) {
      this.#log.error({ err: messageOf(err) }, 'could not taint the node again: pods may be scheduled here while nmi is stopped');
    } finally {
      await this.#client.close();
    }
  }

  /** Stops trying to open, leaving the node as it is. Last call. */
  async stop(): Promise<void> {
    this.#abort.abort();
    await this.#opening;
    await this.#client.close();
  }

  /** Rejects, once `signal` aborts, with the last failure that kept it from succeeding (else the abort's reason). */
  async #until(signal: AbortSignal, want: 'absent' | 'present'): Promise<void> {
    const backoff = new Backoff(this.#backoff);
    let last: unknown;
    for (;;) {
      if (signal.aborted) throw last ?? signal.reason;
      try {
        if (await this.#apply(signal, want)) return;
        // Someone else changed the node between our read and our write: read again at once.
        this.#log.debug('node changed while updating its taints, reading it again');
        continue;
      } catch (err) {
        if (signal.aborted) continue;
        last = err;
        const delay = backoff.next();
        this.#log.warn({ err: messageOf(err), hint: hint(err), retryInMs: Math.round(delay) }, `could not ${want === 'absent' ? 'remove' : 'add'} the start taint`);
        await sleep(delay, undefined, { signal }).catch(() => undefined);
      }
    }
  }

  /** One read and at most one write; false when the write lost a race (409). */
  async #apply(signal: AbortSignal, want: 'absent' | 'present'): Promise<boolean> {
    const node = (await this.#client.getJson(this.#path, signal)) as NodeObject;
    const taints = node.spec?.taints ?? [];
    const has = taints.some((t) => same(t, this.#taint));
    if (has === (want === 'present')) {
      this.#log.info(want === 'absent' ? 'node has no start taint: pods may be scheduled here' : 'node already has the start taint');
      return true;
    }
    const next = want === 'absent' ? taints.filter((t) => !same(t, this.#taint)) : [...taints, { ...this.#taint }];
    try {
      await this.#client.mergePatch(this.#path, { metadata: { resourceVersion: node.metadata?.resourceVersion }, spec: { taints: next } }, signal);
    } catch (err) {
      if (err instanceof ApiError && err.status === 409) return false;
      throw err;
    }
    this.#log.info(want === 'absent' ? 'start taint removed: pods may be scheduled here' : 'start taint added: no new pod is scheduled here until nmi is ready again');
    return true;
  }
}

/** What an operator would check for the usual refusals. */
function hint(err: unknown): string | undefined {
  if (!(err instanceof ApiError)) return undefined;
  if (err.status === 401 || err.status === 403) return 'nmi needs get and patch on nodes (deploy/overlays/start-gate); a kubelet credential may not change its own taints';
  if (err.status === 404) return '--node-name does not name a Node';
  return undefined;
}
