// How nmi writes a base URL it appends paths to (an IMDS, an Entra ID
// authority host): origin and path, without trailing slashes.
export function urlBase(url: URL): string {
  return `${url.origin}${url.pathname}`.replace(/\/+$/, '');
}
