// Entra ID's rejections of a Workload ID exchange, turned into what a pod (and its
// operator) can act on: IMDS's 400 shape, the description naming the cause and
// the service account, issuer and subject Entra ID compared (never the token).
import type { ServiceAccountToken } from '../kube/service-account-token.js';
import { UpstreamError, type UpstreamErrorBody } from './upstream-error.js';

export interface Exchange {
  /** identity namespace/name, the app and tenant it signs in as */
  identity: string;
  clientID: string;
  tenantID: string;
  /** The service account, namespace/name, and what its token said. */
  serviceAccount: string;
  token: Pick<ServiceAccountToken, 'issuer' | 'subject'>;
}

/** The first sentence Entra ID gives, without its trace and correlation ids. */
function entraSays(description: string): string {
  return description.split(/\r?\n|Trace ID:/)[0]!.trim();
}

function cause(code: string | undefined, x: Exchange): string {
  const fic = `issuer ${x.token.issuer || '?'}, subject ${x.token.subject || '?'}, audience api://AzureADTokenExchange`;
  switch (code) {
    // 70021 before Entra ID split it by what did not match: 700211 issuer, 700212 audience, 700213 subject.
    case '70021':
    case '700211':
    case '700212':
    case '700213':
      return `no federated identity credential of app ${x.clientID} (tenant ${x.tenantID}) matches service account ${x.serviceAccount} (${fic}): add one to the app, or serve this pod another identity`;
    case '700024':
      return `the token of service account ${x.serviceAccount} was outside its valid time when Entra ID checked it: check the clocks of this node and of the API server`;
    case '50027':
    case '50166':
    case '700027':
    case '7000272':
      return `Entra ID could not verify the token of service account ${x.serviceAccount} with the cluster's issuer ${x.token.issuer || '?'}: the issuer's OIDC discovery document and keys must be reachable by Entra ID, and be the issuer the federated credential names`;
    case '700016':
      return `app ${x.clientID} is not in tenant ${x.tenantID}: check the identity's clientID and tenantID`;
    default:
      return `Entra ID refused the exchange for app ${x.clientID} as service account ${x.serviceAccount}`;
  }
}

/** An issuer 4xx of an exchange as the pod gets it; anything else as it was. */
export function federationRejection(err: UpstreamError, x: Exchange): UpstreamError {
  if (err.kind !== 'client' || !err.body) return err;
  const code = /AADSTS(\d+)/.exec(err.body.error_description)?.[1];
  const body: UpstreamErrorBody = {
    error: err.body.error,
    error_description: `Workload identity federation failed for ${x.identity}: ${cause(code, x)}. Entra ID: ${entraSays(err.body.error_description)}`,
  };
  // IMDS answers a refused identity 400; Entra ID's 401 for a client assertion is the same refusal.
  return new UpstreamError('client', `Entra ID refused the exchange: ${body.error_description}`, { status: 400, body, cause: err });
}
