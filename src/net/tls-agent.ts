// An undici Agent for the TLS material read just now. Certificates and keys
// rotate on disk; when the material changes the Agent is rebuilt, and the old
// one closes once its requests (a long watch, say) have finished.
import { createHash } from 'node:crypto';
import { Agent } from './undici.js';

export type TlsMaterial = Record<string, unknown>;

export class TlsAgent {
  #agent: Agent | undefined;
  /** A digest rather than the material itself: no second copy of a private key is kept. */
  #digest = '';

  constructor(private readonly build: (tls: TlsMaterial) => Agent) {}

  for(tls: TlsMaterial): Agent {
    const digest = createHash('sha256').update(JSON.stringify(tls)).digest('hex');
    if (this.#agent && digest === this.#digest) return this.#agent;
    void this.#agent?.close().catch(() => undefined);
    this.#agent = this.build(tls);
    this.#digest = digest;
    return this.#agent;
  }

  /** Ends the current agent: close() lets requests finish, destroy() cuts them. */
  async close(how: 'close' | 'destroy' = 'close'): Promise<void> {
    const agent = this.#agent;
    this.#agent = undefined;
    this.#digest = '';
    await agent?.[how]().catch(() => undefined);
  }
}
