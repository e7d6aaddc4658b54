// Where the kernel's filesystems are mounted, as this process sees them.
import { readFileSync } from 'node:fs';

/** Mount points of a filesystem type, from /proc/self/mounts. */
export function mountsOfType(type: string): string[] {
  return readFileSync('/proc/self/mounts', 'utf8')
    .split('\n')
    .map((line) => line.split(' '))
    .filter((fields) => fields[2] === type)
    .map((fields) => fields[1] ?? '');
}
