// Installs the redirect, then verifies it every --sync-interval and repairs it
// in one transaction. Each repair is counted and logged.
import type { Logger } from '../log/logger.js';
import { flushBypassingFlows } from './conntrack.js';
import type { Redirect, RulesBackend } from './redirect.js';
import { messageOf } from '../errors/errors.js';

export class RulesKeeper {
  repairs = 0;
  installed = false;
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> | undefined;

  constructor(
    readonly backend: RulesBackend,
    private readonly redirect: Redirect,
    private readonly intervalMs: number,
    private readonly log: Logger,
  ) {}

  /** First install; throws if it cannot be done, since serving without the redirect is pointless. */
  async install(): Promise<void> {
    const result = await this.backend.ensure(this.redirect);
    const cut = await flushBypassingFlows(this.redirect, this.log);
    this.installed = true;
    this.log.info({ backend: this.backend.name, result, flowsCut: cut }, 'rules installed');
    this.timer = setInterval(() => void this.sync(), this.intervalMs);
  }

  /** One verify-and-repair pass; never throws (a failed pass is retried at the next tick). */
  sync(): Promise<void> {
    this.running ??= this.verify().finally(() => (this.running = undefined));
    return this.running;
  }

  private async verify(): Promise<void> {
    try {
      const result = await this.backend.ensure(this.redirect);
      if (result === 'unchanged') return;
      this.repairs += 1;
      const cut = await flushBypassingFlows(this.redirect, this.log);
      this.log.warn({ backend: this.backend.name, result, repairs: this.repairs, flowsCut: cut }, 'rules were changed externally; repaired');
    } catch (err) {
      this.log.error({ backend: this.backend.name, err: messageOf(err) }, 'rules verify/repair failed; retrying next interval');
    }
  }

  /** Stops verifying and repairing, leaving the rules as they are, for another nmi to keep; install() resumes. */
  async release(): Promise<void> {
    if (!this.timer) return; // released already (or never kept)
    clearInterval(this.timer);
    this.timer = undefined;
    await this.running;
    this.log.info({ backend: this.backend.name }, 'rules left to the nmi taking over');
  }

  /** Stops the loop; removes the rules unless keep is set. */
  async stop(remove: boolean): Promise<string[]> {
    clearInterval(this.timer);
    await this.running;
    if (!remove) {
      this.log.info({ backend: this.backend.name }, 'rules kept (--on-exit keep): pods fail closed until nmi returns');
      return [];
    }
    const removed = await this.backend.remove();
    this.installed = false;
    this.log.info({ backend: this.backend.name, removed }, 'rules removed');
    return removed;
  }
}
