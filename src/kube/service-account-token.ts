// Service-account tokens for Workload ID, through the API server's TokenRequest API:
// one per exchange, for the calling pod's own service account, bound to that pod
// (the API server refuses it once the pod is gone, and the node authorizer lets
// a kubelet credential ask only for pods bound to its node). Never kept: the token
// is a credential; it goes to Entra ID in the exchange and is dropped.
import { codes, NmiError, messageOf } from '../errors/errors.js';
import { serviceAccountName, type Pod } from '../kubelet/pod.js';
import { jwtClaims } from '../util/jwt.js';
import { ApiError, type KubeClient } from './client.js';

/** The audience Entra ID's federated identity credentials expect. */
export const TOKEN_EXCHANGE_AUDIENCE = 'api://AzureADTokenExchange';
/** The API server's minimum lifetime: the token only has to outlive one exchange. */
const EXPIRATION_SECONDS = 600;

export interface ServiceAccountToken {
  token: string;
  /** What Entra ID checks, for messages (never the token): iss and sub. */
  issuer: string;
  subject: string;
}

export class ServiceAccountTokens {
  constructor(private readonly client: Pick<KubeClient, 'create'>) {}

  /** A token of the pod's service account, bound to the pod. Throws NmiError(TOKEN) saying what the API server refused. */
  async forPod(pod: Pod, signal: AbortSignal = AbortSignal.timeout(30_000)): Promise<ServiceAccountToken> {
    const account = serviceAccountName(pod);
    const path = `/api/v1/namespaces/${encodeURIComponent(pod.namespace)}/serviceaccounts/${encodeURIComponent(account)}/token`;
    const request = {
      apiVersion: 'authentication.k8s.io/v1',
      kind: 'TokenRequest',
      spec: {
        audiences: [TOKEN_EXCHANGE_AUDIENCE],
        expirationSeconds: EXPIRATION_SECONDS,
        boundObjectRef: { kind: 'Pod', apiVersion: 'v1', name: pod.name, uid: pod.uid },
      },
    };
    let answer: unknown;
    try {
      answer = await this.client.create(path, request, signal);
    } catch (err) {
      const hint = err instanceof ApiError && err.status === 403 ? ' (nmi needs create on serviceaccounts/token: deploy/grants/federation)' : '';
      throw new NmiError(codes.TOKEN, `service account token for ${pod.namespace}/${account}: ${messageOf(err)}${hint}`, { cause: err });
    }
    const token = (answer as { status?: { token?: unknown } } | null)?.status?.token;
    if (typeof token !== 'string' || token === '') throw new NmiError(codes.TOKEN, `service account token for ${pod.namespace}/${account}: the API server answered no token`);
    const claims = jwtClaims(token);
    return { token, issuer: String(claims.iss ?? ''), subject: String(claims.sub ?? '') };
  }
}
