// --bindings <path>: a YAML/JSON file, or a folder of them (a mounted ConfigMap or
// Secret works: hidden `..data` entries are skipped, symlinks followed). Watched with
// fs.watch on the file's folder (so atomic renames are seen) and re-stat'ed on an
// interval as a fallback. A broken file keeps the last good set.
//
// Whoever may write the bindings decides which pod gets which identity: a file or
// folder another user can write (or owns) is refused, at start as a usage error, on
// a reload by keeping the last good set.
import { createHash } from 'node:crypto';
import { watch, type FSWatcher, type Stats } from 'node:fs';
import { lstat, readdir, readFile, realpath, stat } from 'node:fs/promises';
import path from 'node:path';
import { onReadOnlyMount } from '../util/mounts.js';
import { isRootOrSelf } from '../util/trusted-uid.js';
import { LineCounter, parseAllDocuments } from 'yaml';
import { codes, messageOf, NmiError, UsageError } from '../errors/errors.js';
import type { Logger } from '../log/logger.js';
import { parseObjects, type BindingSet } from './parse.js';
import type { BindingSource } from './source.js';

export interface FileSourceOptions {
  /** Re-stat interval, the fallback when fs.watch misses an event. */
  pollIntervalMs?: number;
  /** Quiet time after a watch event before reloading (editors write in bursts). */
  debounceMs?: number;
}

const defaults = {
  pollIntervalMs: 5_000, // 5 seconds
  debounceMs: 100, // 0.1 seconds
};

const EXTENSIONS = new Set(['.yaml', '.yml', '.json']);

export interface LoadedFiles {
  files: string[];
  /** Changes when any file's contents change. */
  digest: string;
  result: BindingSet & { errors: string[] };
}

/** The files a bindings path stands for, sorted; a folder is read one level deep. */
export async function listBindingFiles(root: string): Promise<string[]> {
  const info = await stat(root);
  if (!info.isDirectory()) return [root];
  const names = (await readdir(root)).filter((n) => !n.startsWith('.') && EXTENSIONS.has(path.extname(n).toLowerCase()));
  const files: string[] = [];
  for (const name of names.sort()) {
    const file = path.join(root, name);
    // stat follows symlinks: a ConfigMap's entries are links into ..data/.
    if ((await stat(file).catch(() => undefined))?.isFile()) files.push(file);
  }
  return files;
}

/** Why a file or folder's owner or mode lets someone other than root or this process change it; undefined when none. */
function modeProblem(what: string, info: Stats, ownUid: number): string | undefined {
  if (!isRootOrSelf(info.uid, ownUid)) return `${what} is owned by uid ${info.uid}, neither root nor nmi's uid ${ownUid}`;
  // A symbolic link's own mode is always 0777 and means nothing: its owner and its folder do. On a read-only
  // mount (a ConfigMap volume, whose folder the kubelet makes 0777) the kernel refuses every write whatever the mode.
  if (info.isSymbolicLink() || (info.mode & 0o022) === 0 || onReadOnlyMount(what)) return undefined;
  const who = [info.mode & 0o020 && 'its group', info.mode & 0o002 && 'others'].filter(Boolean).join(' and ');
  return `${what} is writable by ${who} (mode ${(info.mode & 0o7777).toString(8).padStart(4, '0')})`;
}

/**
 * Why the bindings at `root` may not be trusted, or undefined: the folder given, or the file given and its folder,
 * and every file read, each as named (a link's owner) and as followed, and the folder holding each, must be
 * root's (or nmi's own uid's) and writable by nobody else.
 */
export async function bindingsTrustProblem(root: string, ownUid = process.geteuid?.() ?? 0): Promise<string | undefined> {
  const checked = new Set<string>();
  const check = async (target: string, follow: boolean): Promise<string | undefined> => {
    const key = `${follow} ${target}`;
    if (checked.has(key)) return undefined;
    checked.add(key);
    return modeProblem(target, await (follow ? stat : lstat)(target), ownUid);
  };
  const files = await listBindingFiles(root);
  // A folder given is the files' folder: what holds it is the operator's choice, as for any other flag's path.
  const problem = files[0] === root ? undefined : ((await check(root, false)) ?? (await check(await realpath(root), true)));
  if (problem) return problem;
  for (const file of files) {
    const real = await realpath(file);
    const found = (await check(file, false)) ?? (await check(path.dirname(file), true)) ?? (await check(real, true)) ?? (await check(path.dirname(real), true));
    if (found) return found;
  }
  return undefined;
}

function parseDocuments(file: string, text: string): { docs: unknown[]; errors: string[] } {
  const lineCounter = new LineCounter();
  // prettyErrors off: the pretty form quotes the source line, which may hold a secret.
  const documents = parseAllDocuments(text, { prettyErrors: false, lineCounter });
  const errors: string[] = [];
  const docs: unknown[] = [];
  for (const doc of documents) {
    const first = doc.errors[0];
    if (first) {
      const { line, col } = lineCounter.linePos(first.pos[0]);
      errors.push(`${file}:${line}:${col}: ${first.message}`);
      continue;
    }
    try {
      docs.push(doc.toJS());
    } catch (err) {
      errors.push(`${file}: ${messageOf(err)}`);
    }
  }
  return { docs, errors };
}

const kinds = ['identities', 'bindings', 'exceptions', 'secrets'] as const;

/** Reads and parses every file under a bindings path; errors are collected, not thrown. */
export async function loadBindings(root: string): Promise<LoadedFiles> {
  const files = await listBindingFiles(root);
  const digest = createHash('sha256');
  const result: LoadedFiles['result'] = { identities: [], bindings: [], exceptions: [], secrets: [], errors: [] };
  const seen = new Map<string, string>();
  for (const file of files) {
    const text = await readFile(file, 'utf8');
    digest.update(file).update('\0').update(text).update('\0');
    const { docs, errors } = parseDocuments(file, text);
    const parsed = parseObjects(docs);
    result.errors.push(...errors, ...parsed.errors.map((e) => `${file}: ${e.message}`));
    for (const kind of kinds) {
      for (const item of parsed[kind]) {
        // parseObjects catches duplicates within a file; this catches them across files.
        const key = `${kind} ${item.namespace}/${item.name}`;
        const other = seen.get(key);
        if (other !== undefined) {
          result.errors.push(`${file}: ${key} is also defined in ${other}`);
          continue;
        }
        seen.set(key, file);
        (result[kind] as (typeof item)[]).push(item);
      }
    }
  }
  return { files, digest: digest.digest('hex'), result };
}

export class FileBindingSource implements BindingSource {
  readonly #root: string;
  readonly #log: Logger;
  readonly #options: Required<FileSourceOptions>;
  #onSet: ((set: BindingSet) => void) | undefined;
  #watcher: FSWatcher | undefined;
  #poll: NodeJS.Timeout | undefined;
  #debounce: NodeJS.Timeout | undefined;
  /** Digest of the contents last acted on (applied or found invalid), so each version is logged once. */
  #digest = '';
  #signature = '';
  #loading: Promise<void> | undefined;
  #again = false;
  #stopped = false;

  constructor(root: string, log: Logger, options: FileSourceOptions = {}) {
    this.#root = path.resolve(root);
    this.#log = log.child({ bindings: this.#root });
    this.#options = { ...defaults, ...options };
  }

  async start(onSet: (set: BindingSet) => void): Promise<void> {
    let untrusted: string | undefined;
    try {
      await stat(this.#root);
      untrusted = await bindingsTrustProblem(this.#root);
    } catch (err) {
      throw new NmiError(codes.BINDINGS, `--bindings ${this.#root}: ${messageOf(err)}`, { cause: err });
    }
    if (untrusted) throw new UsageError(`--bindings ${this.#root}: refused: ${untrusted}`);
    this.#onSet = onSet;
    this.#signature = await this.#stat();
    await this.#reload();
    this.#watch();
    this.#poll = setInterval(() => void this.#check(), this.#options.pollIntervalMs).unref();
  }

  stop(): void {
    this.#stopped = true;
    clearInterval(this.#poll);
    clearTimeout(this.#debounce);
    this.#watcher?.close();
    this.#watcher = undefined;
  }

  #watch(): void {
    // A file is watched through its folder: replacing it by rename gives it a new
    // inode, which a watch on the file itself would not follow.
    const isFolder = this.#signature.startsWith('dir');
    const dir = isFolder ? this.#root : path.dirname(this.#root);
    const base = path.basename(this.#root);
    try {
      this.#watcher = watch(dir, { persistent: false }, (_event, name) => {
        if (isFolder || name === null || name === base) this.#schedule();
      });
      this.#watcher.on('error', () => {
        // The folder itself went away: polling carries on and re-arms the watch.
        this.#watcher?.close();
        this.#watcher = undefined;
      });
    } catch (err) {
      this.#log.warn({ err: messageOf(err) }, 'cannot watch the bindings path, relying on polling');
    }
  }

  #schedule(): void {
    clearTimeout(this.#debounce);
    this.#debounce = setTimeout(() => void this.#reload(), this.#options.debounceMs).unref();
  }

  /** What the periodic check compares: entry names, inodes, sizes and mtimes. */
  async #stat(): Promise<string> {
    try {
      const info = await stat(this.#root);
      if (!info.isDirectory()) return `file ${info.ino} ${info.size} ${info.mtimeMs}`;
      const files = await listBindingFiles(this.#root);
      const parts = await Promise.all(
        files.map(async (f) => {
          const s = await stat(f).catch(() => undefined);
          return s ? `${f} ${s.ino} ${s.size} ${s.mtimeMs}` : f;
        }),
      );
      return `dir ${parts.join('|')}`;
    } catch {
      return 'missing';
    }
  }

  async #check(): Promise<void> {
    const signature = await this.#stat();
    if (!this.#watcher && signature !== 'missing') this.#watch();
    if (signature !== this.#signature) await this.#reload();
  }

  /** Serialised: a change arriving mid-load triggers one more load afterwards. */
  #reload(): Promise<void> {
    if (this.#loading) {
      this.#again = true;
      return this.#loading;
    }
    this.#loading = (async () => {
      do {
        this.#again = false;
        this.#signature = await this.#stat();
        await this.#loadOnce();
      } while (this.#again && !this.#stopped);
      this.#loading = undefined;
    })();
    return this.#loading;
  }

  async #loadOnce(): Promise<void> {
    let loaded: LoadedFiles;
    try {
      const untrusted = await bindingsTrustProblem(this.#root);
      if (untrusted) {
        // Once per reason: a poll every few seconds must not repeat it.
        if (this.#digest !== `untrusted ${untrusted}`) this.#log.warn({ code: codes.USAGE }, `bindings refused, keeping the last good set: ${untrusted}`);
        this.#digest = `untrusted ${untrusted}`;
        return;
      }
      loaded = await loadBindings(this.#root);
    } catch (err) {
      if (this.#digest !== 'unreadable') this.#log.warn({ err: messageOf(err) }, 'bindings unreadable, keeping the last good set');
      this.#digest = 'unreadable';
      return;
    }
    if (loaded.digest === this.#digest || this.#stopped) return;
    this.#digest = loaded.digest;
    const { errors, ...set } = loaded.result;
    if (errors.length > 0) {
      this.#log.warn({ errors: errors.length }, `bindings rejected, keeping the last good set: ${errors[0]}`);
      return;
    }
    this.#log.info(
      { files: loaded.files.length, identities: set.identities.length, bindings: set.bindings.length, exceptions: set.exceptions.length, secrets: set.secrets.length },
      'bindings loaded',
    );
    this.#onSet?.(set);
  }
}
