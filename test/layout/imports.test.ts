// src/ has no import circles, type-only imports included: a reader follows
// request → caller → identity → token → answer without going back and forth.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { filesUnder } from '../harness/files.js';
import { projectRoot } from '../harness/netns.js';

const sources = (dir: string) => filesUnder(dir, (name) => name.endsWith('.ts'));

/** Each file's relative imports and re-exports, as files. */
function importGraph(root: string): Map<string, string[]> {
  const files = sources(root);
  const known = new Set(files);
  return new Map(
    files.map((file) => {
      const specifiers = [...readFileSync(file, 'utf8').matchAll(/^(?:import|export)\b[^;]*?\bfrom\s+'(\.[^']+)'/gm)].map((m) => m[1]!);
      const targets = specifiers.map((s) => path.join(path.dirname(file), s.replace(/\.js$/, '.ts'))).filter((t) => known.has(t));
      return [file, targets];
    }),
  );
}

/** Every cycle found by a depth-first walk, each as the files around it. */
function cycles(graph: Map<string, string[]>): string[][] {
  const found: string[][] = [];
  const stack: string[] = [];
  const done = new Set<string>();
  const visit = (file: string): void => {
    stack.push(file);
    for (const next of graph.get(file) ?? []) {
      const at = stack.indexOf(next);
      if (at >= 0) found.push([...stack.slice(at), next]);
      else if (!done.has(next)) visit(next);
    }
    stack.pop();
    done.add(file);
  };
  for (const file of graph.keys()) if (!done.has(file)) visit(file);
  return found;
}

test('src/ has no import circles', () => {
  const root = path.join(projectRoot, 'src');
  const found = cycles(importGraph(root)).map((cycle) => cycle.map((f) => path.relative(root, f)).join(' → '));
  assert.deepEqual(found, []);
});

test('the check finds a circle, a type-only one too', () => {
  const graph = new Map([
    ['a.ts', ['b.ts']],
    ['b.ts', ['c.ts']],
    ['c.ts', ['a.ts']],
    ['d.ts', ['a.ts']],
  ]);
  assert.deepEqual(cycles(graph), [['a.ts', 'b.ts', 'c.ts', 'a.ts']]);
  assert.deepEqual(cycles(new Map([['a.ts', ['b.ts']], ['b.ts', []]])), []);
});
