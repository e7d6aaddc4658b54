// deploy/: every manifest parses; the DaemonSet runs nmi the way the contract
// needs (host network, probes, capabilities, xtables lock, downward API); the
// RBAC grants exactly what nmi uses, checked against the requests nmi's own
// Kubernetes source makes to a stand-in API server; the CRDs are the ones it
// reads, and their schemas keep every field it parses.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseAllDocuments } from 'yaml';
import { CRD_PATH, KubeBindingSource } from '../../src/bindings/kube-source.js';
import { CRD_API_VERSION, parseObject } from '../../src/bindings/parse.js';
import { runFlags } from '../../src/config/commands.js';
import { silentLogger } from '../../src/log/logger.js';
import { KubeClient } from '../../src/kube/client.js';
import { loadKubeConfig } from '../../src/kube/kubeconfig.js';
import { StartGate } from '../../src/lifecycle/start-gate.js';
import { startApiServer, type KubeObject } from '../standins/apiserver.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const deployDir = path.join(root, 'deploy');
const tmp = mkdtempSync(path.join(tmpdir(), 'nmi-deploy-'));
after(() => rmSync(tmp, { recursive: true, force: true }));

type Doc = Record<string, any>;

const yamlFiles = readdirSync(deployDir).filter((f) => /\.ya?ml$/.test(f));
const docs: { file: string; doc: Doc }[] = yamlFiles.flatMap((file) =>
  parseAllDocuments(readFileSync(path.join(deployDir, file), 'utf8')).map((d) => {
    assert.deepEqual(d.errors, [], `${file}: ${d.errors.join('; ')}`);
    return { file, doc: d.toJS() as Doc };
  }),
);
const all = (kind: string, file?: string): Doc[] => docs.filter((d) => d.doc.kind === kind && (file === undefined || d.file === file)).map((d) => d.doc);
const one = (kind: string, file?: string): Doc => {
  const found = all(kind, file);
  assert.equal(found.length, 1, `exactly one ${kind}${file ? ` in ${file}` : ''}`);
  return found[0]!;
};

const ds = one('DaemonSet');
const pod: Doc = ds.spec.template.spec;
const container: Doc = pod.containers[0];
const env = new Map<string, Doc>((container.env as Doc[]).map((e) => [e.name, e]));
const envValue = (name: string): string | undefined => env.get(name)?.value;

/** What the token server's drain allows in-flight requests (src/server/token-server.ts). */
const DRAIN_SECONDS = 10;

test('every manifest parses and names what it is', () => {
  assert.deepEqual(yamlFiles.sort(), ['crds.yaml', 'daemonset.yaml', 'rbac.yaml', 'start-gate.yaml']);
  for (const { file, doc } of docs) {
    assert.ok(doc.apiVersion && doc.kind && doc.metadata?.name, `${file}: apiVersion, kind, metadata.name`);
  }
  assert.deepEqual(
    docs.map((d) => d.doc.kind).sort(),
    ['ClusterRole', 'ClusterRole', 'ClusterRoleBinding', 'ClusterRoleBinding', 'CustomResourceDefinition', 'CustomResourceDefinition', 'CustomResourceDefinition', 'DaemonSet', 'ServiceAccount'],
  );
});

test('DaemonSet: host network, critical priority, every node, one container with the nmi service account', () => {
  assert.equal(ds.apiVersion, 'apps/v1');
  assert.deepEqual(ds.spec.selector.matchLabels, ds.spec.template.metadata.labels);
  assert.equal(pod.hostNetwork, true);
  assert.equal(pod.dnsPolicy, 'ClusterFirstWithHostNet');
  assert.equal(pod.priorityClassName, 'system-node-critical');
  assert.ok((pod.tolerations as Doc[]).some((t) => t.operator === 'Exists' && !t.key && !t.effect), 'tolerates every taint');
  assert.equal(pod.containers.length, 1);
  const sa = one('ServiceAccount');
  assert.equal(pod.serviceAccountName, sa.metadata.name);
  assert.equal(ds.metadata.namespace, sa.metadata.namespace);
  assert.notEqual(pod.automountServiceAccountToken, false, 'the API server and kubelet token come from the automounted service account');
});

test('DaemonSet: least privilege — NET_ADMIN and NET_RAW on top of nothing, read-only root', () => {
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
  const volume = (pod.volumes as Doc[]).find((v) => v.hostPath?.path === '/run/xtables.lock');
  assert.ok(volume, 'hostPath /run/xtables.lock');
  assert.equal(volume.hostPath.type, 'FileOrCreate');
  const mount = (container.volumeMounts as Doc[]).find((m) => m.name === volume.name);
  assert.equal(mount?.mountPath, '/run/xtables.lock');
  assert.notEqual(mount?.readOnly, true);
});

test('DaemonSet: node name and node IP from the downward API; every NMI_ variable is a real flag', () => {
  assert.deepEqual(env.get('NODE_NAME')?.valueFrom, { fieldRef: { fieldPath: 'spec.nodeName' } });
  assert.deepEqual(env.get('NMI_NODE_IP')?.valueFrom, { fieldRef: { fieldPath: 'status.hostIP' } });
  assert.equal(envValue('NMI_BINDINGS'), 'kubernetes');
  const flagVars = new Set(Object.keys(runFlags).map((f) => `NMI_${f.toUpperCase().replaceAll('-', '_')}`));
  const unknown = [...env.keys()].filter((n) => n.startsWith('NMI_') && !flagVars.has(n));
  assert.deepEqual(unknown, []);
  // $(VAR) expands only variables defined earlier in the list.
  const names = [...env.keys()];
  for (const [i, name] of names.entries()) {
    for (const [, ref] of (envValue(name) ?? '').matchAll(/\$\((\w+)\)/g)) {
      assert.ok(names.slice(0, i).includes(ref!), `${name} refers to ${ref}, defined before it`);
    }
  }
  assert.ok(['keep', 'remove'].includes(envValue('NMI_ON_EXIT') ?? 'remove'));
});

test('DaemonSet: kubelet reached on the node address with the service account token', () => {
  assert.equal(envValue('NMI_KUBELET_URL'), 'https://$(NMI_NODE_IP):10250');
  assert.equal(envValue('NMI_KUBELET_TOKEN_FILE'), '/var/run/secrets/kubernetes.io/serviceaccount/token');
  assert.equal(envValue('NMI_KUBELET_CA'), '/var/run/secrets/kubernetes.io/serviceaccount/ca.crt');
});

test('DaemonSet: probes hit /readyz and /healthz where nmi listens for them', () => {
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
  assert.ok(pod.terminationGracePeriodSeconds >= DRAIN_SECONDS + 10, `terminationGracePeriodSeconds ${pod.terminationGracePeriodSeconds}`);
  const limit = /^(\d+)Mi$/.exec(container.resources.limits.memory);
  assert.ok(limit && Number(limit[1]) <= 128, `memory limit ${container.resources.limits.memory}`);
  assert.ok(container.resources.requests.memory && container.resources.requests.cpu);
  const heap = /--max-old-space-size=(\d+)/.exec(envValue('NODE_OPTIONS') ?? '');
  assert.ok(heap && Number(heap[1]) < Number(limit[1]), 'V8 heap cap below the memory limit');
});

const expectedRules = [
  { apiGroups: [''], resources: ['nodes/proxy'], verbs: ['get'] },
  { apiGroups: ['aadpodidentity.k8s.io'], resources: ['azureidentities', 'azureidentitybindings', 'azurepodidentityexceptions'], verbs: ['get', 'list', 'watch'] },
  { apiGroups: [''], resources: ['secrets'], verbs: ['get'] },
];

/** The file's one ClusterRole, bound to the DaemonSet's service account by the file's one ClusterRoleBinding. */
function roleOf(file: string): Doc {
  const role = one('ClusterRole', file);
  const binding = one('ClusterRoleBinding', file);
  assert.deepEqual(binding.roleRef, { apiGroup: 'rbac.authorization.k8s.io', kind: 'ClusterRole', name: role.metadata.name });
  const sa = one('ServiceAccount');
  assert.deepEqual(binding.subjects, [{ kind: 'ServiceAccount', name: sa.metadata.name, namespace: sa.metadata.namespace }]);
  return role;
}

test('RBAC: exactly nodes/proxy get, the three CRs get/list/watch, secrets get — bound to the DaemonSet service account', () => {
  assert.deepEqual(roleOf('rbac.yaml').rules, expectedRules);
  assert.equal(all('Role').length + all('RoleBinding').length, 0);
});

function allowed(group: string, resource: string, verb: string, file = 'rbac.yaml'): boolean {
  return (one('ClusterRole', file).rules as Doc[]).some((r) => r.apiGroups.includes(group) && r.resources.includes(resource) && r.verbs.includes(verb));
}

test("RBAC: the start gate's own file grants nodes get and patch, exactly what the gate requests, and the base grants no nodes", async () => {
  assert.deepEqual(roleOf('start-gate.yaml').rules, [{ apiGroups: [''], resources: ['nodes'], verbs: ['get', 'patch'] }]);
  assert.equal(allowed('', 'nodes', 'get') || allowed('', 'nodes', 'patch'), false, 'the gate stays optional');
  const api = await startApiServer();
  try {
    api.put({ apiVersion: 'v1', kind: 'Node', metadata: { name: 'node1' }, spec: { taints: [{ key: 'gate', effect: 'NoSchedule' }] } });
    const gate = new StartGate({ client: new KubeClient(loadKubeConfig({ kubeconfig: api.writeKubeconfig(tmp) }), 'nmi'), nodeName: 'node1', taint: { key: 'gate', effect: 'NoSchedule' }, log: silentLogger });
    await gate.open();
    await gate.close(5000);
    const verbs = api.requests.map((r) => {
      assert.equal(r.resource, 'nodes', r.path);
      const verb = r.method.toLowerCase();
      assert.ok(allowed('', 'nodes', verb, 'start-gate.yaml'), `${verb} nodes is granted`);
      return verb;
    });
    assert.deepEqual(verbs, ['get', 'patch', 'get', 'patch']);
  } finally {
    await api.close();
  }
});

const crds = all('CustomResourceDefinition');
const crdApi = { group: CRD_API_VERSION.split('/')[0]!, version: CRD_API_VERSION.split('/')[1]! };

test("RBAC and CRDs cover every request nmi's Kubernetes source makes", async () => {
  const api = await startApiServer();
  try {
    const spec = { type: 1, tenantID: 't', clientID: 'c', clientPassword: { name: 'sp', namespace: 'vault' } };
    api.put({ apiVersion: CRD_API_VERSION, kind: 'AzureIdentity', metadata: { name: 'sp', namespace: 'app' }, spec });
    api.put({ apiVersion: CRD_API_VERSION, kind: 'AzureIdentityBinding', metadata: { name: 'b', namespace: 'app' }, spec: { azureIdentity: 'sp', selector: 'sp' } });
    api.put({ apiVersion: 'v1', kind: 'Secret', metadata: { name: 'sp', namespace: 'vault' }, data: { clientSecret: Buffer.from('x').toString('base64') } } as KubeObject);
    const source = new KubeBindingSource(silentLogger, { kubeconfig: api.writeKubeconfig(tmp) });
    const synced = new Promise<void>((resolve) => void source.start(() => resolve()));
    await synced;
    // Watches open after their lists: wait for all three before looking.
    for (const p of ['azureidentities', 'azureidentitybindings', 'azurepodidentityexceptions']) await api.waitForWatches(p);
    source.stop();

    const seen = new Set<string>();
    for (const r of api.requests) {
      const cr = r.path.startsWith(`${CRD_PATH}/`);
      const group = cr ? crdApi.group : '';
      const named = /\/secrets\/[^/]+$/.test(r.path);
      const verb = r.watch ? 'watch' : named ? 'get' : 'list';
      assert.ok(r.resource, `a resource request: ${r.path}`);
      assert.ok(allowed(group, r.resource, verb), `${verb} ${group || 'core'}/${r.resource} (${r.path}) is granted`);
      seen.add(`${verb} ${r.resource}`);
    }
    // The run really exercised what the role grants (else the check above proves little).
    for (const p of ['azureidentities', 'azureidentitybindings', 'azurepodidentityexceptions']) {
      assert.ok(seen.has(`list ${p}`) && seen.has(`watch ${p}`), `list and watch ${p}: ${[...seen].join(', ')}`);
    }
    assert.ok(seen.has('get secrets'));
    const requestedPlurals = new Set(api.requests.filter((r) => r.path.startsWith(CRD_PATH)).map((r) => r.resource));
    assert.deepEqual([...requestedPlurals].sort(), crds.map((c) => c.spec.names.plural).sort(), 'one CRD per resource nmi reads');
  } finally {
    await api.close();
  }
});

test('CRDs: aadpodidentity.k8s.io/v1 as nmi requests it, named plural.group, namespaced, approved for a k8s.io group', () => {
  assert.equal(CRD_PATH, `/apis/${crdApi.group}/${crdApi.version}`);
  for (const crd of crds) {
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
  assert.deepEqual(crds.map((c) => c.spec.names.kind).sort(), ['AzureIdentity', 'AzureIdentityBinding', 'AzurePodIdentityException']);
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
    const crd = crds.find((c) => c.spec.names.kind === sample.kind)!;
    const schema: Doc = crd.spec.versions[0].schema.openAPIV3Schema;
    const obj = { apiVersion: CRD_API_VERSION, kind: sample.kind, metadata: { name: 'n', namespace: 'app', annotations: { 'aadpodidentity.k8s.io/Behavior': 'namespaced' } }, spec: sample.spec };
    // metadata is the API server's own (ObjectMeta), never pruned by the CRD schema.
    const stored = { ...obj, spec: prune(obj.spec, schema.properties.spec) };
    assert.deepEqual(stored, obj, `${sample.kind} survives pruning`);
    assert.deepEqual(parseObject(stored), parseObject(obj));
  }
  // The check can fail: a field the schema does not declare is dropped.
  const identity = crds.find((c) => c.spec.names.kind === 'AzureIdentity')!.spec.versions[0].schema.openAPIV3Schema;
  assert.deepEqual(prune({ clientID: 'c', undeclared: 1 }, identity.properties.spec), { clientID: 'c' });
});

test('Containerfile: the Debian package installed with dpkg on a Debian 12 base, nothing fetched, `nmi run` as entrypoint', () => {
  const text = readFileSync(path.join(deployDir, 'Containerfile'), 'utf8');
  const instructions = text.replace(/^#.*\n/gm, '').replace(/\\\n/g, ' ');
  // One stage, on the base deploy/base-image.sh makes (test/runtime/image.test.ts builds and runs it).
  assert.deepEqual([...instructions.matchAll(/^(?:ARG|FROM) (.+)$/gm)].map((m) => m[1]), ['BASE=localhost/nmi-base:bookworm', '${BASE}']);
  assert.match(readFileSync(path.join(deployDir, 'base-image.sh'), 'utf8'), /^tag=\$\{1:-localhost\/nmi-base:bookworm\}$/m);
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
