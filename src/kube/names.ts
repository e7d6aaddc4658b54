// Kubernetes' rules for names, as its apimachinery validation spells them.
const DNS_LABEL = /^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/;
const DNS_SUBDOMAIN = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/;
const NAME = /^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$/;

/** A namespace's name. */
export function isDnsLabel(s: string): boolean {
  return DNS_LABEL.test(s);
}

/** A label's or a taint's key: `[prefix/]name`, the prefix a DNS subdomain. */
export function isQualifiedName(s: string): boolean {
  const slash = s.indexOf('/');
  if (slash < 0) return NAME.test(s);
  const prefix = s.slice(0, slash);
  return prefix.length <= 253 && DNS_SUBDOMAIN.test(prefix) && NAME.test(s.slice(slash + 1));
}

/** A label's or a taint's value: empty, or up to 63 of letters, digits, `-`, `_`, `.`, alphanumeric at both ends. */
export function isLabelValue(s: string): boolean {
  return s === '' || NAME.test(s);
}

/** A pod's (or any object's) name: a DNS subdomain of at most 253 characters. */
export function isDnsSubdomain(s: string): boolean {
  return s.length <= 253 && DNS_SUBDOMAIN.test(s);
}
