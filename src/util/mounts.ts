// Where the kernel's filesystems are mounted, as this process sees them.
import { readFileSync } from 'node:fs';
import path from 'node:path';

/** Mount points of a filesystem type, from /proc/self/mounts. */
export function mountsOfType(type: string): string[] {
  return readFileSync('/proc/self/mounts', 'utf8')
    .split('\n')
    .map((line) => line.split(' '))
    .filter((fields) => fields[2] === type)
    .map((fields) => fields[1] ?? '');
}

/** `folder` relative to `parent` when it is `parent` or under it, else undefined. */
export function within(parent: string, folder: string): string | undefined {
  const relative = path.relative(parent, folder);
  return relative === '..' || relative.startsWith('../') || path.isAbsolute(relative) ? undefined : relative;
}

/** Whether the kernel refuses every write under this (resolved) path: the mount holding it is read-only. */
export function onReadOnlyMount(resolved: string): boolean {
  let best: { point: string; readOnly: boolean } | undefined;
  for (const line of readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    // mount ID, parent ID, major:minor, root, mount point, mount options, ...
    const fields = line.split(' ');
    const point = (fields[4] ?? '').replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8)));
    if (!point || within(point, resolved) === undefined) continue;
    // The last mount over a path wins: mountinfo lists mounts in the order they were made.
    if (!best || point.length >= best.point.length) best = { point, readOnly: (fields[5] ?? '').split(',').includes('ro') };
  }
  return best?.readOnly ?? false;
}
