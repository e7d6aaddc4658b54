/** namespace/name: how objects (identities, bindings, secrets, service accounts) are keyed everywhere, as client-go's MetaNamespaceKeyFunc keys them. */
export function objectKey(namespace: string, name: string): string {
  return `${namespace}/${name}`;
}
