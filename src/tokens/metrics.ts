// The token cache's counters as Prometheus metrics, read at scrape time.
import { Counter, Gauge, type Registry } from 'prom-client';
import type { TokenCache, TokenCacheStats } from './token-cache.js';

export function registerTokenMetrics(registry: Registry, cache: TokenCache): void {
  const registers = [registry];
  new Gauge({
    name: 'nmi_tokens_cached',
    help: 'Tokens held in memory (one per identity and resource).',
    registers,
    collect() {
      this.set(cache.size);
    },
  });
  counter(registers, 'nmi_token_cache_requests_total', 'Token requests answered from memory (hit), with a lasting failure remembered for the key (refusal), or neither (miss).', 'result', (s) => ({ hit: s.hits, miss: s.misses, refusal: s.rememberedHits }));
  new Counter({
    name: 'nmi_token_refreshes_total',
    help: 'Background refreshes of tokens near the end of their life.',
    registers,
    collect() {
      this.reset();
      this.inc(cache.stats().refreshes);
    },
  });
  counter(registers, 'nmi_upstream_requests_total', 'Token requests sent to the issuer, by issuer.', 'kind', (s) => s.upstreamRequests);
  counter(registers, 'nmi_upstream_errors_total', 'Failed token requests to the issuer, by kind of failure.', 'kind', (s) => s.upstreamErrors);

  function counter(regs: Registry[], name: string, help: string, label: string, values: (stats: TokenCacheStats) => Record<string, number>): void {
    new Counter({
      name,
      help,
      labelNames: [label],
      registers: regs,
      collect() {
        this.reset();
        for (const [value, count] of Object.entries(values(cache.stats()))) this.inc({ [label]: value }, count);
      },
    });
  }
}
