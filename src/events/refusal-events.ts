// Which refusals become an Event on the pod, and what it says. Only what an
// operator must act on: a pod with no usable identity, an ambiguous one, an
// address refused before the kubelet listed the pod, a spoof attempt. Refusals
// that pass on their own (the budget, an upstream outage) are in `nmi explain`
// and the metrics, not on the pod. The note stays the same for every repeat, so
// repeats count in one Event's series.
import type { Refusal } from '../explain/refusals.js';
import type { Pod } from '../kubelet/pod.js';
import type { PodEvent } from './pod-events.js';

export function refusalEvent(pod: Pod, refusal: Refusal, nodeName: string): PodEvent | undefined {
  const explain = ` Run "nmi explain ${pod.namespace}/${pod.name}" on node ${nodeName} for the bindings in reach.`;
  const answered = `${refusal.status} ${refusal.error_description}`;
  const resource = refusal.resource ? ` for ${refusal.resource}` : '';
  switch (refusal.kind) {
    case 'no-identity':
      return {
        reason: 'NoIdentity',
        action: 'GetToken',
        note: `Token request${resource} refused (${answered}): ${refusal.cause ?? 'no AzureIdentityBinding in reach selects this pod'}.${explain}`,
      };
    case 'several-identities':
      return {
        reason: 'SeveralIdentities',
        action: 'GetToken',
        note: `Token request${resource} refused: several identities are bound and the request names none (--multiple-identities refuse); name client_id or msi_res_id.${explain}`,
      };
    case 'identity-unusable':
      return { reason: 'IdentityUnusable', action: 'GetToken', note: `Identity ${refusal.identity} cannot be used: ${refusal.cause}.${explain}` };
    case 'upstream-refused':
      return { reason: 'TokenRefused', action: 'GetToken', note: `The token issuer refused identity ${refusal.identity}${resource}: ${answered}.` };
    case 'unknown-caller':
      return {
        reason: 'UnknownCaller',
        action: 'FindCaller',
        note: `Token requests from this pod's address were answered ${answered}: they came before the kubelet listed the pod. Retry; they are answered now.`,
      };
    case 'spoof':
      return { reason: 'SpoofAttempt', action: 'FindCaller', note: `A token request from this pod's socket carried another pod's source address (${refusal.cause}); refused.` };
    default:
      return undefined;
  }
}
