// The daemon's side of `nmi explain` (the probe server's /explain): what it is
// asked about, `<namespace>/<pod>` or a pod's address, and the answer.
import net from 'node:net';
import { isNmiError, codes, UsageError } from '../errors/errors.js';
import { isDnsLabel, isDnsSubdomain } from '../kube/names.js';
import { explain, type ExplainDeps, type ExplainQuery } from './explain.js';

/** Throws UsageError saying what is wrong with the name. */
export function parseExplainTarget(raw: string): ExplainQuery {
  if (net.isIP(raw)) return { address: raw };
  const parts = raw.split('/');
  if (parts.length !== 2) throw new UsageError(`"${raw}" is neither <namespace>/<pod> nor a pod's IP address`);
  const [namespace = '', name = ''] = parts;
  if (!isDnsLabel(namespace)) throw new UsageError(`"${namespace}" is not a namespace name (lower-case letters, digits and '-', at most 63)`);
  if (!isDnsSubdomain(name)) throw new UsageError(`"${name}" is not a pod name (lower-case letters, digits, '-' and '.', at most 253)`);
  return { namespace, name };
}

/** /explain?pod=...: 200 with the explanation, 404 with it when the kubelet does not list the pod, 400 for a bad name. */
export function explainHandler(deps: ExplainDeps): (target: string) => Promise<{ status: number; body: object }> {
  return async (target) => {
    let query: ExplainQuery;
    try {
      query = parseExplainTarget(target);
    } catch (err) {
      if (isNmiError(err, codes.USAGE)) return { status: 400, body: { error: err.message } };
      throw err;
    }
    const explanation = await explain(query, deps);
    return { status: explanation.pod ? 200 : 404, body: explanation };
  };
}
