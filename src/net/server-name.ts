// The name a serving certificate must carry when it is not the URL's host.
import { isIP } from 'node:net';
import { checkServerIdentity, type PeerCertificate } from 'node:tls';

/**
 * How a configured server name (--kubelet-server-name, a kubeconfig's
 * tls-server-name) is verified. Node.js 26 refuses an IP address as the TLS
 * server name, and no longer matches a common name that is not a valid host name, such
 * as a kubelet's self-signed `<node>@<timestamp>`: the name is checked here, the common
 * name exactly and only in a certificate with no alternative names, else as node checks.
 */
export function verifyServerName(name: string): { servername?: string; checkServerIdentity(host: string, cert: PeerCertificate): Error | undefined } {
  return {
    servername: isIP(name) ? undefined : name,
    checkServerIdentity: (_host, cert) => (!cert.subjectaltname && cert.subject?.CN === name ? undefined : checkServerIdentity(name, cert)),
  };
}
