// Restarts as a pod sees them (test/e2e/restart.test.ts, bench/restart.ts): a pod
// asking for its token every 5 ms on new connections while something happens to
// nmi, and the listening sockets as systemd's file descriptor store holds them.
import { setTimeout as sleep } from 'node:timers/promises';
import { addon } from '../../src/native/addon.js';
import type { PodAgent, SteadyResult } from './netns.js';

export const STEADY_URL = 'http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net';

/** The pod asks all along while `act` runs (starting 800 ms in); `sample` (the jumps installed, say) is read every 20 ms meanwhile. */
export async function steadyAcross(
  agent: PodAgent,
  sample: () => number,
  act: () => Promise<void>,
  durationMs = 5_000,
): Promise<SteadyResult & { samples: number[] }> {
  const steady = agent.steady(STEADY_URL, { durationMs, intervalMs: 5, headers: { Metadata: 'true' } });
  const seen = new Set<number>();
  let sampling = true;
  const sampler = (async () => {
    while (sampling) {
      seen.add(sample());
      await sleep(20);
    }
  })();
  await sleep(800);
  await act();
  const result = await steady;
  sampling = false;
  await sampler;
  return { ...result, samples: [...seen] };
}

/** Answers other than 200. */
export function failures(counts: Record<string, number>): number {
  return Object.entries(counts)
    .filter(([k]) => k !== '200')
    .reduce((n, [, v]) => n + v, 0);
}

/** Listening sockets held as systemd's store holds them between two nmi processes. */
export class HeldSockets {
  #held: { name: string; fd: number }[] = [];

  /** The token and probe listeners (made on first use). */
  get(nodeIp: string): { name: string; fd: number }[] {
    if (this.#held.length === 0) {
      const native = addon();
      this.#held = [
        { name: 'token', fd: native.listenTcp(nodeIp, 2579, 511) },
        { name: 'probe', fd: native.listenTcp('127.0.0.1', 8085, 511) },
      ];
    }
    return this.#held;
  }

  /** Closes them: the next nmi binds its own. */
  drop(): void {
    for (const { fd } of this.#held) addon().closeFd(fd);
    this.#held = [];
  }
}
