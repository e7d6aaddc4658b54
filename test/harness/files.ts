import { readdirSync, statSync } from 'node:fs';
import path from 'node:path';

/** Every file under `dir`, at any depth, whose name `accept` takes; as paths joined onto `dir`. */
export function filesUnder(dir: string, accept: (name: string) => boolean): string[] {
  return readdirSync(dir).flatMap((name) => {
    const full = path.join(dir, name);
    if (statSync(full).isDirectory()) return filesUnder(full, accept);
    return accept(name) ? [full] : [];
  });
}
