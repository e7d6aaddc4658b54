// Real certificates for the stand-ins: a throwaway CA, serving certificates and
// client certificates, made with the openssl command into a temp folder.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

export interface CertFiles {
  cert: string;
  key: string;
  /** PEM contents, for servers created in-process. */
  certPem: string;
  keyPem: string;
}

export interface Pki {
  dir: string;
  caFile: string;
  caPem: string;
  /** A serving certificate; names may be DNS names or IP addresses. Without names it is CN-only (like the kubelet's). */
  server(cn: string, names?: string[]): CertFiles;
  client(cn: string, org?: string): CertFiles;
  remove(): void;
}

function openssl(args: string[]): void {
  execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

export function createPki(name = 'nmi-test'): Pki {
  const dir = mkdtempSync(path.join(tmpdir(), `${name}-pki-`));
  const caKey = path.join(dir, 'ca.key');
  const caFile = path.join(dir, 'ca.crt');
  openssl(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', caKey, '-out', caFile, '-days', '2', '-subj', `/CN=${name} CA`]);
  let serial = 1;
  const issue = (base: string, subject: string, ext: string): CertFiles => {
    const key = path.join(dir, `${base}.key`);
    const csr = path.join(dir, `${base}.csr`);
    const cert = path.join(dir, `${base}.crt`);
    const extFile = path.join(dir, `${base}.ext`);
    writeFileSync(extFile, ext);
    openssl(['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-out', csr, '-subj', subject]);
    openssl(['x509', '-req', '-in', csr, '-CA', caFile, '-CAkey', caKey, '-set_serial', String(serial++), '-out', cert, '-days', '2', '-extfile', extFile]);
    return { cert, key, certPem: readFileSync(cert, 'utf8'), keyPem: readFileSync(key, 'utf8') };
  };
  return {
    dir,
    caFile,
    caPem: readFileSync(caFile, 'utf8'),
    server(cn, names = []) {
      const san = names.map((n) => (/^[\d.]+$|:/.test(n) ? `IP:${n}` : `DNS:${n}`)).join(',');
      const ext = ['basicConstraints=CA:FALSE', 'extendedKeyUsage=serverAuth', ...(san ? [`subjectAltName=${san}`] : [])].join('\n');
      return issue(`server-${cn}`, `/CN=${cn}`, `${ext}\n`);
    },
    client(cn, org) {
      return issue(`client-${cn}`, `${org ? `/O=${org}` : ''}/CN=${cn}`, 'basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n');
    },
    remove() {
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
