// Fetches one fresh token for one identity through msal-node: user-assigned
// managed identities from the upstream IMDS, service principals from Entra ID.
// Caching is the TokenCache's job, so msal's own caches are bypassed.
import { createPrivateKey, X509Certificate, type KeyObject } from 'node:crypto';
import {
  ConfidentialClientApplication,
  LogLevel,
  ManagedIdentityApplication,
  ManagedIdentitySourceNames,
  ServerError,
  type AuthenticationResult,
  type NodeSystemOptions,
  type NodeAuthOptions,
} from '@azure/msal-node';
import { IdentityType, type AzureIdentity } from '../bindings/model.js';
import { codes, NmiError, messageOf } from '../errors/errors.js';
import type { Logger } from '../log/logger.js';
import { jwtClaims } from '../util/jwt.js';
import { urlBase } from '../util/url-base.js';
import type { Token } from './token.js';
import type { ServiceAccountToken } from '../kube/service-account-token.js';
import { federationRejection } from './federation.js';
import { recordExchanges, type NetworkClient, type UpstreamExchange } from './network-client.js';
import { errorBodyOf, kindForStatus, parseRetryAfter, UpstreamError, type Issuer } from './upstream-error.js';

/**
 * What a service principal signs in with: the bindings resolve it from the Secret its identity names.
 * A federated identity signs in with its pod's service-account token, requested for each exchange.
 */
export type Credential = { clientSecret: string } | { certificate: string; password?: string } | { assertion: () => Promise<ServiceAccountToken> };

export interface TokenProvider {
  /** One fresh token from the issuer; throws UpstreamError (issuer trouble) or NmiError(TOKEN) (our side). */
  fetch(identity: AzureIdentity, resource: string, credential?: Credential): Promise<Token>;
}

export interface MsalProviderOptions {
  /** --upstream-imds, e.g. http://169.254.169.254 */
  upstreamImds: string;
  /** --aad-authority-host, e.g. https://login.microsoftonline.com */
  aadAuthorityHost: string;
  /** --aad-endpoint-allow: hosts an identity's adEndpoint may name besides Entra ID's and aadAuthorityHost's. */
  adEndpointAllow?: Iterable<string>;
  /** Owned by the caller, who closes it at shutdown. */
  network: NetworkClient;
  logger?: Logger;
}

const podIdentityHostVariable = 'AZURE_POD_IDENTITY_AUTHORITY_HOST';

/**
 * Entra ID's authority hosts: public, US Government, China (21Vianet, under both names its SDKs use).
 * An adEndpoint elsewhere would have nmi send a client secret, or a pod's service-account token, to
 * whoever runs that host: a tenant who may write an AzureIdentity must not choose where.
 */
export const ENTRA_AUTHORITY_HOSTS: readonly string[] = ['login.microsoftonline.com', 'login.microsoftonline.us', 'login.partner.microsoftonline.cn', 'login.chinacloudapi.cn'];

/**
 * msal-node keeps its managed-identity source (endpoint and network client) in
 * static fields, chosen on first use from the environment: one upstream IMDS per process.
 */
let imdsBinding: { upstream: string; network: NetworkClient } | undefined;

export class MsalTokenProvider implements TokenProvider {
  private readonly upstreamImds: string;
  private readonly authorityHost: string;
  /** The hosts an adEndpoint may name. */
  private readonly allowedHosts: ReadonlySet<string>;
  private readonly network: NetworkClient;
  private readonly loggerOptions: NonNullable<NodeSystemOptions['loggerOptions']>;

  constructor(options: MsalProviderOptions) {
    this.upstreamImds = normalizedBase(options.upstreamImds, 'upstream IMDS', ['http:', 'https:']);
    this.authorityHost = normalizedBase(options.aadAuthorityHost, 'AAD authority host', ['https:']);
    this.allowedHosts = new Set([...ENTRA_AUTHORITY_HOSTS, new URL(this.authorityHost).host, ...(options.adEndpointAllow ?? [])]);
    this.network = options.network;
    const logger = options.logger;
    this.loggerOptions = {
      logLevel: LogLevel.Warning,
      piiLoggingEnabled: false,
      loggerCallback: (_level: LogLevel, message: string) => logger?.debug({ msal: message }, 'msal'),
    };
  }

  async fetch(identity: AzureIdentity, resource: string, credential?: Credential): Promise<Token> {
    if (!resource) throw new NmiError(codes.TOKEN, 'a token needs a resource');
    const requestedAtMs = Date.now();
    const issuer: Issuer = identity.type === IdentityType.UserAssignedMSI ? 'IMDS' : 'Entra ID';
    const log: UpstreamExchange[] = [];
    const exchange: { token?: ServiceAccountToken } = {};
    const failed = (err: unknown): NmiError => {
      const classified = classify(err, log.at(-1), issuer);
      if (!(classified instanceof UpstreamError) || !exchange.token || !identity.serviceAccount) return classified;
      const { clientID, tenantID, serviceAccount } = identity;
      return federationRejection(classified, { identity: `${identity.namespace}/${identity.name}`, clientID, tenantID, serviceAccount, token: exchange.token });
    };
    let result: AuthenticationResult;
    try {
      result = await recordExchanges(log, () => this.acquire(identity, resource, credential, exchange));
    } catch (err) {
      throw failed(err);
    }
    const last = log.at(-1);
    if (!result.accessToken || (last?.status !== undefined && (last.status < 200 || last.status >= 300))) {
      // msal may turn an error answer without an error field into an empty result.
      throw failed(new Error('no access token in the answer'));
    }
    return toToken(result, identity, resource, requestedAtMs);
  }

  private acquire(identity: AzureIdentity, resource: string, credential: Credential | undefined, exchange: { token?: ServiceAccountToken }): Promise<AuthenticationResult> {
    switch (identity.type) {
      case IdentityType.UserAssignedMSI:
        return this.fromImds(identity, resource);
      case IdentityType.ServicePrincipal:
      case IdentityType.ServicePrincipalCertificate:
      case IdentityType.Federated:
        return this.fromEntra(identity, resource, credential, exchange);
      default:
        throw new NmiError(codes.TOKEN, `identity ${identity.namespace}/${identity.name}: unknown type ${String(identity.type)}`);
    }
  }

  private async fromImds(identity: AzureIdentity, resource: string): Promise<AuthenticationResult> {
    const network = this.bindImds();
    const idParams = identity.clientID
      ? { userAssignedClientId: identity.clientID }
      : identity.resourceID
        ? { userAssignedResourceId: identity.resourceID }
        : undefined;
    if (!idParams) throw new NmiError(codes.TOKEN, `identity ${identity.namespace}/${identity.name}: type 0 needs a clientID or a resourceID`);
    const app = new ManagedIdentityApplication({
      managedIdentityIdParams: idParams,
      // Our TokenCache retries with the whole picture (Retry-After, budget); msal's retries would hide it.
      system: { networkClient: network, loggerOptions: this.loggerOptions, disableInternalRetries: true },
    });
    const source = app.getManagedIdentitySource();
    if (source !== ManagedIdentitySourceNames.DEFAULT_TO_IMDS) {
      throw new NmiError(codes.TOKEN, `msal-node picked the ${source} managed-identity source from this process's environment, not IMDS`);
    }
    // forceRefresh skips msal's cache lookup and goes straight to IMDS.
    return app.acquireToken({ resource, forceRefresh: true });
  }

  /** Points msal's process-wide IMDS source at our upstream before its first use. */
  private bindImds(): NetworkClient {
    if (!imdsBinding) {
      process.env[podIdentityHostVariable] = this.upstreamImds;
      imdsBinding = { upstream: this.upstreamImds, network: this.network };
    } else if (imdsBinding.upstream !== this.upstreamImds) {
      throw new NmiError(codes.TOKEN, `this process already fetches managed-identity tokens from ${imdsBinding.upstream}; msal-node cannot also use ${this.upstreamImds}`);
    }
    return imdsBinding.network;
  }

  /** Where a service principal signs in: spec.adEndpoint (validated by the bindings parser) beats --aad-authority-host, then its tenant. */
  authorityOf(identity: AzureIdentity): { host: string; authority: string } {
    const host = identity.adEndpoint ?? this.authorityHost;
    return { host, authority: `${host}/${identity.tenantID}` };
  }

  /** exchange.token: a federated identity's service-account token, once requested (for what a rejection says). */
  private async fromEntra(identity: AzureIdentity, resource: string, credential: Credential | undefined, exchange: { token?: ServiceAccountToken }): Promise<AuthenticationResult> {
    const { tenantID, clientID } = identity;
    const name = `${identity.namespace}/${identity.name}`;
    if (!/^[A-Za-z0-9][A-Za-z0-9.-]*$/.test(tenantID)) throw new NmiError(codes.TOKEN, `identity ${name}: tenantID ${JSON.stringify(tenantID)} is not a tenant id or domain`);
    if (!clientID) throw new NmiError(codes.TOKEN, `identity ${name}: clientID is empty`);
    // Before any credential is read or requested: nothing goes to a host nobody allowed.
    const adHost = identity.adEndpoint && new URL(identity.adEndpoint).host;
    if (adHost && !this.allowedHosts.has(adHost)) {
      throw new NmiError(codes.TOKEN, `identity ${name}: adEndpoint ${identity.adEndpoint} is not an Entra ID authority host nor --aad-authority-host's; --aad-endpoint-allow ${adHost} would allow it`);
    }
    const { host, authority } = this.authorityOf(identity);
    let signIn: Pick<NodeAuthOptions, 'clientSecret' | 'clientCertificate' | 'clientAssertion'>;
    if (identity.type === IdentityType.Federated) {
      if (!credential || !('assertion' in credential)) throw new NmiError(codes.TOKEN, `identity ${name}: no service-account token to exchange`);
      // Requested here, not in msal's callback: the API server's rejection then stays ours to say.
      exchange.token = await credential.assertion();
      signIn = { clientAssertion: exchange.token.token };
    } else {
      signIn = secretOptions(identity, credential);
    }
    // A fresh app per fetch: msal keeps tokens and throttling state per app, and we want neither.
    const app = new ConfidentialClientApplication({
      auth: {
        clientId: clientID,
        authority,
        ...signIn,
        // Both given, so msal never asks the public cloud for instance discovery or OIDC metadata.
        knownAuthorities: [host],
        authorityMetadata: JSON.stringify(authorityMetadata(authority)),
      },
      system: { networkClient: this.network, loggerOptions: this.loggerOptions },
    });
    const result = await app.acquireTokenByClientCredential({ scopes: [scopeForResource(resource)], skipCache: true });
    if (!result) throw new NmiError(codes.TOKEN, `identity ${name}: msal returned no token`);
    return result;
  }
}

/**
 * The v2 scope for a v1 resource, as Entra ID documents it: `<resource>/.default`,
 * keeping a trailing slash (`https://management.azure.com//.default`) so the
 * token's audience is the resource exactly as requested, as with the v1 endpoint NMI used.
 */
export function scopeForResource(resource: string): string {
  return resource.endsWith('/.default') ? resource : `${resource}/.default`;
}

function secretOptions(identity: AzureIdentity, credential: Credential | undefined): Pick<NodeAuthOptions, 'clientSecret' | 'clientCertificate'> {
  const name = `${identity.namespace}/${identity.name}`;
  if (identity.type === IdentityType.ServicePrincipal) {
    if (!credential || !('clientSecret' in credential) || !credential.clientSecret) {
      throw new NmiError(codes.TOKEN, `identity ${name}: no client secret`);
    }
    return { clientSecret: credential.clientSecret };
  }
  if (!credential || !('certificate' in credential) || !credential.certificate) {
    throw new NmiError(codes.TOKEN, `identity ${name}: no certificate`);
  }
  return { clientCertificate: clientCertificate(name, credential.certificate, credential.password) };
}

const pemBlock = (label: string): RegExp => new RegExp(`-----BEGIN ${label}-----[\\s\\S]+?-----END ${label}-----`, 'g');

/** msal's clientCertificate from a PEM holding the certificate(s) and the (maybe encrypted) RSA key. */
function clientCertificate(name: string, pem: string, password: string | undefined): { thumbprintSha256: string; privateKey: string; x5c: string } {
  const certificates = pem.match(pemBlock('CERTIFICATE')) ?? [];
  const keyBlock = pem.match(pemBlock('(?:ENCRYPTED |RSA )?PRIVATE KEY'))?.[0];
  if (certificates.length === 0 || !keyBlock) {
    throw new NmiError(codes.TOKEN, `identity ${name}: the certificate must be PEM with a CERTIFICATE and a PRIVATE KEY block (PKCS#12 is not supported)`);
  }
  let key: KeyObject;
  try {
    key = createPrivateKey({ key: keyBlock, format: 'pem', passphrase: password || undefined });
  } catch {
    throw new NmiError(codes.TOKEN, `identity ${name}: cannot read the private key (wrong or missing password?)`);
  }
  // msal signs client assertions with RS256/PS256 only.
  if (key.asymmetricKeyType !== 'rsa') throw new NmiError(codes.TOKEN, `identity ${name}: the private key is ${key.asymmetricKeyType}, msal needs RSA`);
  const leafPem = certificates.find((c) => new X509Certificate(c).checkPrivateKey(key));
  if (!leafPem) throw new NmiError(codes.TOKEN, `identity ${name}: no certificate matches the private key`);
  return {
    thumbprintSha256: new X509Certificate(leafPem).fingerprint256.replaceAll(':', '').toLowerCase(),
    privateKey: key.export({ format: 'pem', type: 'pkcs8' }).toString(),
    x5c: leafPem,
  };
}

/** The OIDC metadata Entra ID serves for a tenant, built locally. */
function authorityMetadata(authority: string): Record<string, string> {
  return {
    token_endpoint: `${authority}/oauth2/v2.0/token`,
    authorization_endpoint: `${authority}/oauth2/v2.0/authorize`,
    end_session_endpoint: `${authority}/oauth2/v2.0/logout`,
    issuer: `${authority}/v2.0`,
    jwks_uri: `${authority}/discovery/v2.0/keys`,
  };
}

function classify(err: unknown, last: UpstreamExchange | undefined, issuer: Issuer): NmiError {
  if (err instanceof NmiError && !(err instanceof UpstreamError)) return err;
  const status = last?.status ?? (err instanceof ServerError ? err.status : undefined);
  if (status !== undefined && (status < 200 || status >= 300)) {
    const body = errorBodyOf(last?.errorBody);
    const detail = body ? `${body.error}: ${body.error_description}` : `HTTP ${status}`;
    return new UpstreamError(kindForStatus(status, issuer), `${issuer} rejected the token request: ${detail}`, {
      status,
      body,
      retryAfterMs: parseRetryAfter(last?.headers?.['retry-after'], Date.now()),
      cause: err,
    });
  }
  if (last?.failure) return last.failure;
  if (err instanceof UpstreamError) return err;
  if (status !== undefined) {
    return new UpstreamError('server', `${issuer} answered ${status} without a usable token`, { status, cause: err });
  }
  const reason = messageOf(err);
  return new NmiError(codes.TOKEN, `${issuer}: ${reason}`, { cause: err });
}

function toToken(result: AuthenticationResult, identity: AzureIdentity, resource: string, requestedAtMs: number): Token {
  const claims = jwtClaims(result.accessToken);
  const requestedAt = Math.floor(requestedAtMs / 1000);
  const expiresOn = result.expiresOn ? Math.floor(result.expiresOn.getTime() / 1000) : numberClaim(claims.exp) ?? requestedAt;
  // msal sets extExpiresOn = expiresOn + the issuer's ext_expires_in (Entra ID); IMDS's is not
  // kept, and IMDS gives the token's lifetime there.
  const extExpiresOn = result.extExpiresOn ? Math.floor(result.extExpiresOn.getTime() / 1000) : expiresOn;
  const extExpiresIn = extExpiresOn > expiresOn ? extExpiresOn - expiresOn : Math.max(0, expiresOn - requestedAt);
  return {
    accessToken: result.accessToken,
    // Type 0 identities may name the MSI by resource id only; IMDS's token says its client id.
    clientId: identity.clientID || stringClaim(claims.appid) || stringClaim(claims.azp) || '',
    expiresOn,
    extExpiresIn,
    notBefore: numberClaim(claims.nbf) ?? requestedAt,
    resource,
    tokenType: result.tokenType || 'Bearer',
  };
}

const numberClaim = (value: unknown): number | undefined => (typeof value === 'number' && Number.isFinite(value) ? value : undefined);
const stringClaim = (value: unknown): string | undefined => (typeof value === 'string' && value ? value : undefined);

function normalizedBase(value: string, what: string, protocols: string[]): string {
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    throw new NmiError(codes.TOKEN, `${what} ${JSON.stringify(value)} is not a URL`);
  }
  if (!protocols.includes(url.protocol)) throw new NmiError(codes.TOKEN, `${what} ${value} must use ${protocols.join(' or ')}`);
  return urlBase(url);
}
