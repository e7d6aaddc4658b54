// A whole node for end-to-end tests: a node namespace (entered), a stand-in
// kubelet (mTLS), a stand-in IMDS, a bindings folder, and pods in their own
// namespaces listed by the kubelet.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { stringify } from 'yaml';
import { createPki, type Pki } from '../standins/pki.js';
import { makePodJson, startKubelet, type Kubelet } from '../standins/kubelet.js';
import { startImds, type ImdsOptions, type ImdsStandin } from '../standins/imds.js';
import { createNode, type NodeNs, type PodNs } from './netns.js';
import { startNmi, type NmiProcess, type StartOptions } from './nmi-process.js';

export interface ClusterPod {
  ns: PodNs;
  name: string;
  namespace: string;
  labels: Record<string, string>;
  uid: string;
  serviceAccount: string;
}

export interface Cluster {
  node: NodeNs;
  pki: Pki;
  kubelet: Kubelet;
  imds: ImdsStandin;
  bindingsDir: string;
  /** Makes a pod namespace and lists it at the kubelet (unless listed is false). */
  addPod(o: { name: string; namespace?: string; labels?: Record<string, string>; listed?: boolean; serviceAccount?: string }): ClusterPod;
  /** Writes the bindings folder's one file. */
  writeBindings(objects: object[]): void;
  nmiFlags(): string[];
  startNmi(extra?: string[], options?: StartOptions): Promise<NmiProcess>;
  close(): Promise<void>;
}

export async function createCluster(options: { imds?: ImdsOptions } = {}): Promise<Cluster> {
  const node = createNode();
  // An IMDS stand-in at a node address other than loopback (the real one's, for the eBPF tests) needs it on lo.
  const imdsHost = options.imds?.host;
  if (imdsHost && imdsHost !== '127.0.0.1') node.exec('ip', ['addr', 'add', `${imdsHost}/32`, 'dev', 'lo']);
  const pki = createPki();
  const kubelet = await startKubelet({ pki });
  const imds = await startImds(options.imds);
  const bindingsDir = mkdtempSync(path.join(tmpdir(), 'nmi-bindings-'));
  const running: NmiProcess[] = [];
  const cluster: Cluster = {
    node,
    pki,
    kubelet,
    imds,
    bindingsDir,
    addPod({ name, namespace = 'default', labels = {}, listed = true, serviceAccount }) {
      const ns = node.addPod();
      const json = makePodJson({ name, namespace, ip: ns.ip, labels, nodeName: 'node1', serviceAccount });
      if (listed) kubelet.pods.push(json);
      return { ns, name, namespace, labels, uid: (json.metadata as { uid: string }).uid, serviceAccount: serviceAccount ?? 'default' };
    },
    writeBindings(objects) {
      writeFileSync(path.join(bindingsDir, 'bindings.yaml'), objects.map((o) => stringify(o)).join('---\n'));
    },
    nmiFlags() {
      return [
        '--node-ip', node.nodeIp,
        '--node-name', 'node1',
        '--kubelet-url', kubelet.url.href,
        '--kubelet-ca', kubelet.caFile,
        '--kubelet-client-cert', kubelet.client.cert,
        '--kubelet-client-key', kubelet.client.key,
        '--bindings', bindingsDir,
        '--upstream-imds', imds.url,
        '--rules', 'iptables',
        '--sync-interval', '1s',
      ];
    },
    async startNmi(extra = [], startOptions = {}) {
      const proc = await startNmi([...cluster.nmiFlags(), ...extra], startOptions);
      running.push(proc);
      return proc;
    },
    async close() {
      for (const proc of running) await proc.stop('SIGTERM');
      await Promise.allSettled([kubelet.close(), imds.close()]);
      node.destroy();
      pki.remove();
      rmSync(bindingsDir, { recursive: true, force: true });
    },
  };
  return cluster;
}

/** aad-pod-identity's documents, as an operator would write them. */
export const crd = {
  userAssigned(name: string, clientID: string, resourceID: string, namespace = 'default', annotations: Record<string, string> = {}) {
    return { apiVersion: 'aadpodidentity.k8s.io/v1', kind: 'AzureIdentity', metadata: { name, namespace, annotations }, spec: { type: 0, clientID, resourceID } };
  },
  servicePrincipal(name: string, tenantID: string, clientID: string, secretName: string, namespace = 'default', type: 1 | 2 = 1) {
    return {
      apiVersion: 'aadpodidentity.k8s.io/v1',
      kind: 'AzureIdentity',
      metadata: { name, namespace },
      spec: { type, tenantID, clientID, clientPassword: { name: secretName, namespace } },
    };
  },
  binding(name: string, azureIdentity: string, selector: string, namespace = 'default') {
    return { apiVersion: 'aadpodidentity.k8s.io/v1', kind: 'AzureIdentityBinding', metadata: { name, namespace }, spec: { azureIdentity, selector } };
  },
  exception(name: string, podLabels: Record<string, string>, namespace = 'default') {
    return { apiVersion: 'aadpodidentity.k8s.io/v1', kind: 'AzurePodIdentityException', metadata: { name, namespace }, spec: { podLabels } };
  },
  secret(name: string, stringData: Record<string, string>, namespace = 'default') {
    return { apiVersion: 'v1', kind: 'Secret', metadata: { name, namespace }, stringData };
  },
};

export const TOKEN_URL = 'http://169.254.169.254/metadata/identity/oauth2/token';

/** The same URL as a dual-stack IPv6 socket asks it (Java's default): ::ffff:169.254.169.254. */
export function viaV4Mapped(url: string): string {
  return url.replace('//169.254.169.254/', '//[::ffff:169.254.169.254]/');
}
