// `nmi run` wired together. The data flow of a token request, by folder:
//   server/ (checks) → kubelet/ (caller by source address) → bindings/ (its
//   identities) → tokens/ (cached token) → server/ (IMDS-shaped answer).
// Start order matters: the redirect goes in only once nmi can answer what it
// redirects (first pod sync, first bindings sync, token server listening).
import type http from 'node:http';
import { CgroupAttestation } from '../attest/attestation.js';
import { CgroupPods } from '../attest/cgroup-pods.js';
import { HostCallers, socketCgroupsUnsupported } from '../attest/host-callers.js';
import { registerAttestationMetrics, registerHostCallerMetrics } from '../attest/metrics.js';
import { checkRunConfig, type RunConfig } from '../config/commands.js';
import type { HostPort } from '../config/values.js';
import { codes, messageOf, NmiError, UsageError } from '../errors/errors.js';
import type { MatchOptions } from '../bindings/match.js';
import { registerBindingMetrics } from '../bindings/metrics.js';
import { BindingStore, createBindingSource } from '../bindings/store.js';
import { KubeletClient } from '../kubelet/kubelet-client.js';
import { registerKubeletMetrics } from '../kubelet/metrics.js';
import { PodIndex } from '../kubelet/pod-index.js';
import type { Logger } from '../log/logger.js';
import { createRegistry } from '../metrics/registry.js';
import { registerReadinessMetrics } from '../probe/metrics.js';
import { Readiness } from '../probe/readiness.js';
import { PID_HEADER, probeUrl, startProbeServer, type ProbeDebug } from '../probe/probe-server.js';
import { RulesKeeper } from '../rules/keeper.js';
import { registerRuleMetrics } from '../rules/metrics.js';
import { EbpfBackend } from '../rules/ebpf.js';
import type { Redirect } from '../rules/redirect.js';
import { selectBackend } from '../rules/select.js';
import { registerNativeMetrics, registerServerMetrics } from '../server/metrics.js';
import { createHostTokenServer, createHostTokenTcpServer } from '../server/host-token.js';
import { bindHostTokenSocket } from '../server/private-socket.js';
import { createNativeTokenServer } from '../server/native-server.js';
import { attachTables, tellingServed, type Tables } from '../server/tables.js';
import type { TokenServerDeps } from '../server/core.js';
import { createTokenServer } from '../server/token-server.js';
import { limits } from '../config/limits.js';
import { Budgets } from '../budget/budgets.js';
import { registerBudgetMetrics, registerQueueWaitMetrics } from '../budget/metrics.js';
import { registerTokenMetrics } from '../tokens/metrics.js';
import { MsalTokenProvider } from '../tokens/msal-provider.js';
import { NetworkClient } from '../tokens/network-client.js';
import { PodTokens } from '../tokens/pod-tokens.js';
import { mountsOfType, within } from '../util/mounts.js';
import { KubeClient } from '../kube/client.js';
import { explainHandler } from '../explain/endpoint.js';
import { RecentRefusals } from '../explain/refusals.js';
import { registerEventMetrics } from '../events/metrics.js';
import { PodEvents } from '../events/pod-events.js';
import { refusalEvent } from '../events/refusal-events.js';
import { problems } from '../server/answers.js';
import { loadKubeConfig } from '../kube/kubeconfig.js';
import { ServiceAccountTokens } from '../kube/service-account-token.js';
import { registerStartGateMetrics } from './metrics.js';
import { StartGate } from './start-gate.js';
import { ListenError, Listeners, type HeldListener } from './listeners.js';
import { HandoffServer, takeOver } from './handoff.js';
import { request } from '../net/undici.js';
import { constants } from 'node:os';
import { rm } from 'node:fs/promises';
import { dropStartupPages } from './startup-pages.js';
import { forbidCoreDumps } from './core-dumps.js';
import { Audit } from '../audit/audit.js';
import { registerAuditMetrics } from '../audit/metrics.js';
import { AuditStream } from '../audit/stream.js';

/** How long a stop waits to taint the node again before it goes on without. */
const GATE_CLOSE_TIMEOUT_MS = 5_000;
/** How long a new nmi waits for the running one to stop keeping the rules. */
const TAKE_RULES_TIMEOUT_MS = 10_000;
const { EADDRINUSE } = constants.errno;

export interface Daemon {
  readiness: Readiness;
  /** Stops accepting, drains, then removes or keeps the rules as --on-exit says. */
  stop(): Promise<void>;
}

export interface DaemonHooks {
  /** Progress for systemd's STATUS= line. */
  status?(text: string): void;
  /** Listening sockets this process was started with (systemd's LISTEN_FDS), by name. */
  inherited?: Map<string, number[]>;
  /** Where the listeners go to outlive the process (systemd's file descriptor store); `forget`: names no longer used. */
  keepListeners?(listeners: readonly HeldListener[], forget: readonly string[]): void;
}

export async function startDaemon(config: RunConfig, log: Logger, hooks: DaemonHooks = {}): Promise<Daemon> {
  // Everything that can be a usage error is resolved before the host is touched.
  checkRunConfig(config);
  // Before any token or Secret is in memory.
  forbidCoreDumps();
  const backend = await selectBackend(config.rules, config.cgroupRoot);
  const hostTcp = await hostTokenTcpConfig(config);
  const gate = startGate(config, log);
  const status = (text: string) => {
    hooks.status?.(text);
    log.info(text);
  };

  // Every listener is held from the start: connections that arrive while nmi syncs (after a
  // restart, the rules already send them here) wait in the kernel's queue, not refused.
  const predecessor = config.takeOver && config.handoffSocket ? takeOver(config.handoffSocket, log) : undefined;
  if (config.takeOver && !predecessor) log.info('no running nmi to take over from: starting afresh');
  const listeners = new Listeners(predecessor?.listeners ?? hooks.inherited ?? new Map(), log);
  await holdProbe(listeners, config.probeAddress);
  listeners.hold('token', { host: config.nodeIp, port: config.port });
  if (hostTcp) listeners.hold('host-token-tcp', hostTcp.address);
  const hostSocketPath = config.hostTokenSocket;
  if (hostSocketPath) await listeners.holdUnix('host-token', hostSocketPath, () => bindHostTokenSocket(hostSocketPath));
  const unused = listeners.discardUnused();
  hooks.keepListeners?.(listeners.held, unused);

  const registry = createRegistry();
  const readiness = new Readiness();
  for (const condition of ['pods', 'bindings', 'server', 'rules']) readiness.require(condition);
  registerReadinessMetrics(registry, readiness);
  const probeDebug: ProbeDebug = {};
  const serveProbe = () => startProbeServer(config.probeAddress, readiness, registry, listeners.take('probe'), probeDebug);
  let probe: http.Server | undefined = await serveProbe();
  const closeProbe = () => {
    probe?.close();
    probe?.closeAllConnections();
    probe = undefined;
  };
  let handoff: HandoffServer | undefined;

  let tables: Tables | undefined;
  // --rules ebpf: callers attested by the cgroup that made the connection.
  const ebpf = backend instanceof EbpfBackend ? backend : undefined;
  const cgroupPods = ebpf && new CgroupPods(config.cgroupRoot, { onWalk: () => tables?.refresh() });

  // Caller: the kubelet's pods, indexed by address.
  const kubelet = new KubeletClient({
    url: config.kubeletUrl,
    ca: config.kubeletCa,
    clientCert: config.kubeletClientCert,
    clientKey: config.kubeletClientKey,
    tokenFile: config.kubeletTokenFile,
    serverName: config.kubeletServerName,
  });
  const pods = new PodIndex({
    fetchPods: () => kubelet.fetchPods(),
    refreshIntervalMs: config.podRefreshInterval,
    log,
    onChange: () => {
      tokens.retain();
      refusals.podsListed(pods.pods());
      events?.retain(pods.pods().map((p) => p.uid));
      tables?.refresh();
      // New pods bring new cgroups; the walk refreshes the caller table when done.
      void cgroupPods?.walk();
    },
  });
  // What pods were refused: `nmi explain` shows it, and what an operator must act on becomes an Event on the pod.
  const refusals = new RecentRefusals();
  const nodeName = config.nodeName ?? config.nodeIp;
  // --audit-log: which pod got which token, and what each pod was refused.
  const auditStream = config.auditLog ? new AuditStream({ path: config.auditLog, maxBytes: config.auditMaxSize, keep: config.auditMaxFiles, log }) : undefined;
  const audit = auditStream && new Audit({ stream: auditStream, node: nodeName, intervalMs: config.auditInterval });
  if (auditStream) registerAuditMetrics(registry, auditStream);
  const refusalSink = audit?.alsoTelling(refusals) ?? refusals;
  const api = apiServer(config, nodeName, log);
  // Federated identities' service-account tokens: through the kubelet's credential when given (confined to this
  // node's pods by the Node authorizer), else nmi's own (which needs serviceaccounts/token cluster-wide).
  const tokenRequester = config.tokenRequestKubeconfig
    ? new KubeClient(loadKubeConfig({ kubeconfig: config.tokenRequestKubeconfig, flag: '--token-request-kubeconfig' }), `nmi (node ${nodeName})`)
    : api;
  const saTokens = tokenRequester && new ServiceAccountTokens(tokenRequester);
  const events = api && config.podEvents ? new PodEvents({ client: api, nodeName, log }) : undefined;
  if (events) {
    refusals.listen((pod, refusal) => {
      const event = refusalEvent(pod, refusal, nodeName);
      if (event) events.record(pod, event);
    });
  }
  const attestation =
    ebpf &&
    cgroupPods &&
    new CgroupAttestation(cgroupPods, pods, log, (socketPod, address, owner) => {
      const cause = `${address} is ${owner ? `pod ${owner.namespace}/${owner.name}'s` : 'no pod of this node'}`;
      refusalSink.refused(socketPod, 'spoof', { ...problems.callerMismatch, cause });
    });

  // Identities: the custom resources, from the API server or files.
  const bindingsConfig = { bindings: config.bindings, kubeconfig: config.kubeconfig, nodeName: config.nodeName, crossNamespaceSecrets: config.crossNamespaceSecrets };
  const store = new BindingStore(await createBindingSource(bindingsConfig, log), log);
  const match: MatchOptions = {
    forceNamespaced: config.forceNamespaced,
    sharedNamespaces: config.sharedIdentityNamespaces,
    crossNamespaceSecrets: config.crossNamespaceSecrets,
    workloadTenant: config.workloadIdentityTenant,
  };

  // Upstream budgets: every call to IMDS or an Entra ID tenant waits its turn, pods served in turn.
  const budgets = new Budgets({
    imds: { maxConcurrent: config.imdsMaxConcurrent, ratePerSec: config.imdsMaxRate },
    imdsMetadata: { maxConcurrent: config.imdsMaxConcurrent, ratePerSec: config.imdsMetadataMaxRate },
    entra: { maxConcurrent: config.aadMaxConcurrent, ratePerSec: config.aadMaxRate },
    maxPendingPerPod: config.maxPendingPerPod,
    maxWaitMs: limits.budgetWaitMs,
    onWait: registerQueueWaitMetrics(registry),
  });

  // Tokens: msal-node through one undici client; how a pod gets one is tokens/pod-tokens.ts.
  const network = new NetworkClient();
  const provider = new MsalTokenProvider({
    upstreamImds: config.upstreamImds.href,
    aadAuthorityHost: config.aadAuthorityHost.href,
    adEndpointAllow: config.aadEndpointAllow,
    network,
    logger: log,
  });
  const tokens = new PodTokens({ pods, bindings: store, match, provider, budgets, maxTokensPerPod: config.maxTokensPerPod, serviceAccountTokens: saTokens, log });
  const podIdentities: TokenServerDeps['identitiesFor'] = (pod) => tokens.identitiesOf(pod);
  const settle: TokenServerDeps['settle'] = (pod) => tokens.settle(pod);
  const getToken: TokenServerDeps['getToken'] = (identity, resource, pod) => tokens.get(identity, resource, pod);
  store.on('change', (keys) => tokens.invalidate(keys));

  registerKubeletMetrics(registry, pods);
  registerBindingMetrics(registry, store);
  registerTokenMetrics(registry, tokens.cache);
  registerBudgetMetrics(registry, budgets);
  if (attestation) registerAttestationMetrics(registry, attestation);

  const serverDeps: TokenServerDeps = {
    callers: pods,
    attestation,
    identitiesFor: podIdentities,
    settle,
    getToken,
    peekToken: (identity, resource) => tokens.peek(identity, resource),
    upstreamImds: config.upstreamImds,
    refusals: refusalSink,
    proxyBudgets: { identity: budgets.imds, metadata: budgets.metadata },
    options: {
      metadataHeaderRequired: config.metadataHeaderRequired,
      blockInstanceMetadata: config.blockInstanceMetadata,
      retryAfter: config.retryAfter,
      multipleIdentities: config.multipleIdentities,
      maxConnectionsPerSource: config.maxConnectionsPerSource,
    },
    log,
    metrics: registerServerMetrics(registry),
  };
  // Cache hits are answered from tables pushed here (in C++ by native, in the js server's worker thread by js);
  // everything else reaches the same token core. The peers map must exist before the server; loading attaches nothing yet.
  await ebpf?.load();
  const peerMapFd = ebpf?.peerMapFd;
  const native = config.server === 'native' ? createNativeTokenServer(serverDeps, { peerMapFd, countHits: audit !== undefined }) : undefined;
  const server = native ?? createTokenServer(serverDeps, { peerMapFd });
  if (native) registerNativeMetrics(registry, () => native.stats());
  // The audit hears each token the core answers before the tables do; the native server counts its own answers
  // per pod (its tables are then per pod); the js server's worker counts none, so with an audit it is given no tables.
  if (audit) server.onTokenServed(audit.served);
  if (audit && native) audit.countNative(() => native.takeHits());
  tables = audit && !native ? undefined : attachTables(server, {
    pods: () => pods.pods(),
    identitiesFor: podIdentities,
    store,
    cgroupsOf: cgroupPods && ((pod) => cgroupPods.idsOf(pod.uid)),
    perPod: audit !== undefined,
  });

  // /host/token: root through the unix socket; on TCP, only the processes --host-token-allow names, attested by cgroup.
  // A pod's token given to a host process for it is the pod's in the audit too.
  const hostDeps = {
    findPod: (namespace: string, name: string) => pods.lookupName(namespace, name),
    identitiesFor: podIdentities,
    settle,
    getToken: audit ? tellingServed({ getToken }, [audit.served]).getToken : getToken,
    refusals: refusalSink,
    multipleIdentities: config.multipleIdentities,
    log,
  };
  const hostSocket = hostSocketPath ? createHostTokenServer({ ...hostDeps, socketPath: hostSocketPath, fd: listeners.take('host-token') }) : undefined;
  const hostCallers = hostTcp && new HostCallers(new CgroupPods(hostTcp.cgroupMount, { cgroupRoot: config.cgroupRoot }), pods, config.hostTokenAllow, log);
  const hostTokenTcp =
    hostTcp && hostCallers && createHostTokenTcpServer({ ...hostDeps, address: hostTcp.address, fd: listeners.take('host-token-tcp'), admit: (socket) => hostCallers.admit(socket) });
  if (hostCallers) registerHostCallerMetrics(registry, hostCallers);
  const hostServers = [hostSocket, hostTokenTcp].filter((s) => s !== undefined);

  const redirect: Redirect = { metadataIp: config.metadataIp, metadataPort: config.metadataPort, targetIp: config.nodeIp, targetPort: config.port };
  const keeper = new RulesKeeper(backend, redirect, config.syncInterval, log);
  registerRuleMetrics(registry, keeper);
  if (gate) registerStartGateMetrics(registry, gate);
  if (events) registerEventMetrics(registry, events);
  probeDebug.explain = explainHandler({
    pods: () => pods.pods(),
    syncedAt: () => pods.lastSuccessAt,
    refreshPods: () => pods.refreshSoon(),
    snapshot: () => store.snapshot,
    bindingsFrom: config.bindings,
    match,
    multipleIdentities: config.multipleIdentities,
    retryAfter: config.retryAfter,
    tokens: (identityKeys, uid) => tokens.cache.describe(identityKeys, uid),
    refusals,
    served: audit && ((uid) => audit.servedTo(uid)),
  });

  /** touchRules false: a start that failed before installing leaves whatever rules there are alone. */
  const stopAll = async (touchRules: boolean) => {
    readiness.set('server', false);
    // Taken over: the successor holds the listeners and keeps the rules; this one only drains.
    const handedOver = handoff?.handedOver ?? false;
    handoff?.close();
    if (handedOver) {
      touchRules = false;
      log.info('leaving the rules and the listening sockets to the nmi that took over');
      await keeper.release();
    }
    try {
      // Before the redirect goes: from here on no new pod is scheduled on this node.
      if (touchRules && config.onExit === 'remove') {
        status('tainting the node');
        await gate?.close(GATE_CLOSE_TIMEOUT_MS);
      } else {
        await gate?.stop();
      }
      status('draining requests');
      await Promise.all([server.close(), ...hostServers.map((s) => s.close())]);
      tables?.stop();
      // After the last answer: the last interval's records.
      audit?.stop();
      if (touchRules) {
        status(config.onExit === 'remove' ? 'removing rules' : 'keeping rules');
        await keeper.stop(config.onExit === 'remove');
      }
    } finally {
      // Whatever failed above (a rule tool refused, say), no timer or socket may keep the process alive.
      pods.stop();
      store.stop();
      events?.stop();
      void api?.close();
      if (tokenRequester !== api) void tokenRequester?.close();
      await Promise.allSettled([kubelet.close(), network.close()]);
      closeProbe();
      // The socket's file goes with the last process to hold it: not when systemd's store (or whoever
      // handed this process its listeners) or a successor holds it on. A file left behind only refuses.
      const heldElsewhere = hooks.keepListeners !== undefined || listeners.held.some((l) => l.adopted);
      if (hostSocketPath && !handedOver && !heldElsewhere) await rm(hostSocketPath, { force: true }).catch(() => undefined);
    }
  };

  try {
    status('syncing pods from the kubelet');
    await syncPodsFirst(pods, log);
    readiness.set('pods', true);
    status('syncing bindings');
    await store.start();
    await store.whenReady();
    // The Secrets of the identities bound to this node's pods, before the first pod asks.
    tokens.retain();
    await store.settled();
    readiness.set('bindings', true);
    await server.listen(config.nodeIp, config.port, listeners.take('token'));
    for (const host of hostServers) await host.listen();
    readiness.set('server', true);
    log.info({ address: `${config.nodeIp}:${config.port}` }, 'token server listening');
    // Both serve now; the predecessor stops keeping the rules before this one starts to.
    if (predecessor) {
      status('taking the rules over');
      const released = await predecessor.takeRules(TAKE_RULES_TIMEOUT_MS);
      if (!released) log.warn({ predecessor: predecessor.pid }, 'the running nmi did not release the rules in time; keeping them anyway');
    }
    status(`installing ${backend.name} rules`);
    await keeper.install();
    if (config.handoffSocket) handoff = await offerHandoff(config.handoffSocket);
    // Nothing is awaited from here to the caller's SIGTERM handler: /readyz cannot say 200 before it is there.
    readiness.set('rules', true);
    tokens.retain();
    releaseStartupPages(log);
    // Ready: pods may be scheduled here now. Retried in the background until done.
    void gate?.open();
  } catch (err) {
    // Leave nothing listening. Rules are only ever installed last, so any rules
    // there are a crashed predecessor's: they stay, and pods keep failing closed
    // (removing them would hand pods the node's identities at the real IMDS).
    await stopAll(keeper.installed).catch(() => {});
    throw err;
  }

  /** Where the next nmi finds this one; a failure only means no planned handoff from it. */
  async function offerHandoff(socketPath: string): Promise<HandoffServer | undefined> {
    let released = false;
    try {
      return await HandoffServer.listen(socketPath, () => listeners.held, {
        onSuccessor: () => closeProbe(),
        onTakeRules: async () => {
          released = true;
          await keeper.release();
        },
        onSuccessorGone: () => {
          void serveProbe().then((server) => (probe = server));
          if (released) void keeper.install().catch((err: Error) => log.error({ err: err.message }, 'could not keep the rules again'));
          released = false;
        },
      }, log);
    } catch (err) {
      log.warn({ socket: socketPath, err: messageOf(err) }, 'no handoff socket: a new nmi cannot take over from this one');
      return undefined;
    }
  }

  return {
    readiness,
    stop: () => stopAll(true),
  };
}

/** --host-token-address: only where the kernel names sockets' cgroups. */
async function hostTokenTcpConfig(config: RunConfig): Promise<{ address: HostPort; cgroupMount: string } | undefined> {
  const address = config.hostTokenAddress;
  if (!address) return undefined;
  const [cgroupMount] = mountsOfType('cgroup2');
  if (!cgroupMount) throw new UsageError('--host-token-address: no cgroup v2 hierarchy is mounted, so callers cannot be attested');
  // Pods are known by where the kubelet puts them under its cgroup root; a root outside the walked mount would make every pod a host process.
  if (within(cgroupMount, config.cgroupRoot) === undefined)
    throw new UsageError(`--cgroup-root: ${config.cgroupRoot} is not under the cgroup v2 mount ${cgroupMount}, so --host-token-address cannot tell pods from host processes`);
  const unsupported = await socketCgroupsUnsupported();
  if (unsupported) throw new UsageError(`--host-token-address: callers cannot be attested here: ${unsupported}`);
  return { address, cgroupMount };
}

/**
 * The probe address is bound first: when it is taken, say whether by another nmi (which
 * names itself in its answers) before anything on the host is touched.
 */
async function holdProbe(listeners: Listeners, address: HostPort): Promise<void> {
  try {
    listeners.hold('probe', address);
  } catch (err) {
    if (!(err instanceof ListenError) || err.errno !== EADDRINUSE) throw err;
    const other = await nmiAt(address);
    throw new NmiError(
      codes.LISTEN,
      other
        ? `another nmi (pid ${other}) already runs on this node: its probe answers on ${address.host}:${address.port}; stop it first`
        : `--probe-address ${address.host}:${address.port}: in use by another program`,
    );
  }
}

/** The pid of the nmi answering on a probe address, or undefined when none does. */
async function nmiAt(address: HostPort): Promise<number | undefined> {
  try {
    const res = await request(probeUrl(address, '/healthz'), { headersTimeout: 2000, bodyTimeout: 2000 });
    await res.body.dump();
    const pid = Number(res.headers[PID_HEADER.toLowerCase()]);
    return Number.isInteger(pid) && pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}

/** --start-taint: the node's name and an API server to patch it through, or a usage error. */
function startGate(config: RunConfig, log: Logger): StartGate | undefined {
  if (!config.startTaint || !config.nodeName) return undefined;
  const client = new KubeClient(loadKubeConfig({ kubeconfig: config.kubeconfig }, '--start-taint'), `nmi (node ${config.nodeName})`);
  return new StartGate({ client, nodeName: config.nodeName, taint: config.startTaint, log });
}

/**
 * The API server for Events on refused pods and federated identities' service-account tokens: the one the
 * bindings come from, or --kubeconfig's with file bindings; none when bindings come from a file and no API
 * server is configured (in-cluster or --kubeconfig).
 */
function apiServer(config: RunConfig, nodeName: string, log: Logger): KubeClient | undefined {
  try {
    return new KubeClient(loadKubeConfig({ kubeconfig: config.kubeconfig }, '--bindings kubernetes'), `nmi (node ${nodeName})`);
  } catch (err) {
    if (config.bindings === 'kubernetes') throw err;
    log.info('no API server configured (--bindings is a file, no --kubeconfig): no Events on pods, no federated identities');
    return undefined;
  }
}

/** Startup is over: its code pages need not stay mapped (startup-pages.ts). */
function releaseStartupPages(log: Logger): void {
  try {
    const { mappings, rssFileKiB, errors } = dropStartupPages();
    const mib = (kib: number) => Math.round(kib / 102.4) / 10;
    log.info({ mappings, rssFileMiB: rssFileKiB.map(mib), errors: errors.length > 0 ? errors : undefined }, 'dropped the pages of startup-only code');
  } catch (err) {
    log.warn({ err: messageOf(err) }, 'could not drop the pages of startup-only code');
  }
}

/**
 * A kubelet that refuses connections is not running yet (systemd starts nmi
 * before it), so the node has no pods: that is a complete first sync. Any
 * other failure (TLS, auth) is a misconfiguration and stops the start.
 */
async function syncPodsFirst(pods: PodIndex, log: Logger): Promise<void> {
  try {
    await pods.start();
  } catch (err) {
    if (!/ECONNREFUSED/.test(messageOf(err))) throw err;
    log.warn('kubelet not listening yet: starting with no pods, polling until it answers');
  }
}
