// Every command's flags, as CONTRACT.md lists them. One table per command; the
// defaults are written as an operator would type them.
import { UsageError } from '../errors/errors.js';
import { flag, type FlagSpecs, type Parsed } from './flags.js';
import { defaultNodeIp } from './node-ip.js';
import * as v from './values.js';

export const rulesBackends = ['auto', 'iptables', 'nftables', 'ebpf', 'none'] as const;
export type RulesChoice = (typeof rulesBackends)[number];
/** --multiple-identities: what a request naming no id gets when the pod has several bound. */
export const multipleIdentitiesChoices = ['first', 'refuse'] as const;
export type MultipleIdentities = (typeof multipleIdentitiesChoices)[number];

function requiredNodeIp(): string {
  const ip = defaultNodeIp();
  if (!ip) throw new UsageError('--node-ip: no IPv4 address on the default-route interface; set --node-ip');
  return ip;
}

export const metadataFlags = {
  'metadata-ip': flag({ parse: v.ipv4, default: '169.254.169.254', help: 'the metadata address that is intercepted' }),
  'metadata-port': flag({ parse: v.port, default: '80', help: 'the metadata port that is intercepted' }),
} satisfies FlagSpecs;

export const runFlags = {
  'node-name': flag({ parse: v.nonEmpty, default: () => process.env.NODE_NAME, help: "this node's name [$NODE_NAME]" }),
  'node-ip': flag({ parse: v.ipv4, default: () => requiredNodeIp(), help: 'address pods are redirected to and the token server listens on [auto: the default-route interface]' }),
  port: flag({ parse: v.port, default: '2579', help: 'token server port' }),
  ...metadataFlags,
  'upstream-imds': flag({ parse: v.httpUrl, default: 'http://169.254.169.254', help: 'the real IMDS, reached from the host' }),
  rules: flag({ parse: v.oneOf(rulesBackends), default: 'auto', help: 'iptables, nftables, ebpf, none, or auto (iptables when present, else nftables)' }),
  'cgroup-root': flag({ parse: v.nonEmpty, default: '/sys/fs/cgroup/kubepods.slice', help: 'ebpf backend: cgroup v2 folder above all pods' }),
  'on-exit': flag({ parse: v.oneOf(['remove', 'keep'] as const), default: 'remove', help: 'remove the rules on SIGTERM/SIGINT, or keep them (pods fail closed)' }),
  'sync-interval': flag({ parse: v.duration, default: '5s', help: 'how often installed rules are verified and repaired' }),
  'kubelet-url': flag({ parse: v.httpUrl, default: 'https://127.0.0.1:10250', help: 'kubelet API; /pods is read from it' }),
  'kubelet-ca': flag({ parse: v.readableFile, help: 'CA bundle for the kubelet serving certificate' }),
  'kubelet-client-cert': flag({ parse: v.readableFile, help: 'client certificate for the kubelet' }),
  'kubelet-client-key': flag({ parse: v.readableFile, help: 'client key for the kubelet' }),
  'kubelet-token-file': flag({ parse: v.readableFile, help: 'bearer token file for the kubelet' }),
  'kubelet-server-name': flag({ parse: v.nonEmpty, help: "name to verify in the kubelet's serving certificate" }),
  'pod-refresh-interval': flag({ parse: v.duration, default: '10s', help: 'background kubelet poll' }),
  bindings: flag({ parse: v.nonEmpty, default: 'kubernetes', help: '"kubernetes" (the API server) or a YAML/JSON file or folder' }),
  kubeconfig: flag({ parse: v.readableFile, help: 'kubeconfig for the API server (else in-cluster config)' }),
  'token-request-kubeconfig': flag({ parse: v.readableFile, help: 'a kubeconfig whose credential requests the pods\' service-account tokens for federated identities instead of nmi\'s own: the kubelet\'s (/var/lib/kubelet/kubeconfig), which the Node authorizer lets ask only for pods bound to this node' }),
  'force-namespaced': flag({ parse: v.bool, default: 'false', boolean: true, help: 'identities match only pods of their own namespace, those of --shared-identity-namespaces too' }),
  'shared-identity-namespaces': flag({ parse: v.namespaceList, default: '', help: 'namespaces whose bindings may give their identities to pods of other namespaces, comma-separated, or * for every namespace (NMI\'s behaviour); any other binding serves only pods of its own namespace' }),
  'cross-namespace-secrets': flag({ parse: v.bool, default: 'false', boolean: true, help: 'let a service principal\'s clientPassword name a Secret of another namespace than its AzureIdentity\'s (NMI\'s behaviour)' }),
  'metadata-header-required': flag({ parse: v.bool, default: 'true', boolean: true, help: 'require the Metadata: true header' }),
  'block-instance-metadata': flag({ parse: v.bool, default: 'false', boolean: true, help: 'answer 403 for /metadata/instance*' }),
  'retry-after': flag({ parse: v.bool, default: 'false', boolean: true, help: '"no identity yet" answers 503 with Retry-After instead of 400' }),
  server: flag({ parse: v.oneOf(['native', 'js'] as const), default: 'native', help: 'native (C++ fast path) or js' }),
  'probe-address': flag({ parse: v.hostPort, default: '127.0.0.1:8085', help: '/healthz, /readyz, /metrics' }),
  'host-token-socket': flag({ parse: v.offOrPath, default: 'off', help: 'root-only unix socket serving /host/token' }),
  'host-token-address': flag({ parse: v.offOrHostPort, default: 'off', help: "/host/token/ on TCP in NMI's shape, for the Key Vault CSI provider (NMI's: 127.0.0.1:2579)" }),
  'host-token-allow': flag({ parse: v.hostCallerRules, default: '', help: 'who may call --host-token-address: namespace/label=value pod selectors and host-root, comma-separated' }),
  'multiple-identities': flag({ parse: v.oneOf(multipleIdentitiesChoices), default: 'first', help: 'several identities bound and none requested: first (by namespace, then name, as NMI) or refuse (IMDS\'s 400)' }),
  'take-over': flag({ parse: v.bool, default: 'false', boolean: true, help: 'take the listening sockets and the rules over from an nmi running on this node (a DaemonSet rolling update with maxSurge); without it, finding one is an error' }),
  'handoff-socket': flag({ parse: v.offOrPath, default: '/run/nmi/handoff.sock', help: 'where a running nmi offers its listening sockets to the one taking over (root only), or off' }),
  'start-taint': flag({ parse: v.startTaint, default: 'off', help: 'DaemonSet start gate: the taint nodes register with (KEY[=VALUE]:EFFECT, as kubelet --register-with-taints), removed from this node once nmi is ready and put back on a stop that removes the rules' }),
  'imds-max-concurrent': flag({ parse: v.positiveInt, default: '5', help: "token calls nmi has in flight to IMDS at most (IMDS's documented limit)" }),
  'imds-max-rate': flag({ parse: v.rate, default: '20/s', help: "token calls nmi starts toward IMDS per second at most (IMDS's documented limit)" }),
  'imds-metadata-max-rate': flag({ parse: v.rate, default: '5/s', help: "proxied calls to IMDS's other categories per second at most (IMDS's general limit)" }),
  'aad-max-concurrent': flag({ parse: v.positiveInt, default: '10', help: 'token calls in flight to one Entra ID tenant at most' }),
  'aad-max-rate': flag({ parse: v.rate, default: '20/s', help: 'token calls started toward one Entra ID tenant per second at most' }),
  'max-connections-per-source': flag({ parse: v.positiveInt, default: '64', help: 'connections one caller (a source address; with --rules ebpf, an address and cgroup) may hold open to the token port; past it, 429' }),
  'max-tokens-per-pod': flag({ parse: v.positiveInt, default: '64', help: 'distinct (identity, resource) tokens one pod may hold; past it, 429' }),
  'max-pending-per-pod': flag({ parse: v.positiveInt, default: '16', help: 'token calls one pod may have waiting for their turn upstream; past it, 429' }),
  'workload-identity-tenant': flag({ parse: v.nonEmpty, help: 'Workload ID convention: the Entra ID tenant of service accounts annotated azure.workload.identity/client-id without azure.workload.identity/tenant-id' }),
  'pod-events': flag({ parse: v.bool, default: 'true', boolean: true, help: 'Kubernetes Events on pods nmi refuses (no identity, several, unknown caller, spoof), deduplicated into series; needs create and patch on events.k8s.io events' }),
  'aad-authority-host': flag({ parse: v.httpUrl, default: 'https://login.microsoftonline.com', help: 'Entra ID, for service-principal identities' }),
  'aad-endpoint-allow': flag({ parse: v.hostList, default: '', help: 'hosts an AzureIdentity\'s adEndpoint may name besides Entra ID\'s own (public, US Government, China) and --aad-authority-host\'s, comma-separated' }),
  'audit-log': flag({ parse: v.offStdoutOrPath, default: 'off', help: 'which pod got which token: JSON lines to this file (written before the answer), - for standard output, or off' }),
  'audit-interval': flag({ parse: v.duration, default: '1m', help: 'how often the audit stream counts the tokens each pod was answered and the refusals' }),
  'audit-max-size': flag({ parse: v.byteSize, default: '100M', help: 'the audit file is rotated before it grows past this size (K, M, G: powers of 1024)' }),
  'audit-max-files': flag({ parse: v.positiveInt, default: '5', help: 'rotated audit files kept (FILE.1 newest to FILE.N)' }),
  'log-level': flag({ parse: v.oneOf(['trace', 'debug', 'info', 'warn', 'error'] as const), default: 'info', help: 'log level' }),
  'log-format': flag({ parse: v.oneOf(['json', 'text'] as const), default: 'json', help: 'log format' }),
} satisfies FlagSpecs;

export type RunConfig = Parsed<typeof runFlags>;

/** The flags of `nmi run` that need one another: a usage error naming the flag, before anything is touched. */
export function checkRunConfig(config: RunConfig): void {
  if (config.kubeletClientCert && !config.kubeletClientKey) throw new UsageError('--kubelet-client-key: required with --kubelet-client-cert');
  if (config.kubeletClientKey && !config.kubeletClientCert) throw new UsageError('--kubelet-client-cert: required with --kubelet-client-key');
  if (config.hostTokenAllow.length > 0 && !config.hostTokenAddress) throw new UsageError('--host-token-allow: needs --host-token-address');
  if (config.hostTokenAddress && config.hostTokenAllow.length === 0) throw new UsageError('--host-token-address: needs --host-token-allow (no caller would be let in)');
  if (config.takeOver && !config.handoffSocket) throw new UsageError('--take-over: needs --handoff-socket');
  if (config.startTaint && !config.nodeName) throw new UsageError('--start-taint: needs --node-name (or $NODE_NAME), the Node to take the taint off');
}

export const cleanupFlags = {} satisfies FlagSpecs;

export const statusFlags = {
  json: flag({ parse: v.bool, default: 'false', boolean: true, help: 'machine-readable output' }),
  'probe-address': runFlags['probe-address'],
} satisfies FlagSpecs;

export const explainFlags = statusFlags;

export const demoFlags = {} satisfies FlagSpecs;
