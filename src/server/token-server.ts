// The `js` token server: its HTTP runs in a worker thread (js-worker.ts), which
// answers cache hits from tables.ts's tables and defers every other request here
// whole, to the request core (core.ts) it shares with the native server.
import { Worker } from 'node:worker_threads';
import { errorSummary } from '../errors/errors.js';
import { answerWhole, createRequestCore, type TokenServerDeps } from './core.js';
import type { FromWorker, ToWorker, WorkerSetup } from './js-worker.js';
import { limits, serverBounds, type ServerBounds } from '../config/limits.js';
import { createImdsProxy } from './proxy.js';
import { packCallers, tellingServed, type TableFedServer, type TokenServedListener } from './tables.js';

export interface TokenServer extends TableFedServer {
  /** Serves on `fd` when given (a listener kept across restarts, which the server then owns), else binds host:port. */
  listen(host: string, port: number, fd?: number): Promise<void>;
  /** The bound port, once listening. */
  readonly port: number | undefined;
  /** Stops accepting, lets in-flight requests finish (at most drainMs), then closes every connection. Idempotent. */
  close(drainMs?: number): Promise<void>;
}

/** peerMapFd: --rules ebpf's peers map, so the worker can attest connections as it accepts them; bounds: tests shorten limits.ts's. */
export function createTokenServer(deps: TokenServerDeps, given: { peerMapFd?: number; bounds?: Partial<ServerBounds> } = {}): TokenServer {
  const { options, log } = deps;
  const listeners: TokenServedListener[] = [];
  const core = createRequestCore(tellingServed(deps, listeners));
  const proxy = createImdsProxy({ upstream: deps.upstreamImds, timeoutMs: options.proxyTimeoutMs ?? limits.proxyTimeoutMs, budgets: deps.proxyBudgets });
  const setup: WorkerSetup = {
    policy: { metadataHeaderRequired: options.metadataHeaderRequired, blockInstanceMetadata: options.blockInstanceMetadata },
    multipleIdentities: options.multipleIdentities,
    peerMapFd: given.peerMapFd,
    counts: deps.metrics?.segment().buffer,
    bounds: { ...serverBounds(options.maxConnectionsPerSource), ...given.bounds },
  };
  const worker = new Worker(new URL('./js-worker.js', import.meta.url), { workerData: setup });
  const send = (message: ToWorker) => worker.postMessage(message);
  let port: number | undefined;
  let listening: { resolve(): void; reject(err: Error): void } | undefined;
  let closed: () => void = () => {};
  let stopped: Promise<void> | undefined;
  let exited = false;
  worker.once('exit', () => {
    exited = true;
    closed();
  });

  worker.on('message', (message: FromWorker) => {
    switch (message.type) {
      case 'listening':
        port = message.port;
        return listening?.resolve();
      case 'listen-failed':
        return listening?.reject(Object.assign(new Error(message.message), { code: message.code }));
      case 'request': {
        const { id, request } = message;
        void answerWhole(core, proxy, log, request).answer.then((answer) => send({ type: 'answer', id, answer }));
        return;
      }
      case 'closed':
        return closed();
    }
  });
  // A server without its HTTP thread answers nobody: fail as a crash does, leaving the rules (pods fail closed).
  worker.on('error', (err) => {
    log.error({ err: errorSummary(err) }, 'the js server thread failed');
    if (listening) listening.reject(err instanceof Error ? err : new Error(String(err)));
    else throw err;
  });

  async function stop(drainMs: number): Promise<void> {
    if (!exited) {
      const done = new Promise<void>((resolve) => (closed = resolve));
      send({ type: 'close', drainMs });
      await done;
    }
    await worker.terminate();
    await proxy.close();
  }

  return {
    get port() {
      return port;
    },
    listen(host, wanted, fd) {
      return new Promise<void>((resolve, reject) => {
        listening = { resolve, reject };
        send({ type: 'listen', host, port: wanted, fd });
      }).finally(() => (listening = undefined));
    },
    close(drainMs = limits.drainTimeoutMs) {
      stopped ??= stop(drainMs);
      return stopped;
    },
    setCallers(callers) {
      const { lists, rows } = packCallers(callers, (id, key) => ({ key, clientID: id.clientID, resourceID: id.resourceID }));
      send({ type: 'callers', lists, rows });
    },
    updateTokens(upserts, removals) {
      send({ type: 'tokens', upserts, removals: removals.map(({ identityKey: key, resource }) => ({ identityKey: key, resource })) });
    },
    onTokenServed(listener) {
      listeners.push(listener);
    },
  };
}

