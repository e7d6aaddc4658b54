// `nmi explain <namespace>/<pod>|<pod IP>`: asks the daemon on the probe
// address (loopback: /explain answers nothing else) and prints its answer.
import { parseExplainTarget } from '../explain/endpoint.js';
import type { Explanation } from '../explain/explain.js';
import type { HostPort } from '../config/values.js';
import { request } from '../net/undici.js';
import { probeUrl } from '../probe/probe-server.js';
import { messageOf } from '../errors/errors.js';

/** A wildcard probe address is reached on loopback, where /explain answers. */
function loopbackOf(address: HostPort): HostPort {
  if (address.host === '0.0.0.0') return { ...address, host: '127.0.0.1' };
  if (address.host === '::') return { ...address, host: '::1' };
  return address;
}

export async function explainCommand(options: { json: boolean; probeAddress: HostPort; target: string }): Promise<number> {
  const query = parseExplainTarget(options.target);
  const url = probeUrl(loopbackOf(options.probeAddress), `/explain?pod=${encodeURIComponent(options.target)}`);
  let status: number;
  let body: unknown;
  try {
    const res = await request(url, { headersTimeout: 5000, bodyTimeout: 5000 });
    status = res.statusCode;
    body = await res.body.json();
  } catch (err) {
    process.stderr.write(`nmi explain: no nmi daemon answers on ${probeUrl(options.probeAddress, '')} (${messageOf(err)}); is it running, and is --probe-address its address?\n`);
    return 1;
  }
  if (status !== 200 && status !== 404) {
    const error = (body as { error?: string }).error ?? `HTTP ${status}`;
    const hint = status === 403 && (body as { reason?: string }).reason !== 'not-root' ? ` (--probe-address ${options.probeAddress.host} is not a loopback address)` : '';
    process.stderr.write(`nmi explain: the daemon answered ${status}: ${error}${hint}\n`);
    return 1;
  }
  const explanation = body as Explanation;
  if (options.json) process.stdout.write(`${JSON.stringify(explanation, null, 2)}\n`);
  else process.stdout.write(render(explanation, 'address' in query));
  return status === 200 ? 0 : 1;
}

function render(e: Explanation, byAddress: boolean): string {
  const out: string[] = [];
  const line = (text = '') => out.push(text);
  const pod = e.pod;
  if (!pod) {
    line(`${byAddress ? 'address' : 'pod'} ${e.query}: ${e.verdict}`);
    for (const r of e.refusals) line(`  refused ${r.count}x between ${r.firstAt} and ${r.lastAt}: ${r.status} ${r.error_description}`);
    return `${out.join('\n')}\n`;
  }
  const age = pod.ageSeconds === undefined ? '' : `, age ${duration(pod.ageSeconds)}`;
  line(`pod ${pod.namespace}/${pod.name} (uid ${pod.uid || 'unknown'}): ${pod.phase || 'unknown phase'}, ${pod.addresses.join(', ') || 'no address'}${pod.hostNetwork ? ', hostNetwork' : ''}${age}`);
  line(`  labels: ${Object.entries(pod.labels).map(([k, v]) => `${k}=${v}`).join(', ') || 'none'}`);
  line(`  service account: ${pod.serviceAccount}`);
  line(`  caller: ${pod.caller ? 'yes, requests from its address are its own' : `no, ${pod.notCaller}`}`);
  line(`bindings in reach (from ${e.bindingsFrom}):`);
  if (e.bindings.length === 0) line(`  none in namespace ${pod.namespace} or with its selector`);
  for (const b of e.bindings) line(`  ${b.matches ? 'match' : 'no   '} ${b.binding} -> ${b.identity}: ${b.reason}`);
  if (e.exceptions.length > 0) {
    line(`exceptions in ${pod.namespace}:`);
    for (const x of e.exceptions) line(`  ${x.matches ? 'match' : 'no   '} ${x.exception}: ${x.reason}`);
  }
  line(`workload identity convention: ${e.workloadIdentity.used ? 'used' : 'not used'}, ${e.workloadIdentity.reason}`);
  line('identities served:');
  if (e.identities.length === 0) line('  none');
  for (const i of e.identities) {
    const ids = [`clientID ${i.clientID || '-'}`, i.resourceID && `resourceID ${i.resourceID}`, i.tenantID && `tenant ${i.tenantID}`, i.serviceAccount && `as service account ${i.serviceAccount}`]
      .filter(Boolean)
      .join(', ');
    line(`  ${i.identity}: ${i.type}, ${ids}${i.usable ? '' : `; UNUSABLE: ${i.problem}`}`);
  }
  line(`a request naming no identity: ${e.withoutId.answer}`);
  if (e.tokens.length > 0) {
    line('tokens cached:');
    for (const t of e.tokens) {
      const times = [t.expiresOn && `expires ${t.expiresOn}`, t.refreshAt && `refresh from ${t.refreshAt}`].filter(Boolean).join(', ');
      line(`  ${t.identity} ${t.resource}: ${t.state}${times ? `, ${times}` : ''}${t.heldByCaller ? '' : ' (asked for by other pods)'}`);
    }
  }
  if (e.served && e.served.length > 0) {
    line('tokens served lately (audit, by uti; newest first):');
    for (const t of e.served) line(`  ${t.servedAt} ${t.identity} ${t.resource}: uti ${t.tokenId || '-'}, oid ${t.objectId || '-'}, from ${t.source}, expires ${t.expiresOn}`);
  }
  if (e.refusals.length > 0) {
    line('refused lately (most recent last):');
    for (const r of e.refusals) {
      const about = [r.identity && `identity ${r.identity}`, r.resource && `resource ${r.resource}`].filter(Boolean).join(', ');
      line(`  ${r.lastAt} ${r.kind}, ${r.count}x since ${r.firstAt}: ${r.status} ${r.error}: ${r.error_description}${about ? ` (${about})` : ''}${r.cause ? `; ${r.cause}` : ''}`);
    }
  }
  line(`verdict: ${e.verdict}`);
  return `${out.join('\n')}\n`;
}

function duration(seconds: number): string {
  if (seconds < 120) return `${seconds}s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)}m`;
  if (seconds < 172800) return `${Math.round(seconds / 3600)}h`;
  return `${Math.round(seconds / 86400)}d`;
}
