// Step 7 of the token endpoint, shared by the token core, /host/token and the js
// server's worker thread (which holds identities without their credentials).
import type { AzureIdentity } from '../bindings/model.js';
import type { MultipleIdentities } from '../config/commands.js';
import type { IdSelector } from './request.js';


/**
 * Step 7: the pod's identities filtered by the requested id. client_id and
 * msi_res_id compare case-insensitively (Azure ids are). The CRs carry no
 * object id, so an object_id request never matches: "Identity not found".
 * Several identities sharing the requested id are one Azure identity: the first wins.
 * None requested and several bound: with `first` the first (bindings/match.ts
 * orders them), as NMI answered; with `refuse` 'ambiguous', as IMDS answers.
 */
export function selectIdentity<T extends Pick<AzureIdentity, 'clientID' | 'resourceID'>>(
  identities: readonly T[],
  selector: IdSelector | undefined,
  multipleIdentities: MultipleIdentities,
): T | 'none' | 'ambiguous' {
  if (!selector) {
    if (identities.length > 1 && multipleIdentities === 'refuse') return 'ambiguous';
    return identities[0] ?? 'none';
  }
  const wanted = selector.value.toLowerCase();
  const field = selector.param === 'client_id' ? 'clientID' : selector.param === 'msi_res_id' ? 'resourceID' : undefined;
  const match = field && identities.find((identity) => identity[field] !== '' && identity[field].toLowerCase() === wanted);
  return match || 'none';
}
