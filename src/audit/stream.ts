// The audit stream's sink: JSON lines written with write(2) before the answer they
// record goes out, made durable with fdatasync at most syncMs later (one call for
// every record of that time, not one per record), the file rotated by size
// (path.1 newest to path.N, the oldest dropped). `-` is standard output, for
// journald or the container runtime to keep and rotate. A record that cannot be
// written (a full disk, a read-only or unwritable file) is counted and logged once
// until writing works again: never thrown, so auditing never stops nmi serving.
import { closeSync, fdatasyncSync, fstatSync, openSync, renameSync, rmSync, writeSync } from 'node:fs';
import { messageOf } from '../errors/errors.js';
import type { Logger } from '../log/logger.js';

/** Records written, records failed (the file refused them), and answers or refusals dropped (a bound of audit.ts kept them out of any record). */
export const auditResults = ['written', 'failed', 'dropped'] as const;
export type AuditResult = (typeof auditResults)[number];

export interface AuditStreamOptions {
  /** A file, or `-` for standard output. */
  path: string;
  /** A file is rotated before a record would take it past this many bytes. */
  maxBytes: number;
  /** Rotated files kept, path.1 to path.N. */
  keep: number;
  log: Logger;
  /** The longest a written record waits for fdatasync [1 s]. */
  syncMs?: number;
  /** How long after a failed open the file is tried again [1 s]; records meanwhile count as failed. */
  reopenMs?: number;
}

export class AuditStream {
  readonly counts: Record<AuditResult, number> = { written: 0, failed: 0, dropped: 0 };
  readonly #options: Required<AuditStreamOptions>;
  #fd: number | undefined;
  #size = 0;
  /** Only regular files are rotated: never /dev/full or a pipe someone named. */
  #regular = false;
  #syncTimer: NodeJS.Timeout | undefined;
  #failing = false;
  #openAfter = 0;
  /** A write failed part way: the next record starts on a line of its own. */
  #torn = false;

  constructor(options: AuditStreamOptions) {
    this.#options = { syncMs: 1_000, reopenMs: 1_000, ...options };
    // A closed pipe (EPIPE) is also an 'error' event on stdout, which would end the process unheard; each write's callback counts it.
    if (this.toStdout) process.stdout.on('error', () => {});
  }

  get toStdout(): boolean {
    return this.#options.path === '-';
  }

  write(record: object): void {
    const line = `${JSON.stringify(record)}\n`;
    if (this.toStdout) {
      process.stdout.write(line, (err) => (err ? this.#failed(err) : this.#written()));
      return;
    }
    try {
      this.#open();
      const bytes = Buffer.from(this.#torn ? `\n${line}` : line);
      if (this.#regular && this.#size > 0 && this.#size + bytes.length > this.#options.maxBytes) this.#rotate();
      this.#writeAll(bytes);
      this.#torn = false;
      this.#written();
      this.#scheduleSync();
    } catch (err) {
      this.#failed(err);
    }
  }

  /** Counts answers or refusals a bound kept out of any record. */
  dropped(n = 1): void {
    this.counts.dropped += n;
  }

  /** Syncs and closes the file; a later write opens it again. */
  close(): void {
    clearTimeout(this.#syncTimer);
    this.#syncTimer = undefined;
    if (this.#fd === undefined) return;
    this.#sync();
    closeSync(this.#fd);
    this.#fd = undefined;
  }

  #open(): number {
    if (this.#fd !== undefined) return this.#fd;
    if (Date.now() < this.#openAfter) throw new Error('not open: the last attempt failed');
    try {
      this.#fd = openSync(this.#options.path, 'a', 0o600);
    } catch (err) {
      this.#openAfter = Date.now() + this.#options.reopenMs;
      throw err;
    }
    const stat = fstatSync(this.#fd);
    this.#regular = stat.isFile();
    this.#size = stat.size;
    return this.#fd;
  }

  #writeAll(bytes: Buffer): void {
    let at = 0;
    try {
      while (at < bytes.length) at += writeSync(this.#fd!, bytes, at);
    } finally {
      this.#size += at;
      if (at > 0 && at < bytes.length) this.#torn = true;
    }
  }

  #rotate(): void {
    const { path, keep } = this.#options;
    this.close();
    rmSync(`${path}.${keep}`, { force: true });
    for (let i = keep - 1; i >= 1; i--) renameIfThere(`${path}.${i}`, `${path}.${i + 1}`);
    renameSync(path, `${path}.1`);
    this.#open();
  }

  #scheduleSync(): void {
    if (this.#syncTimer) return;
    this.#syncTimer = setTimeout(() => {
      this.#syncTimer = undefined;
      this.#sync();
    }, this.#options.syncMs);
    this.#syncTimer.unref();
  }

  #sync(): void {
    if (this.#fd === undefined || !this.#regular) return;
    try {
      fdatasyncSync(this.#fd);
    } catch (err) {
      // The records are written, not yet durable: said, not counted as lost.
      this.#options.log.warn({ path: this.#options.path, err: messageOf(err) }, 'audit stream: fdatasync failed');
    }
  }

  #written(): void {
    this.counts.written++;
    if (!this.#failing) return;
    this.#failing = false;
    this.#options.log.info({ path: this.#options.path }, 'audit stream: writing again');
  }

  #failed(err: unknown): void {
    this.counts.failed++;
    if (this.#failing) return;
    this.#failing = true;
    this.#options.log.error(
      { path: this.#options.path, err: messageOf(err) },
      'audit stream: cannot write records (counted in nmi_audit_records_total{result="failed"}); nmi serves on',
    );
  }
}

function renameIfThere(from: string, to: string): void {
  try {
    renameSync(from, to);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
}
