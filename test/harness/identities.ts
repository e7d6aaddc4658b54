// Test identities: a fresh user-assigned one per call, so tests never share cache keys.
import { IdentityType, type AzureIdentity } from '../../src/bindings/model.js';

let counter = 0;

export function freshMsi(overrides: Partial<AzureIdentity> = {}): AzureIdentity {
  counter++;
  return {
    name: `msi-${counter}`,
    namespace: 'apps',
    type: IdentityType.UserAssignedMSI,
    clientID: `00000000-0000-0000-0000-${String(counter).padStart(12, '0')}`,
    resourceID: '',
    tenantID: '',
    namespaced: false,
    version: '1',
    ...overrides,
  };
}
