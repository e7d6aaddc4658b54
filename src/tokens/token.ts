// A token as IMDS answers it: every value a string.
export interface TokenAnswer {
  access_token: string;
  client_id: string;
  expires_in: string;
  expires_on: string;
  ext_expires_in: string;
  not_before: string;
  resource: string;
  token_type: string;
}

/** A cached token: the answer without expires_in, which is counted at answer time. */
export interface Token {
  accessToken: string;
  clientId: string;
  /** Seconds since the epoch. */
  expiresOn: number;
  extExpiresIn: number;
  notBefore: number;
  resource: string;
  tokenType: string;
}

export function toAnswer(token: Token, nowMs = Date.now()): TokenAnswer {
  return {
    access_token: token.accessToken,
    client_id: token.clientId,
    expires_in: String(Math.max(0, token.expiresOn - Math.floor(nowMs / 1000))),
    expires_on: String(token.expiresOn),
    ext_expires_in: String(token.extExpiresIn),
    not_before: String(token.notBefore),
    resource: token.resource,
    token_type: token.tokenType,
  };
}
