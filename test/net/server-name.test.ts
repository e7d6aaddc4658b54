// A configured server name as Node.js 26 would not check it: an IP address, and a
// self-signed kubelet's <node>@<timestamp> common name. (The kubelet client's test
// shows both against a real TLS server.)
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { PeerCertificate } from 'node:tls';
import { verifyServerName } from '../../src/net/server-name.js';

const cert = (fields: Partial<PeerCertificate>) => ({ subject: {}, ...fields }) as PeerCertificate;

test('a common name that is no host name matches exactly, and only without alternative names', () => {
  const { servername, checkServerIdentity } = verifyServerName('aks-nodepool1-0@1700000000');
  assert.equal(servername, 'aks-nodepool1-0@1700000000');
  assert.equal(checkServerIdentity('10.0.0.4', cert({ subject: { CN: 'aks-nodepool1-0@1700000000' } as PeerCertificate['subject'] })), undefined);
  assert.ok(checkServerIdentity('10.0.0.4', cert({ subject: { CN: 'aks-nodepool1-1@1700000000' } as PeerCertificate['subject'] })));
  assert.ok(checkServerIdentity('10.0.0.4', cert({ subject: { CN: 'aks-nodepool1-0@1700000000' } as PeerCertificate['subject'], subjectaltname: 'DNS:other' })));
});

test('an IP address is never sent as SNI, and is checked against the IP alternative names', () => {
  const { servername, checkServerIdentity } = verifyServerName('10.0.0.4');
  assert.equal(servername, undefined);
  assert.equal(checkServerIdentity('node1', cert({ subjectaltname: 'IP Address:10.0.0.4' })), undefined);
  assert.ok(checkServerIdentity('node1', cert({ subjectaltname: 'IP Address:10.0.0.5' })));
});
