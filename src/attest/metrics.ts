// Attestation refusals as a Prometheus counter: a spoof attempt is an alert.
import type { Registry } from 'prom-client';
import { exposeCounts } from '../metrics/registry.js';
import { refusals, type CgroupAttestation } from './attestation.js';
import { hostRefusals, type HostCallers } from './host-callers.js';

export function registerAttestationMetrics(registry: Registry, attestation: CgroupAttestation): void {
  exposeCounts(
    registry,
    'nmi_caller_refusals_total',
    'Token requests refused by cgroup attestation (--rules ebpf): spoof = the socket belongs to another pod than the source address, unattested = no pod cgroup made the connection',
    'reason',
    refusals,
    () => attestation.refused,
  );
}

export function registerHostCallerMetrics(registry: Registry, callers: HostCallers): void {
  exposeCounts(
    registry,
    'nmi_host_token_refusals_total',
    'Connections to --host-token-address refused: unattested = the kernel could not name the socket\'s cgroup, unknown-pod = a pod cgroup the kubelet does not list, not-allowed = no --host-token-allow entry matches',
    'reason',
    hostRefusals,
    () => callers.refused,
  );
}
