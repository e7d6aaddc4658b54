// `--host-token-address`: /host/token/ on TCP for the Key Vault CSI provider,
// in aad-pod-identity's answer shape, with every caller attested by its
// socket's cgroup. Callers are real processes in the node's network namespace
// (as the provider runs, hostNetwork) placed in cgroups of a test tree named
// as the kubelet names pod cgroups, and one pod in its own namespace.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { callFrom, cgroup2Mount, createCgroupTree, scriptFrom, type CgroupTree } from '../harness/cgroups.js';
import { createCluster, crd, type Cluster, type ClusterPod } from '../harness/cluster.js';
import { nmi, type NmiProcess } from '../harness/nmi-process.js';
import { makePodJson } from '../standins/kubelet.js';
import { decodeStandinToken } from '../standins/imds.js';

const CSI_APP = 'csi-secrets-store-provider-azure';
const uid = {
  csi: 'c5100000-0000-4000-8000-000000000001',
  exporter: 'e0000000-0000-4000-8000-000000000002',
  gone: '90000000-0000-4000-8000-000000000003',
};
const client = { web: '11111111-1111-1111-1111-111111111111', late: '22222222-2222-2222-2222-222222222222' };
const RESOURCE = 'https://vault.azure.net';

/**
 * The request secrets-store-csi-driver-provider-azure makes in pod-identity mode (pkg/auth:
 * `http://localhost:<nmi port>/host/token/?resource=<resource, not encoded>` with headers
 * podns and podname), byte for byte as Go's net/http writes it; the answer read back whole.
 */
const CSI_CLIENT = `
const [port, podns, podname, resource] = JSON.parse(process.argv[1]);
const socket = require('net').connect({ host: 'localhost', port, autoSelectFamily: true });
socket.on('connect', () => socket.write('GET /host/token/?resource=' + resource + ' HTTP/1.1\\r\\nHost: localhost:' + port +
  '\\r\\nUser-Agent: Go-http-client/1.1\\r\\nPodname: ' + podname + '\\r\\nPodns: ' + podns + '\\r\\nAccept-Encoding: gzip\\r\\n\\r\\n'));
let raw = Buffer.alloc(0);
socket.on('data', (d) => {
  raw = Buffer.concat([raw, d]);
  const end = raw.indexOf('\\r\\n\\r\\n');
  if (end < 0) return;
  const head = raw.subarray(0, end).toString().split('\\r\\n');
  const headers = Object.fromEntries(head.slice(1).map((l) => [l.slice(0, l.indexOf(':')).toLowerCase(), l.slice(l.indexOf(':') + 1).trim()]));
  const body = raw.subarray(end + 4);
  if (body.length < Number(headers['content-length'])) return;
  console.log(JSON.stringify({ status: Number(head[0].split(' ')[1]), headers, body: body.toString() }));
  socket.destroy();
});
socket.on('error', (e) => console.log(JSON.stringify({ error: e.code || e.message })));`;

interface CsiResult {
  status?: number;
  headers?: Record<string, string>;
  body?: string;
  error?: string;
}

let cluster: Cluster;
let cgroups: CgroupTree;
let web: ClusterPod;
let proc: NmiProcess;
const cg = { csi: '', exporter: '', gone: '', kubelet: '', userDecoy: '', nestedDecoy: '' };

async function csiRequest(from: { cgroup: string; uid?: number; netns?: string }, pod: string, port = 2579): Promise<CsiResult> {
  const [podns, podname] = pod.split('/');
  return JSON.parse(await scriptFrom(from, CSI_CLIENT, [port, podns, podname, RESOURCE])) as CsiResult;
}

/** As the provider reads the answer: 200, then NMIResponse{Token adal.Token, ClientID}; both must be non-empty. */
function asProviderReads(r: CsiResult): { token: Record<string, string>; clientid: string } {
  assert.equal(r.status, 200, JSON.stringify(r));
  const parsed = JSON.parse(r.body!) as { token: Record<string, string>; clientid: string };
  assert.ok(parsed.token.access_token && parsed.clientid, 'nmi did not return expected values in response: token and clientid');
  return parsed;
}

function refusal(r: CsiResult) {
  return { status: r.status, type: r.headers?.['content-type'], ...(JSON.parse(r.body ?? '{}') as object) };
}

const refused = {
  status: 403,
  type: 'application/json; charset=utf-8',
  error: 'access_denied',
  error_description: 'The calling process is not allowed to request tokens for pods on this node',
};

before(async () => {
  cluster = await createCluster();
  cgroups = createCgroupTree();
  cg.csi = cgroups.podCgroup(uid.csi, 'systemd');
  cg.exporter = cgroups.podCgroup(uid.exporter, 'cgroupfs');
  cg.gone = cgroups.podCgroup(uid.gone, 'systemd');
  cg.kubelet = cgroups.plainCgroup('system.slice/kubelet.service');
  // Folders named after the provider's pod where the kubelet never puts pods: a local user's delegated
  // cgroup (systemd gives user@1000.service to uid 1000), and one nested in another pod's container.
  cg.userDecoy = cgroups.plainCgroup(`user.slice/user-1000.slice/user@1000.service/app.slice/pod${uid.csi}`);
  cg.nestedDecoy = cgroups.plainCgroup(`${path.relative(cgroups.root, cg.exporter)}/pod${uid.csi}`);
  web = cluster.addPod({ name: 'web', labels: { aadpodidbinding: 'web' } });
  cluster.kubelet.pods.push(
    makePodJson({ name: `${CSI_APP}-x7k2p`, namespace: 'kube-system', uid: uid.csi, ip: cluster.node.nodeIp, hostNetwork: true, labels: { app: CSI_APP } }),
    makePodJson({ name: 'node-exporter-4fz8q', namespace: 'monitoring', uid: uid.exporter, ip: cluster.node.nodeIp, hostNetwork: true, labels: { app: 'node-exporter' } }),
  );
  cluster.writeBindings([
    crd.userAssigned('id-web', client.web, '/subscriptions/s/rg/web'),
    crd.userAssigned('id-late', client.late, '/subscriptions/s/rg/late'),
    crd.binding('bind-web', 'id-web', 'web'),
    crd.binding('bind-late', 'id-late', 'late'),
  ]);
  proc = await cluster.startNmi(['--host-token-address', '127.0.0.1:2579', ...allow()]);
});

/** Who may call; the test tree stands in for the kubelet's cgroup root. */
const allow = () => ['--host-token-allow', `kube-system/app=${CSI_APP},host-root`, '--cgroup-root', cgroups.root];

after(async () => {
  await cluster?.close();
  cgroups?.remove();
});

test("the CSI provider's own request gets the pod's token in NMI's shape", async () => {
  const r = await csiRequest({ cgroup: cg.csi }, 'default/web');
  const { token, clientid } = asProviderReads(r);
  assert.equal(clientid, client.web);
  assert.deepEqual(Object.keys(token), ['access_token', 'expires_in', 'expires_on', 'not_before', 'resource', 'token_type']);
  assert.equal(decodeStandinToken(token.access_token!).identity, `client_id:${client.web}`);
  assert.equal(token.resource, RESOURCE);
  assert.equal(token.token_type, 'Bearer');
  // adal.Token reads these as json.Number: strings, but numbers.
  for (const key of ['expires_in', 'expires_on', 'not_before']) assert.match(token[key]!, /^\d+$/, key);
  assert.ok(Number(token.expires_in) > 3000 && Number(token.expires_on) > Date.now() / 1000);
  assert.equal(r.headers?.['content-type'], 'application/json; charset=utf-8');
  assert.equal(r.headers?.['cache-control'], 'no-store');
});

test('a root process outside any pod is let in by host-root; nobody else is, and each refusal is counted and said once', async () => {
  asProviderReads(await csiRequest({ cgroup: cg.kubelet }, 'default/web'));
  assert.deepEqual(refusal(await csiRequest({ cgroup: cg.kubelet, uid: 65534 }, 'default/web')), refused, 'a host process that is not root');
  for (let i = 0; i < 3; i++) assert.deepEqual(refusal(await csiRequest({ cgroup: cg.exporter }, 'default/web')), refused, 'a hostNetwork pod that is not the provider, root in its container');
  assert.deepEqual(refusal(await csiRequest({ cgroup: cg.gone }, 'default/web')), refused, 'a pod cgroup whose pod the kubelet does not list');
  // Refused before anything of the request counts: a pod that does not exist is not even looked for.
  assert.deepEqual(refusal(await csiRequest({ cgroup: cg.exporter }, 'default/nobody')), refused);

  assert.equal(await proc.metric('nmi_host_token_refusals_total\\{reason="not-allowed"\\}'), 5);
  assert.equal(await proc.metric('nmi_host_token_refusals_total\\{reason="unknown-pod"\\}'), 1);
  const said = proc.output().split('\n').filter((l) => l.includes('host token caller refused'));
  assert.equal(said.filter((l) => l.includes('pod monitoring/node-exporter-4fz8q')).length, 1, 'a refused caller retrying is said once');
  assert.ok(said.some((l) => l.includes('host uid 65534')), said.join('\n'));
  assert.doesNotMatch(proc.output(), /eyJ/, 'no token in the log');
});

test("a folder named after the provider's pod is the provider's only where the kubelet puts pods", async () => {
  const before = (await proc.metric('nmi_host_token_refusals_total\\{reason="not-allowed"\\}')) ?? 0;
  assert.deepEqual(refusal(await csiRequest({ cgroup: cg.userDecoy, uid: 1000 }, 'default/web')), refused, "a local user's own cgroup");
  assert.deepEqual(refusal(await csiRequest({ cgroup: cg.nestedDecoy }, 'default/web')), refused, 'a nested cgroup in the exporter pod');
  assert.equal(await proc.metric('nmi_host_token_refusals_total\\{reason="not-allowed"\\}'), before + 2);
  const said = proc.output().split('\n').filter((l) => l.includes('host token caller refused'));
  assert.ok(said.some((l) => l.includes('host uid 1000')), 'the user is a host process');
  assert.ok(said.some((l) => l.includes('pod monitoring/node-exporter-4fz8q')), 'the nested cgroup is the pod it is in');
});

test('--cgroup-root outside the cgroup v2 mount: exit 2 naming the flag, since pods could not be told from host processes', () => {
  const r = nmi(['run', ...cluster.nmiFlags(), '--host-token-address', '127.0.0.1:2581', '--host-token-allow', 'host-root', '--cgroup-root', '/tmp/kubepods.slice']);
  assert.equal(r.code, 2, r.stderr);
  assert.equal(r.stderr.trim(), `nmi run: --cgroup-root: /tmp/kubepods.slice is not under the cgroup v2 mount ${cgroup2Mount()}, so --host-token-address cannot tell pods from host processes`);
});

test('a pod the kubelet lists after nmi last looked is found at once; a pod it does not list is 404', async () => {
  const late = cluster.addPod({ name: 'late', listed: false, labels: { aadpodidbinding: 'late' } });
  cluster.kubelet.pods.push(makePodJson({ name: 'late', ip: late.ns.ip, labels: { aadpodidbinding: 'late' }, phase: 'Pending' }));
  const { clientid } = asProviderReads(await csiRequest({ cgroup: cg.csi }, 'default/late'));
  assert.equal(clientid, client.late, 'a pending pod, its volumes being mounted, gets its token');
  const missing = await csiRequest({ cgroup: cg.csi }, 'default/nobody');
  assert.deepEqual(refusal(missing), { status: 404, type: 'application/json; charset=utf-8', error: 'not_found', error_description: 'Pod default/nobody not found on this node' });
});

test("a caller in another network namespace (a pod's own) cannot be attested and is refused", async () => {
  assert.equal(await proc.stop('SIGTERM'), 0);
  const nodeAddress = `${cluster.node.nodeIp}:2580`;
  proc = await cluster.startNmi(['--host-token-address', nodeAddress, ...allow()]);
  const fromPod = await callFrom({ cgroup: cg.csi, netns: web.ns.name }, `http://${nodeAddress}/host/token/?resource=x`);
  assert.deepEqual({ status: fromPod.status, body: fromPod.body }, { status: 403, body: JSON.stringify({ error: refused.error, error_description: refused.error_description }) }, 'even from the allowed cgroup: its socket is not in the node namespace');
  assert.equal(await proc.metric('nmi_host_token_refusals_total\\{reason="unattested"\\}'), 1);
});
