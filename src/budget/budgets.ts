// The node's budgets, one per upstream: IMDS's identity endpoint, IMDS's other
// categories (a general limit of their own), and each Entra ID tenant service
// principals sign in to. Throttles of pods over their bounds are counted here.
import { throttleReasons, UpstreamBudget, type BudgetLimits, type ThrottleReason, type TicketKind } from './budget.js';

/** Bounded on purpose: it labels metrics (tenants are summed under `entra`). */
export type UpstreamName = 'imds' | 'imds-metadata' | 'entra';
export const upstreams: readonly UpstreamName[] = ['imds', 'imds-metadata', 'entra'];

export interface BudgetsConfig {
  imds: BudgetLimits;
  imdsMetadata: BudgetLimits;
  /** Per tenant. */
  entra: BudgetLimits;
  /** Calls one pod may have queued toward one upstream. */
  maxPendingPerPod: number;
  /** A first token that cannot start within this is throttled. */
  maxWaitMs: number;
  onWait?: (upstream: UpstreamName, seconds: number, kind: TicketKind) => void;
}

export class Budgets {
  readonly imds: UpstreamBudget;
  readonly metadata: UpstreamBudget;
  private readonly tenants = new Map<string, UpstreamBudget>();
  private readonly config: BudgetsConfig;
  private readonly throttleCounts = Object.fromEntries(throttleReasons.map((reason) => [reason, 0])) as Record<ThrottleReason, number>;

  constructor(config: BudgetsConfig) {
    this.config = config;
    this.imds = this.make('imds', 'IMDS', config.imds);
    this.metadata = this.make('imds-metadata', 'IMDS metadata', config.imdsMetadata);
  }

  /** The budget of one Entra ID tenant, by authority (host and tenant, as the token endpoint is addressed). */
  entra(authority: string): UpstreamBudget {
    const key = authority.toLowerCase();
    let budget = this.tenants.get(key);
    if (!budget) this.tenants.set(key, (budget = this.make('entra', `Entra ID ${authority}`, this.config.entra)));
    return budget;
  }

  /** Every budget with the upstream it counts toward. */
  *all(): Iterable<[UpstreamName, UpstreamBudget]> {
    yield ['imds', this.imds];
    yield ['imds-metadata', this.metadata];
    for (const budget of this.tenants.values()) yield ['entra', budget];
  }

  /** The limits each budget of the upstream has. */
  limits(upstream: UpstreamName): BudgetLimits {
    return upstream === 'imds' ? this.config.imds : upstream === 'imds-metadata' ? this.config.imdsMetadata : this.config.entra;
  }

  throttled(reason: ThrottleReason): void {
    this.throttleCounts[reason]++;
  }

  throttles(): Record<ThrottleReason, number> {
    return { ...this.throttleCounts };
  }

  private make(upstream: UpstreamName, name: string, limits: BudgetLimits): UpstreamBudget {
    const { onWait, maxPendingPerPod, maxWaitMs } = this.config;
    return new UpstreamBudget(name, limits, {
      maxQueuedPerPod: maxPendingPerPod,
      maxWaitMs,
      onWait: onWait && ((seconds, kind) => onWait(upstream, seconds, kind)),
      onThrottled: (reason) => this.throttled(reason),
    });
  }
}
