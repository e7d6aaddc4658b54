// A node whose pods get tokens through Workload ID federation: the cluster
// harness plus the stand-in API server (TokenRequest, OIDC discovery) and Entra
// ID (federated credentials checked against the API server's JWKS), and nmi
// reading the bindings from that API server. For test/e2e/federation.test.ts and
// bench/federation.ts.
import { createCluster, type Cluster, type ClusterPod } from './cluster.js';
import type { NmiProcess } from './nmi-process.js';
import { startApiServer, type ApiServer, type KubeObject } from '../standins/apiserver.js';
import { startEntra, type EntraStandin } from '../standins/entra.js';

export const TENANT = '72f988bf-86f1-41af-91ab-2d7cd011db47';

export interface FederatedNode {
  cluster: Cluster;
  api: ApiServer;
  entra: EntraStandin;
  kubeconfig: string;
  /** A pod in its own namespace, listed by the kubelet and held by the API server (tokens are bound to it), running as `serviceAccount`. */
  addPod(o: { name: string; namespace: string; labels: Record<string, string>; serviceAccount: string; annotations?: Record<string, string> }): ClusterPod;
  /** The subject Entra ID sees in the pod's service-account tokens. */
  subjectOf(pod: ClusterPod): string;
  startNmi(extra?: string[]): Promise<NmiProcess>;
  close(): Promise<void>;
}

export async function createFederatedNode(): Promise<FederatedNode> {
  const cluster = await createCluster();
  const api = await startApiServer({ pki: cluster.pki });
  const entra = await startEntra({ pki: cluster.pki });
  const kubeconfig = api.writeKubeconfig(cluster.bindingsDir);
  return {
    cluster,
    api,
    entra,
    kubeconfig,
    addPod({ name, namespace, labels, serviceAccount, annotations = {} }) {
      const pod = cluster.addPod({ name, namespace, labels, serviceAccount });
      if (!api.get('ServiceAccount', namespace, serviceAccount) || Object.keys(annotations).length > 0) {
        api.put({ apiVersion: 'v1', kind: 'ServiceAccount', metadata: { name: serviceAccount, namespace, annotations } });
      }
      api.put({ apiVersion: 'v1', kind: 'Pod', metadata: { name, namespace, uid: pod.uid }, spec: { serviceAccountName: serviceAccount, nodeName: 'node1' } } as KubeObject);
      return pod;
    },
    subjectOf: (pod) => `system:serviceaccount:${pod.namespace}:${pod.serviceAccount}`,
    startNmi: (extra = []) =>
      cluster.startNmi(['--bindings', 'kubernetes', '--kubeconfig', kubeconfig, '--aad-authority-host', entra.url, ...extra], {
        env: { ...process.env, NODE_EXTRA_CA_CERTS: cluster.pki.caFile },
      }),
    async close() {
      await entra.close();
      await api.close();
      await cluster.close();
    },
  };
}
