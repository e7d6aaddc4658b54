// The audit stream: records written, failed (a full disk, a read-only file) and dropped (a bound reached).
import type { Registry } from 'prom-client';
import { exposeCounts } from '../metrics/registry.js';
import { auditResults, type AuditStream } from './stream.js';

export function registerAuditMetrics(registry: Registry, stream: AuditStream): void {
  exposeCounts(registry, 'nmi_audit_records_total', 'Audit records (--audit-log): written, failed (the file refused them: a full disk, a read-only or unwritable file), and answers or refusals dropped (a bound of the audit kept them out of any record)', 'result', auditResults, () => stream.counts);
}
