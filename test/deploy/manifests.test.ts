// deploy/ as operators apply it: `kubectl kustomize` renders the base, every
// overlay and every grant (with the kubectl on PATH: Debian 12's kubernetes-client
// embeds the oldest kustomize the files are written for). The base's DaemonSet runs
// nmi the way the contract needs (host network, probes, capabilities, xtables lock,
// downward API) on worker nodes only; each overlay changes it only as it says and
// mounts certificates one file at a time; the base's RBAC is exactly what a cluster
// of user-assigned identities needs, and each further privilege is in its own grant,
// checked against the requests nmi's own Kubernetes source, Events, federation and
// start gate make to a stand-in API server; the CRDs are the ones it reads, and
// their schemas keep every field it parses.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { isDeepStrictEqual } from 'node:util';
import { parse, parseAllDocuments } from 'yaml';
import { CRD_PATH, KubeBindingSource } from '../../src/bindings/kube-source.js';
import type { BindingSet } from '../../src/bindings/parse.js';
import { CRD_API_VERSION, parseObject } from '../../src/bindings/parse.js';
import { runFlags } from '../../src/config/commands.js';
import { envName, parseFlags } from '../../src/config/flags.js';
import { silentLogger } from '../../src/log/logger.js';
import { KubeClient } from '../../src/kube/client.js';
import { loadKubeConfig } from '../../src/kube/kubeconfig.js';
import { PodEvents } from '../../src/events/pod-events.js';
import { ServiceAccountTokens } from '../../src/kube/service-account-token.js';
import { formatTaint, StartGate } from '../../src/lifecycle/start-gate.js';
import { startApiServer, type KubeObject } from '../standins/apiserver.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const deployDir = path.join(root, 'deploy');
const tmp = mkdtempSync(path.join(tmpdir(), 'nmi-deploy-'));
after(() => rmSync(tmp, { recursive: true, force: true }));

type Doc = Record<string, any>;

/** Every kustomization operators apply, and the kinds its render holds. */
const BASE_KINDS = ['ClusterRole', 'ClusterRoleBinding', 'DaemonSet', 'ServiceAccount'];
const CRD3 = ['CustomResourceDefinition', 'CustomResourceDefinition', 'CustomResourceDefinition'];
const GRANT = ['ClusterRole', 'ClusterRoleBinding'];
/** Each further privilege: its folder under deploy/grants/, and exactly the rules it adds. */
const grantRules: Record<string, Doc[]> = {
  'service-principals': [{ apiGroups: [''], resources: ['secrets'], verbs: ['get'] }],
  federation: [
    { apiGroups: [''], resources: ['serviceaccounts'], verbs: ['get'] },
    { apiGroups: [''], resources: ['serviceaccounts/token'], verbs: ['create'] },
  ],
  'pod-events': [{ apiGroups: ['events.k8s.io'], resources: ['events'], verbs: ['create', 'patch'] }],
  'start-gate': [{ apiGroups: [''], resources: ['nodes'], verbs: ['get', 'patch'] }],
  'kubelet-proxy': [{ apiGroups: [''], resources: ['nodes/proxy'], verbs: ['get'] }],
};
const expectedKinds: Record<string, string[]> = {
  base: BASE_KINDS,
  'overlays/standalone': [...BASE_KINDS, ...CRD3],
  'overlays/aks-engine': BASE_KINDS,
  'overlays/start-gate': [...BASE_KINDS, ...GRANT],
  'overlays/pod-events': [...BASE_KINDS, ...GRANT],
  'overlays/control-plane': BASE_KINDS,
  // Listed beside an overlay in an operator's own, or applied beside one (README): no DaemonSet of their own.
  crds: CRD3,
  ...Object.fromEntries(Object.keys(grantRules).map((g) => [`grants/${g}`, GRANT])),
};
/** What each overlay changes in the base's DaemonSet: env entries, volumes and pod spec fields, by name; and the grants it adds. */
const overlayChanges: Record<string, { env: string[]; volumes: string[]; pod: string[]; grants: string[] }> = {
  'overlays/standalone': { env: [], volumes: [], pod: [], grants: [] },
  'overlays/aks-engine': {
    env: ['NMI_KUBELET_CA', 'NMI_KUBELET_CLIENT_CERT', 'NMI_KUBELET_CLIENT_KEY', 'NMI_KUBELET_TOKEN_FILE'],
    volumes: ['kubelet-ca', 'kubelet-client-cert', 'kubelet-client-key'],
    pod: [],
    grants: [],
  },
  'overlays/start-gate': { env: ['NMI_START_TAINT'], volumes: [], pod: [], grants: ['start-gate'] },
  'overlays/pod-events': { env: ['NMI_POD_EVENTS'], volumes: [], pod: [], grants: ['pod-events'] },
  'overlays/control-plane': { env: [], volumes: [], pod: ['affinity'], grants: [] },
};

const renders = new Map<string, Doc[]>();
/** `kubectl kustomize deploy/<dir>`'s objects, rendered once. */
function render(dir: string): Doc[] {
  let docs = renders.get(dir);
  if (docs) return docs;
  let out: string;
  try {
    out = execFileSync('kubectl', ['kustomize', path.join('deploy', dir)], { cwd: root, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stderr?: string };
    if (e.code === 'ENOENT') throw new Error('kubectl not found: the deploy/ checks render it with `kubectl kustomize`; install it with scripts/install-deps.sh (Debian\'s kubernetes-client)');
    throw new Error(`kubectl kustomize deploy/${dir} failed: ${e.stderr?.trim() || e.message}`);
  }
  docs = parseAllDocuments(out).map((d) => {
    assert.deepEqual(d.errors, [], `deploy/${dir}: ${d.errors.join('; ')}`);
    return d.toJS() as Doc;
  });
  renders.set(dir, docs);
  return docs;
}
const all = (docs: Doc[], kind: string): Doc[] => docs.filter((d) => d.kind === kind);
const one = (docs: Doc[], kind: string): Doc => {
  const found = all(docs, kind);
  assert.equal(found.length, 1, `exactly one ${kind}`);
  return found[0]!;
};

/** The render's DaemonSet, its pod, its one container and that container's environment by name. */
function nmiPod(dir: string) {
  const ds = one(render(dir), 'DaemonSet');
  const pod: Doc = ds.spec.template.spec;
  const container: Doc = pod.containers[0];
  const env = new Map<string, Doc>((container.env as Doc[]).map((e) => [e.name, e]));
  return { ds, pod, container, env, envValue: (name: string): string | undefined => env.get(name)?.value };
}

/** What the token server's drain allows in-flight requests (src/server/token-server.ts). */
const DRAIN_SECONDS = 10;

/** deploy/'s kustomization files, by folder relative to deploy/. */
function kustomizations(dir = deployDir): Map<string, Doc> {
  const found = new Map<string, Doc>();
  for (const name of readdirSync(dir)) {
    const full = path.join(dir, name);
    if (statSync(full).isDirectory()) for (const [k, v] of kustomizations(full)) found.set(k, v);
    else if (name === 'kustomization.yaml') found.set(path.relative(deployDir, dir), parse(readFileSync(full, 'utf8')) as Doc);
  }
  return found;
}

test('deploy/: every manifest belongs to a kustomization kubectl 1.20 reads; one comment-headed kustomization per overlay', () => {
  const found = kustomizations();
  assert.deepEqual([...found.keys()].sort(), Object.keys(expectedKinds).sort());
  assert.deepEqual(readdirSync(path.join(deployDir, 'overlays')).sort(), Object.keys(overlayChanges).map((o) => path.basename(o)).sort());
  const used = new Set<string>();
  for (const [dir, k] of found) {
    // kubectl 1.20's kustomize takes folders only under bases:, files only under resources:.
    for (const r of k.resources ?? []) assert.ok(statSync(path.join(deployDir, dir, r)).isFile(), `${dir}: resources: ${r} must be a file (kubectl 1.20 takes folders under bases:)`);
    for (const b of k.bases ?? []) assert.ok(existsSync(path.join(deployDir, dir, b, 'kustomization.yaml')), `${dir}: bases: ${b} must be a folder with a kustomization.yaml`);
    for (const f of [...(k.resources ?? []), ...(k.patchesStrategicMerge ?? [])]) used.add(path.join(dir, f));
    if (dir.startsWith('overlays/')) assert.match(readFileSync(path.join(deployDir, dir, 'kustomization.yaml'), 'utf8'), /^# \S/, `${dir} says when to use it`);
  }
  const manifests = (dir: string): string[] =>
    readdirSync(path.join(deployDir, dir)).flatMap((name) => {
      const rel = path.join(dir, name);
      // monitoring/ holds Prometheus rules and a Grafana dashboard, not Kubernetes objects (test/metrics/ checks them).
      if (rel === 'monitoring') return [];
      if (statSync(path.join(deployDir, rel)).isDirectory()) return manifests(rel);
      return /\.ya?ml$/.test(name) && name !== 'kustomization.yaml' ? [rel] : [];
    });
  assert.deepEqual(manifests('').sort(), [...used].sort(), 'no manifest outside the kustomizations (nor one they name missing)');
});

test('kubectl kustomize renders the base and every overlay, each with exactly its kinds', (t) => {
  for (const [dir, kinds] of Object.entries(expectedKinds)) {
    const docs = render(dir);
    assert.deepEqual(docs.map((d) => d.kind).sort(), [...kinds].sort(), dir);
    for (const doc of docs) assert.ok(doc.apiVersion && doc.kind && doc.metadata?.name, `${dir}: apiVersion, kind, metadata.name`);
    assert.ok(docs.every((d) => d.metadata.labels?.['app.kubernetes.io/name'] === 'nmi'), `${dir}: every object labelled app.kubernetes.io/name=nmi`);
  }
  t.diagnostic(execFileSync('kubectl', ['version', '--client'], { encoding: 'utf8' }).split('\n')[0]!);
});

/** The names whose entries differ between two name-keyed lists (added, removed or changed). */
function changed(a: Doc[] = [], b: Doc[] = []): string[] {
  const byName = (l: Doc[]) => new Map(l.map((e) => [e.name as string, e]));
  const [ma, mb] = [byName(a), byName(b)];
  return [...new Set([...ma.keys(), ...mb.keys()])].filter((n) => !isDeepStrictEqual(ma.get(n), mb.get(n))).sort();
}

test('every overlay keeps the base as it is, but for the env entries, volumes and pod fields it is for', () => {
  const base = render('base');
  const { ds, pod } = nmiPod('base');
  const strip = (d: Doc, fields: string[]): Doc => {
    const copy = structuredClone(d);
    const spec = copy.spec.template.spec;
    delete spec.volumes;
    for (const f of fields) delete spec[f];
    for (const c of spec.containers) {
      delete c.env;
      delete c.volumeMounts;
    }
    return copy;
  };
  for (const [dir, changes] of Object.entries(overlayChanges)) {
    const docs = render(dir);
    for (const doc of base.filter((d) => d.kind !== 'DaemonSet')) {
      assert.ok(docs.some((d) => isDeepStrictEqual(d, doc)), `${dir} keeps the base's ${doc.kind} ${doc.metadata.name}`);
    }
    const other = nmiPod(dir);
    assert.deepEqual(strip(other.ds, changes.pod), strip(ds, changes.pod), `${dir}: the DaemonSet but for env, volumes and ${changes.pod.join(', ') || 'no pod field'}`);
    for (const f of changes.pod) assert.notDeepEqual(other.pod[f], pod[f], `${dir} changes ${f}`);
    assert.deepEqual(changed(other.container.env, nmiPod('base').container.env), changes.env, `${dir}: env entries changed`);
    assert.deepEqual(changed(other.pod.volumes, nmiPod('base').pod.volumes), changes.volumes, `${dir}: volumes changed`);
    assert.deepEqual(changed(other.container.volumeMounts, nmiPod('base').container.volumeMounts), changes.volumes, `${dir}: mounts changed`);
  }
});

test('DaemonSet: host network, critical priority, one container with the nmi service account', () => {
  const { ds, pod } = nmiPod('base');
  assert.equal(ds.apiVersion, 'apps/v1');
  assert.deepEqual(ds.spec.selector.matchLabels, ds.spec.template.metadata.labels);
  assert.equal(pod.hostNetwork, true);
  assert.equal(pod.dnsPolicy, 'ClusterFirstWithHostNet');
  assert.equal(pod.priorityClassName, 'system-node-critical');
  assert.equal(pod.containers.length, 1);
  const sa = one(render('base'), 'ServiceAccount');
  assert.equal(pod.serviceAccountName, sa.metadata.name);
  assert.equal(ds.metadata.namespace, sa.metadata.namespace);
  assert.notEqual(pod.automountServiceAccountToken, false, 'the API server and kubelet token come from the automounted service account');
});

/** Whether a toleration lets a pod onto a node with this taint, as the scheduler matches them. */
function tolerates(tolerations: Doc[] = [], taint: { key: string; value?: string; effect: string }): boolean {
  return tolerations.some((t) => {
    if (t.effect && t.effect !== taint.effect) return false;
    if (!t.key) return t.operator === 'Exists';
    if (t.key !== taint.key) return false;
    return t.operator === 'Exists' || (t.value ?? '') === (taint.value ?? '');
  });
}
/** The labels and taints kubeadm (control-plane; master before 1.24/1.25) and other installers put on control-plane nodes. */
const controlPlane = ['node-role.kubernetes.io/control-plane', 'node-role.kubernetes.io/master'];
/** Whether the pod's required node affinity admits a node with these labels (terms are ORed, expressions ANDed). */
function admits(pod: Doc, labels: Record<string, string>): boolean {
  const terms: Doc[] | undefined = pod.affinity?.nodeAffinity?.requiredDuringSchedulingIgnoredDuringExecution?.nodeSelectorTerms;
  const selector: Record<string, string> = pod.nodeSelector ?? {};
  if (!Object.entries(selector).every(([k, v]) => labels[k] === v)) return false;
  if (!terms) return true;
  return terms.some((term) =>
    (term.matchExpressions as Doc[]).every((e) => {
      const has = Object.hasOwn(labels, e.key);
      switch (e.operator) {
        case 'DoesNotExist': return !has;
        case 'Exists': return has;
        case 'In': return has && e.values.includes(labels[e.key]);
        case 'NotIn': return !has || !e.values.includes(labels[e.key]);
        default: return assert.fail(`operator ${e.operator} not modelled here`);
      }
    }),
  );
}

test('DaemonSet: every worker node whatever its taints, control-plane nodes excluded by affinity; the control-plane overlay puts nmi on every node', () => {
  const worker = { 'kubernetes.io/os': 'linux' };
  for (const dir of ['base', ...Object.keys(overlayChanges).filter((o) => o !== 'overlays/control-plane')]) {
    const { pod } = nmiPod(dir);
    assert.equal(admits(pod, worker), true, `${dir}: a Linux worker node`);
    for (const key of controlPlane) {
      assert.equal(admits(pod, { ...worker, [key]: '' }), false, `${dir}: a node labelled ${key}`);
      assert.equal(admits(pod, { ...worker, [key]: 'true' }), false, `${dir}: a node labelled ${key}=true`);
    }
    // A node without nmi leaks the node's identities: a tainted worker pool gets nmi too, and keeps it through
    // node conditions' taints as long as the node's pods are there.
    assert.equal(tolerates(pod.tolerations, { key: 'nvidia.com/gpu', value: 'present', effect: 'NoSchedule' }), true, `${dir}: a GPU pool's taint`);
    assert.equal(tolerates(pod.tolerations, { key: 'node.kubernetes.io/unreachable', effect: 'NoExecute' }), true, `${dir}: NoExecute`);
  }
  const { pod } = nmiPod('overlays/control-plane');
  for (const key of controlPlane) {
    assert.equal(admits(pod, { 'kubernetes.io/os': 'linux', [key]: '' }), true, `control-plane: a node labelled ${key}`);
    assert.equal(tolerates(pod.tolerations, { key, effect: 'NoSchedule' }), true, `control-plane: tolerates ${key}:NoSchedule`);
  }
  assert.equal(tolerates(pod.tolerations, { key: 'nvidia.com/gpu', value: 'present', effect: 'NoSchedule' }), true, 'control-plane: every taint');
});

test('DaemonSet: least privilege — NET_ADMIN and NET_RAW on top of nothing, read-only root', () => {
  const { pod, container } = nmiPod('base');
  const sc: Doc = container.securityContext;
  assert.deepEqual(sc.capabilities, { drop: ['ALL'], add: ['NET_ADMIN', 'NET_RAW'] });
  assert.equal(sc.runAsUser, 0);
  assert.equal(sc.privileged, false);
  assert.equal(sc.allowPrivilegeEscalation, false);
  assert.equal(sc.readOnlyRootFilesystem, true);
  assert.equal(pod.securityContext?.seccompProfile?.type, 'RuntimeDefault');
  assert.equal(pod.hostPID, undefined);
});

test('DaemonSet: updates surge and hand over (one pod per node never missing), through the host\'s /run/nmi', () => {
  const { ds, pod, container, envValue } = nmiPod('base');
  assert.deepEqual(ds.spec.updateStrategy, { type: 'RollingUpdate', rollingUpdate: { maxSurge: 1, maxUnavailable: 0 } });
  assert.equal(envValue('NMI_TAKE_OVER'), 'true');
  const socket = runFlags['handoff-socket'].default;
  const volume = (pod.volumes as Doc[]).find((v) => v.hostPath?.path === path.dirname(socket));
  assert.ok(volume, `hostPath ${path.dirname(socket)}`);
  const mount = (container.volumeMounts as Doc[]).find((m) => m.name === volume.name);
  assert.equal(mount?.mountPath, path.dirname(socket));
  assert.notEqual(mount?.readOnly, true);
});

test('DaemonSet: the xtables lock is the host one, writable', () => {
  const { pod, container } = nmiPod('base');
  const volume = (pod.volumes as Doc[]).find((v) => v.hostPath?.path === '/run/xtables.lock');
  assert.ok(volume, 'hostPath /run/xtables.lock');
  assert.equal(volume.hostPath.type, 'FileOrCreate');
  const mount = (container.volumeMounts as Doc[]).find((m) => m.name === volume.name);
  assert.equal(mount?.mountPath, '/run/xtables.lock');
  assert.notEqual(mount?.readOnly, true);
});

test('DaemonSet: node name and node IP from the downward API', () => {
  const { env, envValue } = nmiPod('base');
  assert.deepEqual(env.get('NODE_NAME')?.valueFrom, { fieldRef: { fieldPath: 'spec.nodeName' } });
  assert.deepEqual(env.get('NMI_NODE_IP')?.valueFrom, { fieldRef: { fieldPath: 'status.hostIP' } });
  assert.equal(envValue('NMI_BINDINGS'), 'kubernetes');
  assert.ok(['keep', 'remove'].includes(envValue('NMI_ON_EXIT') ?? 'remove'));
});

test('every render: each NMI_ variable is a real flag, and $(VAR) refers to one defined before it', () => {
  const flagVars = new Set(Object.keys(runFlags).map(envName));
  for (const dir of ['base', ...Object.keys(overlayChanges)]) {
    const { env, envValue } = nmiPod(dir);
    const unknown = [...env.keys()].filter((n) => n.startsWith('NMI_') && !flagVars.has(n));
    assert.deepEqual(unknown, [], dir);
    // $(VAR) expands only variables defined earlier in the list (a strategic-merge patch puts new ones first).
    const names = [...env.keys()];
    for (const [i, name] of names.entries()) {
      for (const [, ref] of (envValue(name) ?? '').matchAll(/\$\((\w+)\)/g)) {
        assert.ok(names.slice(0, i).includes(ref!), `${dir}: ${name} refers to ${ref}, defined before it`);
      }
    }
  }
});

test('DaemonSet: kubelet reached on the node address with the service account token', () => {
  const { envValue } = nmiPod('base');
  assert.equal(envValue('NMI_KUBELET_URL'), 'https://$(NMI_NODE_IP):10250');
  assert.equal(envValue('NMI_KUBELET_TOKEN_FILE'), '/var/run/secrets/kubernetes.io/serviceaccount/token');
  assert.equal(envValue('NMI_KUBELET_CA'), '/var/run/secrets/kubernetes.io/serviceaccount/ca.crt');
});

test("aks-engine: the kubelet's client certificate, key and CA from the host's /etc/kubernetes/certs, each file alone, read-only; no token", () => {
  const { pod, container, env, envValue } = nmiPod('overlays/aks-engine');
  // The files systemd/nmi.env names on AKS Engine nodes (test/systemd/unit.test.ts checks those).
  for (const [name, file] of [['NMI_KUBELET_CA', 'ca.crt'], ['NMI_KUBELET_CLIENT_CERT', 'client.crt'], ['NMI_KUBELET_CLIENT_KEY', 'client.key']] as const) {
    const host = path.posix.join('/etc/kubernetes/certs', file);
    assert.equal(envValue(name), host, `${name}: the host's path, seen at the same place`);
    const volume = (pod.volumes as Doc[]).find((v) => v.hostPath?.path === host) ?? assert.fail(`hostPath ${host}`);
    assert.equal(volume.hostPath.type, 'File', `${host}: a file, not a folder`);
    const mount = (container.volumeMounts as Doc[]).find((m) => m.name === volume.name) ?? assert.fail(`${volume.name} mounted`);
    assert.deepEqual([mount.mountPath, mount.readOnly, mount.subPath], [host, true, undefined], `${volume.name} mounted read-only at ${host}`);
  }
  assert.equal(env.has('NMI_KUBELET_TOKEN_FILE'), false, 'no token file: the kubelet authenticates the client certificate');
});

/** The flags whose value is a credential file nmi reads. */
const credentialFlags = ['NMI_KUBELET_CA', 'NMI_KUBELET_CLIENT_CERT', 'NMI_KUBELET_CLIENT_KEY', 'NMI_KUBELET_TOKEN_FILE', 'NMI_KUBECONFIG'];
/** Where hosts keep certificates and keys: a host folder under one of these is a folder of them. */
const certificateFolders = ['/etc/kubernetes', '/var/lib/kubelet', '/etc/pki', '/etc/ssl', '/usr/local/share/ca-certificates', '/etc/srv/kubernetes'];
const under = (p: string, folder: string): boolean => p === folder || p.startsWith(`${folder}/`) || folder.startsWith(`${p}/`) || p === '/';

test('every render: certificates and keys mounted one file at a time, read-only, never a folder of them', () => {
  for (const dir of ['base', ...Object.keys(overlayChanges)]) {
    const { pod, container, envValue } = nmiPod(dir);
    const mounts = (container.volumeMounts ?? []) as Doc[];
    const credentials = credentialFlags.map(envValue).filter((v): v is string => v !== undefined);
    for (const volume of (pod.volumes ?? []) as Doc[]) {
      if (!volume.hostPath) continue;
      const mount = mounts.find((m) => m.name === volume.name) ?? assert.fail(`${dir}: ${volume.name} mounted`);
      const holdsCredential = credentials.some((file) => file === mount.mountPath || file.startsWith(`${mount.mountPath}/`));
      if (!holdsCredential && !certificateFolders.some((f) => under(volume.hostPath.path, f))) continue;
      const what = `${dir}: hostPath ${volume.hostPath.path}`;
      assert.equal(volume.hostPath.type, 'File', `${what} is a file (type: File), not a folder of certificates`);
      assert.notEqual(path.posix.extname(volume.hostPath.path), '', `${what} names a file`);
      assert.ok(credentials.includes(mount.mountPath), `${what} is mounted exactly where a flag names it (${credentials.join(', ')})`);
      assert.equal(mount.readOnly, true, `${what} read-only`);
    }
  }
});

/** The start gate's taint as nmi's own flag parser reads it from the start-gate render. */
function startTaint() {
  const raw = nmiPod('overlays/start-gate').envValue('NMI_START_TAINT') ?? assert.fail('NMI_START_TAINT set in the start-gate overlay');
  const taint = parseFlags({ 'start-taint': runFlags['start-taint'] }, [], { [envName('start-taint')]: raw }).values.startTaint;
  return { raw, taint: taint ?? assert.fail(`NMI_START_TAINT=${raw} turns the gate on`) };
}

test("start-gate: NMI_START_TAINT parses as nmi's --start-taint, and is the taint README has nodes register with", () => {
  const { raw, taint } = startTaint();
  assert.equal(formatTaint(taint), raw);
  const readme = readFileSync(path.join(root, 'README.md'), 'utf8');
  assert.equal(/`--register-with-taints=([^`\s]+)`/.exec(readme)?.[1], raw, "README's kubelet flag");
  assert.equal(nmiPod('base').env.has('NMI_START_TAINT'), false, 'the base has no gate');
  // nmi must start on the node its taint holds.
  assert.equal(tolerates(nmiPod('overlays/start-gate').pod.tolerations, taint), true, 'the start-gate overlay tolerates the start taint');
});

test('DaemonSet: probes hit /readyz and /healthz where nmi listens for them', () => {
  const { container, envValue } = nmiPod('base');
  const probe = envValue('NMI_PROBE_ADDRESS') ?? '127.0.0.1:8085';
  const [host, port] = probe.split(':');
  for (const [name, path] of [['readinessProbe', '/readyz'], ['livenessProbe', '/healthz']] as const) {
    const get: Doc = container[name].httpGet;
    assert.equal(get.path, path, name);
    assert.equal(get.port, Number(port), name);
    // hostNetwork: without `host` the kubelet would probe the node address, not loopback.
    assert.equal(get.host, host, name);
  }
  // hostNetwork makes every declared port a hostPort, which would keep the surging pod of an update off its node.
  assert.equal(container.ports, undefined);
});

test('DaemonSet: grace period covers the drain; memory bounded with the heap below the limit', () => {
  const { pod, container, envValue } = nmiPod('base');
  assert.ok(pod.terminationGracePeriodSeconds >= DRAIN_SECONDS + 10, `terminationGracePeriodSeconds ${pod.terminationGracePeriodSeconds}`);
  const limit = /^(\d+)Mi$/.exec(container.resources.limits.memory);
  assert.ok(limit && Number(limit[1]) <= 128, `memory limit ${container.resources.limits.memory}`);
  assert.ok(container.resources.requests.memory && container.resources.requests.cpu);
  const heap = /--max-old-space-size=(\d+)/.exec(envValue('NODE_OPTIONS') ?? '');
  assert.ok(heap && Number(heap[1]) < Number(limit[1]), 'V8 heap cap below the memory limit');
});

/** What a cluster of user-assigned identities needs: the kubelet's /pods, and the custom resources listed and watched. */
const baseRules = [
  { apiGroups: [''], resources: ['nodes/pods'], verbs: ['get'] },
  { apiGroups: ['aadpodidentity.k8s.io'], resources: ['azureidentities', 'azureidentitybindings', 'azurepodidentityexceptions'], verbs: ['list', 'watch'] },
];

/** The render's ClusterRoles bound, each by one ClusterRoleBinding of its name, to exactly the DaemonSet's service account. */
function boundRoles(docs: Doc[]): Map<string, Doc> {
  // A grant alone holds no ServiceAccount: it binds the base's.
  const sa = all(docs, 'ServiceAccount').length > 0 ? one(docs, 'ServiceAccount') : one(render('base'), 'ServiceAccount');
  assert.equal(nmiPod('base').pod.serviceAccountName, sa.metadata.name);
  const roles = new Map<string, Doc>();
  for (const binding of all(docs, 'ClusterRoleBinding')) {
    const role = all(docs, 'ClusterRole').find((r) => r.metadata.name === binding.roleRef.name) ?? assert.fail(`${binding.metadata.name} binds a ClusterRole of the render`);
    assert.equal(binding.metadata.name, role.metadata.name);
    assert.deepEqual(binding.roleRef, { apiGroup: 'rbac.authorization.k8s.io', kind: 'ClusterRole', name: role.metadata.name });
    assert.deepEqual(binding.subjects, [{ kind: 'ServiceAccount', name: sa.metadata.name, namespace: sa.metadata.namespace }]);
    roles.set(role.metadata.name, role);
  }
  assert.equal(roles.size, all(docs, 'ClusterRole').length, 'every ClusterRole bound');
  return roles;
}

function allowed(docs: Doc[], group: string, resource: string, verb: string): boolean {
  return [...boundRoles(docs).values()].some((role) => (role.rules as Doc[]).some((r) => r.apiGroups.includes(group) && r.resources.includes(resource) && r.verbs.includes(verb)));
}

test('RBAC: the base holds exactly nodes/pods get and the three CRs list/watch — no Secret, no token, no write — bound to the DaemonSet service account', () => {
  const roles = boundRoles(render('base'));
  assert.deepEqual([...roles.keys()], ['nmi']);
  assert.deepEqual(roles.get('nmi')!.rules, baseRules);
  for (const dir of Object.keys(expectedKinds)) assert.equal(all(render(dir), 'Role').length + all(render(dir), 'RoleBinding').length, 0, dir);
});

test('RBAC: each grant adds exactly its own rules, in a ClusterRole of its own; each overlay adds only the grants it is for', () => {
  for (const [grant, rules] of Object.entries(grantRules)) {
    const roles = boundRoles(render(`grants/${grant}`));
    assert.deepEqual([...roles.keys()], [`nmi-${grant}`], grant);
    assert.deepEqual(roles.get(`nmi-${grant}`)!.rules, rules, grant);
  }
  const baseRoles = [...boundRoles(render('base')).values()];
  for (const [dir, { grants }] of Object.entries(overlayChanges)) {
    const roles = [...boundRoles(render(dir)).values()].sort((a, b) => a.metadata.name.localeCompare(b.metadata.name));
    const expected = [...baseRoles, ...grants.flatMap((g) => [...boundRoles(render(`grants/${g}`)).values()])].sort((a, b) => a.metadata.name.localeCompare(b.metadata.name));
    assert.deepEqual(roles, expected, dir);
  }
  // A feature the base has no grant for is off in the base's own flags, not left to fail.
  const podEvents = (dir: string): boolean => {
    const value = nmiPod(dir).envValue(envName('pod-events'));
    return parseFlags({ 'pod-events': runFlags['pod-events'] }, [], value === undefined ? {} : { [envName('pod-events')]: value }).values.podEvents;
  };
  assert.equal(podEvents('base'), false, 'the base turns Events off');
  assert.equal(podEvents('overlays/pod-events'), true, 'the pod-events overlay turns them on');
});

test('RBAC: the start gate requests exactly what deploy/grants/start-gate grants, and nothing else grants nodes', async () => {
  const gated = render('overlays/start-gate');
  for (const dir of Object.keys(expectedKinds).filter((d) => d !== 'overlays/start-gate' && d !== 'grants/start-gate')) {
    assert.equal(allowed(render(dir), '', 'nodes', 'get') || allowed(render(dir), '', 'nodes', 'patch'), false, `${dir}: the gate stays optional`);
  }
  const { taint } = startTaint();
  const api = await startApiServer();
  try {
    api.put({ apiVersion: 'v1', kind: 'Node', metadata: { name: 'node1' }, spec: { taints: [{ ...taint }] } });
    const gate = new StartGate({ client: new KubeClient(loadKubeConfig({ kubeconfig: api.writeKubeconfig(tmp) }), 'nmi'), nodeName: 'node1', taint, log: silentLogger });
    await gate.open();
    await gate.close(5000);
    const verbs = api.requests.map((r) => {
      assert.equal(r.resource, 'nodes', r.path);
      const verb = r.method.toLowerCase();
      assert.ok(allowed(gated, '', 'nodes', verb), `${verb} nodes is granted`);
      return verb;
    });
    assert.deepEqual(verbs, ['get', 'patch', 'get', 'patch']);
  } finally {
    await api.close();
  }
});

/** The CRDs as the standalone overlay installs them. */
const crds = (): Doc[] => all(render('overlays/standalone'), 'CustomResourceDefinition');
const crdApi = { group: CRD_API_VERSION.split('/')[0]!, version: CRD_API_VERSION.split('/')[1]! };

/** What one recorded API request asks RBAC for. */
function attributes(r: { path: string; method: string; watch: boolean; resource?: string }): { group: string; resource: string; verb: string } {
  const cr = r.path.startsWith(`${CRD_PATH}/`);
  const group = cr ? crdApi.group : r.resource === 'events' ? 'events.k8s.io' : '';
  // The TokenRequest API is the subresource serviceaccounts/token.
  const resource = /\/serviceaccounts\/[^/]+\/token$/.test(r.path) ? 'serviceaccounts/token' : r.resource;
  const named = /\/(secrets|serviceaccounts)\/[^/]+$/.test(r.path);
  const verb = r.method === 'POST' ? 'create' : r.method === 'PATCH' ? 'patch' : r.watch ? 'watch' : named ? 'get' : 'list';
  assert.ok(resource, `a resource request: ${r.path}`);
  return { group, resource, verb };
}

/** Which kustomization grants what nmi asks for it: the base, or the grant of the feature that asks. */
const grantFor: Record<string, string> = {
  azureidentities: 'base',
  azureidentitybindings: 'base',
  azurepodidentityexceptions: 'base',
  secrets: 'grants/service-principals',
  serviceaccounts: 'grants/federation',
  'serviceaccounts/token': 'grants/federation',
  events: 'grants/pod-events',
};

test("RBAC and CRDs cover every request nmi's Kubernetes source, Events and federation make, each in the grant of its feature", async () => {
  const api = await startApiServer();
  try {
    const spec = { type: 1, tenantID: 't', clientID: 'c', clientPassword: { name: 'sp', namespace: 'app' } };
    api.put({ apiVersion: CRD_API_VERSION, kind: 'AzureIdentity', metadata: { name: 'sp', namespace: 'app' }, spec });
    api.put({ apiVersion: CRD_API_VERSION, kind: 'AzureIdentityBinding', metadata: { name: 'b', namespace: 'app' }, spec: { azureIdentity: 'sp', selector: 'sp' } });
    api.put({ apiVersion: 'v1', kind: 'Secret', metadata: { name: 'sp', namespace: 'app' }, data: { clientSecret: Buffer.from('x').toString('base64') } } as KubeObject);
    api.put({ apiVersion: 'v1', kind: 'ServiceAccount', metadata: { name: 'web-sa', namespace: 'app' } });
    const source = new KubeBindingSource(silentLogger, { kubeconfig: api.writeKubeconfig(tmp) });
    const synced = new Promise<void>((resolve) => void source.start(() => resolve()));
    await synced;
    // A pod of the node bound to the service principal: its Secret is read; one under Workload ID's convention: its ServiceAccount.
    source.need({ secrets: new Set(['app/sp']), serviceAccounts: new Map([['app/web-sa', 'u2']]) });
    await source.settled();
    // Watches open after their lists: wait for all of them before looking.
    for (const p of ['azureidentities', 'azureidentitybindings', 'azurepodidentityexceptions']) await api.waitForWatches(p);
    source.stop();
    // An Event on a refused pod, repeated: created, then its series patched.
    const client = new KubeClient(loadKubeConfig({ kubeconfig: api.writeKubeconfig(tmp) }), 'nmi');
    const events = new PodEvents({ client, nodeName: 'node1', log: silentLogger });
    const refused = { uid: 'u1', namespace: 'app', name: 'web', labels: {}, ips: ['10.0.0.9'], hostNetwork: false, phase: 'Running', nodeName: 'node1' };
    events.record(refused, { reason: 'NoIdentity', action: 'GetToken', note: 'refused' });
    events.record(refused, { reason: 'NoIdentity', action: 'GetToken', note: 'refused' });
    while (events.counts.updated + events.counts.failed === 0) await new Promise((resolve) => setTimeout(resolve, 10));
    events.stop();
    // A federated identity's exchange: a token of the calling pod's service account, bound to the pod.
    const bound = api.put({ apiVersion: 'v1', kind: 'Pod', metadata: { name: 'web', namespace: 'app' }, spec: { serviceAccountName: 'web-sa' } } as KubeObject);
    await new ServiceAccountTokens(client).forPod({ ...refused, uid: bound.metadata.uid as string, serviceAccount: 'web-sa' });
    await client.close();

    const seen = new Set<string>();
    for (const r of api.requests) {
      const { group, resource, verb } = attributes(r);
      const where = grantFor[resource] ?? assert.fail(`${verb} ${resource} (${r.path}): no grant is meant for it`);
      assert.ok(allowed(render(where), group, resource, verb), `${verb} ${group || 'core'}/${resource} (${r.path}) is granted by deploy/${where}`);
      if (where !== 'base') assert.equal(allowed(render('base'), group, resource, verb), false, `${verb} ${resource}: the base leaves it to deploy/${where}`);
      seen.add(`${verb} ${resource}`);
    }
    // The run really exercised what the roles grant (else the check above proves little).
    for (const p of ['azureidentities', 'azureidentitybindings', 'azurepodidentityexceptions']) {
      assert.ok(seen.has(`list ${p}`) && seen.has(`watch ${p}`), `list and watch ${p}: ${[...seen].join(', ')}`);
    }
    assert.ok(seen.has('get secrets'));
    assert.ok(seen.has('create events') && seen.has('patch events'), [...seen].join(', '));
    assert.ok(seen.has('get serviceaccounts') && seen.has('create serviceaccounts/token'), [...seen].join(', '));
    assert.ok(!seen.has('list serviceaccounts') && !seen.has('watch serviceaccounts'), 'ServiceAccounts are read one by one, for the node\'s pods');
    const requestedPlurals = new Set(api.requests.filter((r) => r.path.startsWith(CRD_PATH)).map((r) => r.resource));
    assert.deepEqual([...requestedPlurals].sort(), crds().map((c) => c.spec.names.plural).sort(), 'one CRD per resource nmi reads');
  } finally {
    await api.close();
  }
});

test('base: nmi as the base runs it, refused what the base does not grant, still serves user-assigned identities', async () => {
  const api = await startApiServer();
  try {
    const user = { type: 0, clientID: 'c', resourceID: '/subscriptions/s/resourcegroups/r/providers/Microsoft.ManagedIdentity/userAssignedIdentities/u' };
    api.put({ apiVersion: CRD_API_VERSION, kind: 'AzureIdentity', metadata: { name: 'u', namespace: 'app' }, spec: user });
    api.put({ apiVersion: CRD_API_VERSION, kind: 'AzureIdentityBinding', metadata: { name: 'b', namespace: 'app' }, spec: { azureIdentity: 'u', selector: 'u' } });
    // The API server answers 403 to whatever the base's ClusterRole does not allow (the stand-in has no RBAC of its own).
    api.failNext(1_000_000, 403, '/api/v1/namespaces/');
    api.failNext(1_000_000, 403, '/apis/events.k8s.io/');
    const source = new KubeBindingSource(silentLogger, { kubeconfig: api.writeKubeconfig(tmp) });
    const set = await new Promise<BindingSet>((resolve) => void source.start(resolve));
    source.stop();
    assert.deepEqual(set.identities.map((i) => i.name), ['u'], 'the user-assigned identity is served');
    assert.deepEqual(set.bindings.map((b) => b.name), ['b']);
    const base = render('base');
    const refused = api.requests.filter((r) => {
      const { group, resource, verb } = attributes(r);
      return !allowed(base, group, resource, verb);
    });
    // With no pod needing a Secret or a ServiceAccount, nothing is asked of the base in vain.
    assert.deepEqual([...new Set(refused.map((r) => `${attributes(r).verb} ${attributes(r).resource}`))], []);
  } finally {
    await api.close();
  }
});

test('CRDs: aadpodidentity.k8s.io/v1 as nmi requests it, named plural.group, namespaced, approved for a k8s.io group', () => {
  assert.equal(CRD_PATH, `/apis/${crdApi.group}/${crdApi.version}`);
  for (const crd of crds()) {
    const { group, names, scope, versions } = crd.spec;
    assert.equal(crd.apiVersion, 'apiextensions.k8s.io/v1');
    assert.equal(group, crdApi.group);
    assert.equal(crd.metadata.name, `${names.plural}.${group}`);
    assert.equal(names.plural, names.kind.toLowerCase().replace(/y$/, 'ie') + 's');
    assert.equal(names.singular, names.kind.toLowerCase());
    assert.equal(names.listKind, `${names.kind}List`);
    assert.equal(scope, 'Namespaced');
    assert.deepEqual(versions.map((v: Doc) => [v.name, v.served, v.storage]), [[crdApi.version, true, true]]);
    // Without it the API server refuses a CRD in a *.k8s.io group.
    assert.match(crd.metadata.annotations['api-approved.kubernetes.io'], /^(unapproved|https:\/\/)/);
  }
  assert.deepEqual(crds().map((c) => c.spec.names.kind).sort(), ['AzureIdentity', 'AzureIdentityBinding', 'AzurePodIdentityException']);
});

/** What the API server stores of `value` under a structural schema: undeclared fields are pruned. */
function prune(value: unknown, schema: Doc): unknown {
  if (schema['x-kubernetes-preserve-unknown-fields'] || value === null || typeof value !== 'object') return value;
  if (Array.isArray(value)) return schema.items ? value.map((v) => prune(v, schema.items)) : value;
  const out: Doc = {};
  for (const [k, v] of Object.entries(value)) {
    const sub = schema.properties?.[k] ?? (typeof schema.additionalProperties === 'object' ? schema.additionalProperties : undefined);
    if (sub) out[k] = prune(v, sub);
  }
  return out;
}

const samples: Doc[] = [
  { kind: 'AzureIdentity', spec: { type: 0, clientID: 'c', resourceID: '/subscriptions/s/resourcegroups/r/providers/Microsoft.ManagedIdentity/userAssignedIdentities/u' } },
  { kind: 'AzureIdentity', spec: { type: 1, tenantID: 't', clientID: 'c', clientPassword: { name: 's', namespace: 'vault' }, adEndpoint: 'https://login.microsoftonline.us/' } },
  { kind: 'AzureIdentity', spec: { type: 2, tenantID: 't', clientID: 'c', clientPassword: { name: 's', namespace: 'vault' } } },
  { kind: 'AzureIdentityBinding', spec: { azureIdentity: 'id', selector: 'sel' } },
  { kind: 'AzurePodIdentityException', spec: { podLabels: { app: 'x', tier: 'y' } } },
];

test('CRD schemas keep every field nmi parses (nothing it reads is pruned)', () => {
  for (const sample of samples) {
    const crd = crds().find((c) => c.spec.names.kind === sample.kind)!;
    const schema: Doc = crd.spec.versions[0].schema.openAPIV3Schema;
    const obj = { apiVersion: CRD_API_VERSION, kind: sample.kind, metadata: { name: 'n', namespace: 'app', annotations: { 'aadpodidentity.k8s.io/Behavior': 'namespaced' } }, spec: sample.spec };
    // metadata is the API server's own (ObjectMeta), never pruned by the CRD schema.
    const stored = { ...obj, spec: prune(obj.spec, schema.properties.spec) };
    assert.deepEqual(stored, obj, `${sample.kind} survives pruning`);
    assert.deepEqual(parseObject(stored), parseObject(obj));
  }
  // The check can fail: a field the schema does not declare is dropped.
  const identity = crds().find((c) => c.spec.names.kind === 'AzureIdentity')!.spec.versions[0].schema.openAPIV3Schema;
  assert.deepEqual(prune({ clientID: 'c', undeclared: 1 }, identity.properties.spec), { clientID: 'c' });
});

test('Containerfile: the Debian package installed with dpkg on a Debian 12 base, nothing fetched, `nmi run` as entrypoint', () => {
  const text = readFileSync(path.join(deployDir, 'Containerfile'), 'utf8');
  const instructions = text.replace(/^#.*\n/gm, '').replace(/\\\n/g, ' ');
  // One stage, on the base deploy/base-image.sh makes (test/runtime/image.test.ts builds and runs it).
  assert.deepEqual([...instructions.matchAll(/^(?:ARG|FROM) (.+)$/gm)].map((m) => m[1]), ['BASE=localhost/nmi-base:bookworm', '${BASE}']);
  assert.match(readFileSync(path.join(deployDir, 'base-image.sh'), 'utf8'), /^tag=\$\{1:-localhost\/nmi-base:bookworm\$suffix\}$/m);
  // Offline: no package manager but dpkg, no download; from the context only the package, installed and removed.
  assert.doesNotMatch(instructions, /\b(apt|apt-get|npm (ci|install)|curl|wget)\b|https?:\/\/|^ADD /m);
  assert.deepEqual([...instructions.matchAll(/^COPY (.+)$/gm)].map((m) => m[1]), ['nmi_*.deb /tmp/nmi/']);
  const script = /^RUN (.*)$/m.exec(instructions)?.[1] ?? assert.fail('a RUN installing the package');
  assert.match(script, /set -- \/tmp\/nmi\/nmi_\*\.deb;.*dpkg -i "\$1" && rm -r \/tmp\/nmi\b/);
  // The base is checked for what the rule backends run and the addon dlopen()s.
  assert.deepEqual(/for tool in ([^;]+); do/.exec(script)?.[1]?.split(' '), ['iptables', 'iptables-save', 'iptables-restore', 'nft', 'conntrack']);
  assert.match(script, /ldconfig -p \| grep -q 'libnftables\\\.so\\\.1 '/);
  assert.match(instructions, /^ENTRYPOINT \["nmi", "run"\]$/m);
});
