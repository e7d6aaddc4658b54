// src/ has no import circles, type-only imports included, between files or
// between folders, and no folder reaches one the architecture says it never may:
// a reader follows request → caller → identity → token → answer without going
// back and forth.
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

/**
 * The folders from the bottom up: each imports only folders before it. A new folder must be placed here,
 * which is where its reader learns what it may lean on.
 */
const layers = [
  ['errors', 'log', 'metrics', 'util', 'net'],
  ['native'],
  ['systemd', 'netns'],
  ['kubelet'],
  ['kube'],
  ['config'],
  ['bindings', 'attest', 'budget'],
  ['tokens'],
  ['server'],
  ['audit'],
  ['explain', 'probe', 'rules'],
  ['events'],
  ['lifecycle', 'demo'],
  ['cli'],
];

/** What must never be, whatever the layers allow, and why. */
const never: [from: string, to: string, why: string][] = [
  ['tokens', 'server', 'how a pod gets a token answers no HTTP: the servers ask the token rules, never the reverse'],
  ['bindings', 'tokens', 'which identity a pod has never depends on what is cached'],
  ['kubelet', 'bindings', 'finding the caller knows nothing of identities'],
  ['config', 'lifecycle', 'flags are read before anything runs'],
  ['server', 'explain', 'the request path reports refusals through its own types (server/refusal.ts); explaining them is for later'],
  ['server', 'lifecycle', 'the servers are wired by the daemon, never the reverse'],
  ['lifecycle', 'demo', 'the daemon never runs a stand-in'],
  ['native', 'config', "the addon's surface takes its values from TypeScript at the call, not from the flags"],
];

/** Each folder's imports of other folders, with one file that makes each. */
function folderGraph(root: string): Map<string, Map<string, string>> {
  const folders = new Map<string, Map<string, string>>();
  const folderOf = (file: string) => path.relative(root, file).split(path.sep)[0]!;
  for (const [file, targets] of importGraph(root)) {
    const from = folderOf(file);
    const edges = folders.get(from) ?? new Map<string, string>();
    folders.set(from, edges);
    for (const target of targets) {
      const to = folderOf(target);
      if (to !== from && !edges.has(to)) edges.set(to, path.relative(root, file));
    }
  }
  return folders;
}

/** Every import against the layers or a never rule, as "from → to (file): why". */
function broken(graph: Map<string, Map<string, string>>): string[] {
  const layer = new Map(layers.flatMap((names, i) => names.map((name) => [name, i] as const)));
  const found: string[] = [];
  for (const [from, edges] of graph) {
    if (!layer.has(from)) found.push(`${from}: a folder no layer names`);
    for (const [to, file] of edges) {
      const rule = never.find(([a, b]) => a === from && b === to);
      if (rule) found.push(`${from} → ${to} (${file}): never: ${rule[2]}`);
      else if ((layer.get(to) ?? -1) >= (layer.get(from) ?? Infinity)) found.push(`${from} → ${to} (${file}): ${to} is not below ${from}`);
    }
  }
  return found;
}

test('src/ folders import one way: down the layers, never where the architecture says never', () => {
  const root = path.join(projectRoot, 'src');
  const graph = folderGraph(root);
  assert.deepEqual(broken(graph), []);
  const cyclic = cycles(new Map([...graph].map(([from, edges]) => [from, [...edges.keys()]])));
  assert.deepEqual(cyclic, []);
});

test('the folder check finds an import up the layers, a never rule broken, and a folder no layer names', () => {
  const graph = new Map([
    ['util', new Map([['server', 'util/x.ts']])],
    ['tokens', new Map([['server', 'tokens/y.ts'], ['errors', 'tokens/z.ts']])],
    ['gadgets', new Map()],
  ]);
  assert.deepEqual(broken(graph), [
    'util → server (util/x.ts): server is not below util',
    'tokens → server (tokens/y.ts): never: how a pod gets a token answers no HTTP: the servers ask the token rules, never the reverse',
    'gadgets: a folder no layer names',
  ]);
});
