// `nmi demo` as a newcomer runs it: exit 0, and the host exactly as it was,
// also after a run killed halfway and one interrupted with Ctrl-C.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { once } from 'node:events';
import { readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { nmiBin } from '../harness/netns.js';
import { nmi } from '../harness/nmi-process.js';
import { waitFor } from '../harness/wait-for.js';

function hostState(): string {
  const run = (cmd: string, args: string[]) => {
    try {
      return execFileSync(cmd, args, { encoding: 'utf8' });
    } catch (err) {
      return `error: ${(err as Error).message}`;
    }
  };
  const strip = (text: string) =>
    text
      .split('\n')
      .filter((l) => !l.startsWith('#'))
      .map((l) => l.replace(/\[\d+:\d+\]/g, ''))
      .join('\n');
  const demoNs = run('ip', ['netns', 'list'])
    .split('\n')
    .filter((l) => l.startsWith('nmi-demo'))
    .join('\n');
  const demoFolders = readdirSync(tmpdir()).filter((name) => name.startsWith('nmi-demo')).join('\n');
  return [demoNs, demoFolders, strip(run('iptables-save', [])), run('nft', ['list', 'ruleset']), run('ip', ['-4', 'addr']), run('ip', ['route'])].join('\n----\n');
}

/** Runs the demo until its output shows `marker`, then sends `signal`. */
async function interruptAt(marker: RegExp, signal: NodeJS.Signals): Promise<{ code: number | null; output: string }> {
  const child = spawn(process.execPath, [nmiBin, 'demo'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout.on('data', (d: Buffer) => (output += d.toString()));
  child.stderr.on('data', (d: Buffer) => (output += d.toString()));
  const exited = once(child, 'exit');
  await waitFor(`demo output ${marker}`, () => marker.test(output) || undefined, 60_000);
  child.kill(signal);
  const [code] = (await exited) as [number | null];
  return { code, output };
}

test('nmi demo fetches a token through 169.254.169.254 and leaves the host as it was', () => {
  const before = hostState();
  const r = nmi(['demo']);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /answer 200: .*"access_token": "[^"]*redacted/);
  assert.match(r.stdout, /unchanged: a cache hit/);
  // The second pod's token came through Workload ID federation: its own service account's token, exchanged once.
  assert.match(r.stdout, /a token of app \S+ for system:serviceaccount:default:federated-sa; token requests at the API server: 1, exchanges at Entra ID: 1/);
  assert.doesNotMatch(r.stdout, /demo-signature/, 'the token itself is never printed');
  assert.equal(hostState(), before);
});

test('nmi demo killed halfway, then run again: the second run succeeds and cleans up both', async () => {
  const before = hostState();
  const killed = await interruptAt(/^\[4\]/m, 'SIGKILL');
  assert.equal(killed.code, null);
  const r = nmi(['demo']);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.equal(hostState(), before);
});

test('nmi demo interrupted with Ctrl-C removes what it made', async () => {
  const before = hostState();
  const interrupted = await interruptAt(/^\[3\]/m, 'SIGINT');
  assert.match(interrupted.output, /interrupted: cleaning up/);
  assert.equal(interrupted.code, 130);
  assert.equal(hostState(), before);
});
