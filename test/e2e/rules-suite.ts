// The foundation's end-to-end checks, run once per rule flavour: real rules in a
// node namespace, a pod namespace connecting to 169.254.169.254:80.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, symlinkSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { comparableRules, createNode, type NodeNs, type PodAgent } from '../harness/netns.js';
import { nmi, startNmi, type NmiProcess } from '../harness/nmi-process.js';
import { waitFor } from '../harness/wait-for.js';

export type Flavour = 'iptables-nft' | 'iptables-legacy' | 'nftables';

const METADATA = '169.254.169.254';
/** What nmi's token server answers the pod agent's probe request with. */
const NMI = 'HTTP/1.1 404 Not Found';

/** A PATH whose `iptables*` are the wanted flavour, as update-alternatives would set it, in `dir`. */
function pathFor(flavour: Flavour, dir: string): string {
  const variant = flavour === 'iptables-legacy' ? 'legacy' : 'nft';
  for (const tool of ['iptables', 'iptables-save', 'iptables-restore']) {
    symlinkSync(`/usr/sbin/${tool.replace('iptables', `iptables-${variant}`)}`, path.join(dir, tool));
  }
  return `${dir}:${process.env.PATH}`;
}

// A flow cut by the redirect leaves its server side open: after() destroys them all.
const sockets = new Set<net.Socket>();

/** A line server (the real IMDS's stand-in): greets with `name`, echoes lines back prefixed with it. */
async function lineServer(host: string, port: number, name: string): Promise<net.Server> {
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => {});
    socket.write(`${name}\n`);
    socket.on('data', (d) => socket.write(`${name}:${d.toString().trim()}\n`));
  });
  server.listen(port, host);
  await new Promise((resolve) => server.once('listening', resolve));
  return server;
}

export function rulesSuite(flavour: Flavour): void {
  let node: NodeNs;
  let agent: PodAgent;
  const servers: net.Server[] = [];
  const binDir = mkdtempSync(path.join(tmpdir(), 'nmi-bin-'));
  const env = { ...process.env, PATH: pathFor(flavour, binDir) };
  const rulesFlag = flavour === 'nftables' ? 'nftables' : 'iptables';
  const saveNat = () => comparableRules(node.exec('env', [`PATH=${env.PATH}`, 'iptables-save', '-t', 'nat']));
  const ipt = (args: string[]) => node.exec('env', [`PATH=${env.PATH}`, 'iptables', ...args]);
  const nftTable = () => {
    try {
      return node.exec('nft', ['list', 'table', 'ip', 'aad-metadata']);
    } catch {
      return '';
    }
  };
  // No kubelet listening is a node with no pods yet; no bindings either: the rules are what is under test.
  const bindings = mkdtempSync(path.join(tmpdir(), 'nmi-bindings-'));
  const start = (extra: string[] = []) =>
    startNmi(
      ['--node-ip', node.nodeIp, '--rules', rulesFlag, '--sync-interval', '100ms', '--server', 'js', '--kubelet-url', 'https://127.0.0.1:1', '--bindings', bindings, ...extra],
      { env },
    );
  let running: NmiProcess | undefined;

  before(async () => {
    node = createNode();
    node.exec('ip', ['addr', 'add', `${METADATA}/32`, 'dev', 'lo']);
    // What a pod would reach without the redirect, and the plain listener standing in for nmi's server.
    servers.push(await lineServer(METADATA, 80, 'imds'));
    node.addPod();
    agent = await node.pods[0]!.agent();
    // A stand-in kube-proxy: its chain and jump must survive everything nmi does.
    ipt(['-t', 'nat', '-N', 'KUBE-SERVICES']);
    ipt(['-t', 'nat', '-A', 'KUBE-SERVICES', '-d', '10.0.0.1/32', '-p', 'tcp', '--dport', '443', '-j', 'RETURN']);
    ipt(['-t', 'nat', '-A', 'PREROUTING', '-j', 'KUBE-SERVICES']);
  });

  after(async () => {
    await running?.stop('SIGKILL');
    await agent?.close();
    servers.forEach((s) => s.close());
    sockets.forEach((socket) => socket.destroy());
    nmi(['cleanup'], env);
    node?.destroy();
    for (const dir of [binDir, bindings]) rmSync(dir, { recursive: true, force: true });
  });


  test(`${flavour}: without nmi a pod reaches the metadata address directly`, async () => {
    assert.deepEqual(await agent.connect(METADATA, 80), { line: 'imds' });
  });

  test(`${flavour}: install redirects pods, SIGTERM removes everything and leaves nat as it was`, async () => {
    const before = saveNat();
    running = await start();
    assert.deepEqual(await agent.connect(METADATA, 80), { line: NMI });
    if (flavour === 'nftables') {
      assert.match(nftTable(), /priority dstnat - 1|priority -101/);
      assert.equal(saveNat(), before, 'iptables nat untouched by the nftables backend');
    } else {
      assert.match(saveNat(), /^-A PREROUTING -j aad-metadata$/m);
      const prerouting = saveNat().split('\n').filter((l) => l.startsWith('-A PREROUTING'));
      assert.equal(prerouting[0], '-A PREROUTING -j aad-metadata', 'jump first');
      assert.match(saveNat(), /-A aad-metadata -d 169\.254\.169\.254\/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10\.240\.0\.4:2579/);
      // Both flavours are installed: nmi chose the one holding kube-proxy's rules, like kube-proxy's iptables-wrapper.
      // (Asked through /proc: iptables-legacy-save -t nat would create the table it is asked about.)
      if (flavour === 'iptables-legacy') assert.doesNotMatch(node.exec('iptables-nft-save', ['-t', 'nat']), /aad-metadata/);
      else assert.doesNotMatch(node.exec('cat', ['/proc/net/ip_tables_names']), /^nat$/m, 'no iptables-legacy nat table');
    }
    assert.equal(await running.stop('SIGTERM'), 0);
    running = undefined;
    assert.equal(saveNat(), before, 'nat restored byte for byte');
    assert.equal(nftTable(), '');
    assert.deepEqual(await agent.connect(METADATA, 80), { line: 'imds' });
  });

  test(`${flavour}: SIGKILL leaves the rules (fail closed); a restart adopts them without duplicates`, async () => {
    running = await start();
    await running.stop('SIGKILL');
    // Still redirected to the dead server: refused, never the real IMDS.
    assert.deepEqual(await agent.connect(METADATA, 80), { error: 'ECONNREFUSED' }, 'fail closed after a crash');
    running = await start();
    if (flavour === 'nftables') {
      assert.equal((nftTable().match(/dnat to/g) ?? []).length, 1);
    } else {
      const jumps = saveNat().split('\n').filter((l) => l === '-A PREROUTING -j aad-metadata');
      assert.equal(jumps.length, 1);
      assert.equal((saveNat().match(/-A aad-metadata /g) ?? []).length, 1);
    }
    assert.equal(await running.stop('SIGTERM'), 0);
    running = undefined;
  });

  test(`${flavour}: a start that fails after a crash exits 1 and leaves the crashed nmi's rules (pods stay failing closed)`, async () => {
    running = await start();
    await running.stop('SIGKILL');
    const installed = flavour === 'nftables' ? nftTable() : saveNat();
    // The token port taken: this start fails (before its syncs, as it holds its listeners first) and must leave the rules.
    const squatter = await lineServer(node.nodeIp, 2579, 'squatter');
    try {
      const failed = await start().catch((err: Error) => err);
      assert.ok(failed instanceof Error && /nmi exited 1: [\s\S]*EADDRINUSE/.test(failed.message), String(failed));
      assert.equal(flavour === 'nftables' ? nftTable() : saveNat(), installed, 'the rules are as the crashed nmi left them');
    } finally {
      squatter.close();
    }
    const r = nmi(['cleanup'], env);
    assert.equal(r.code, 0, r.stderr);
  });

  test(`${flavour}: a start that cannot install its rules (no CAP_NET_ADMIN) exits 1 instead of hanging`, async () => {
    const failed = await startNmi(
      ['--node-ip', node.nodeIp, '--rules', rulesFlag, '--server', 'js', '--kubelet-url', 'https://127.0.0.1:1', '--bindings', bindings],
      { env, prefix: ['setpriv', '--bounding-set', '-net_admin', '--'] },
    ).catch((err: Error) => err);
    assert.ok(failed instanceof Error && /nmi exited 1: /.test(failed.message), String(failed));
  });

  const tampering: [string, () => void][] =
    flavour === 'nftables'
      ? [
          ['a deleted table', () => node.exec('nft', ['delete', 'table', 'ip', 'aad-metadata'])],
          ['a flushed chain', () => node.exec('nft', ['flush', 'chain', 'ip', 'aad-metadata', 'prerouting'])],
          ['an extra rule', () => node.exec('nft', ['add', 'rule', 'ip', 'aad-metadata', 'prerouting', 'tcp', 'dport', '81', 'accept'])],
        ]
      : [
          ['a deleted jump', () => ipt(['-t', 'nat', '-D', 'PREROUTING', '-j', 'aad-metadata'])],
          ['a flushed chain', () => ipt(['-t', 'nat', '-F', 'aad-metadata'])],
          ['a rule inserted above the jump', () => ipt(['-t', 'nat', '-I', 'PREROUTING', '1', '-s', '10.99.0.0/16', '-j', 'RETURN'])],
          ['a duplicated jump', () => ipt(['-t', 'nat', '-A', 'PREROUTING', '-j', 'aad-metadata'])],
        ];

  test(`${flavour}: external changes are repaired within the sync interval`, async () => {
    running = await start();
    let expected = 0;
    for (const [what, tamper] of tampering) {
      tamper();
      expected += 1;
      await waitFor(`repair of ${what}`, async () => ((await running!.metric('nmi_rule_repairs_total')) ?? 0) >= expected || undefined, 10_000);
      assert.deepEqual(await agent.connect(METADATA, 80), { line: NMI }, `redirect restored after ${what}`);
      if (flavour !== 'nftables') {
        const prerouting = saveNat().split('\n').filter((l) => l.startsWith('-A PREROUTING'));
        assert.equal(prerouting[0], '-A PREROUTING -j aad-metadata', `jump first after ${what}`);
        assert.equal(prerouting.filter((l) => l === '-A PREROUTING -j aad-metadata').length, 1);
      }
    }
    assert.match(saveNat(), /-A KUBE-SERVICES -d 10\.0\.0\.1\/32 -p tcp -m tcp --dport 443 -j RETURN/, 'kube-proxy stand-in untouched');
    assert.equal(await running.stop('SIGTERM'), 0);
    running = undefined;
  });

  test(`${flavour}: during repairs a tight loop of pod connects reaches only nmi`, async () => {
    running = await start();
    // Changes that make nmi rewrite its rules without ever removing the redirect themselves.
    const provoke =
      flavour === 'nftables'
        ? () => node.exec('nft', ['add', 'rule', 'ip', 'aad-metadata', 'prerouting', 'tcp', 'dport', '81', 'accept'])
        : () => ipt(['-t', 'nat', '-I', 'PREROUTING', '1', '-s', '10.99.0.0/16', '-j', 'RETURN']);
    const loop = agent.connectLoop(METADATA, 80, 3000);
    const deadline = Date.now() + 2800;
    while (Date.now() < deadline) {
      provoke();
      await sleep(150);
    }
    const counts = await loop;
    const repairs = (await running.metric('nmi_rule_repairs_total')) ?? 0;
    assert.ok(repairs >= 3, `repairs happened (${repairs})`);
    assert.deepEqual(Object.keys(counts), [NMI], `every connect reached nmi: ${JSON.stringify(counts)}`);
    assert.equal(await running.stop('SIGTERM'), 0);
    running = undefined;
    if (flavour !== 'nftables') {
      // The provoked RETURN rules are the operator's, not nmi's: they stay.
      assert.match(saveNat(), /-A PREROUTING -s 10\.99\.0\.0\/16 -j RETURN/);
      while (saveNat().includes('-s 10.99.0.0/16')) ipt(['-t', 'nat', '-D', 'PREROUTING', '-s', '10.99.0.0/16', '-j', 'RETURN']);
    }
  });

  test(`${flavour}: an established flow made before install is cut after install`, async () => {
    const held = await agent.hold(METADATA, 80);
    assert.equal(held.line, 'imds');
    assert.deepEqual(await agent.send(held.id, 'ping\n'), { line: 'imds:ping' }, 'flow works before install');
    running = await start();
    const after = await agent.send(held.id, 'again\n');
    assert.ok(after.error, `flow cut after install: ${JSON.stringify(after)}`);
    assert.equal(await running.stop('SIGTERM'), 0);
    running = undefined;
  });

  test(`${flavour}: nmi cleanup handles clean, partial and duplicated states and touches nothing else`, () => {
    const before = saveNat();
    let r = nmi(['cleanup'], env);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /nothing to remove/);
    if (flavour === 'nftables') {
      node.exec('nft', ['add', 'table', 'ip', 'aad-metadata']);
      r = nmi(['cleanup'], env);
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stdout, /removed nftables: table ip aad-metadata/);
    } else {
      // chain without jump
      ipt(['-t', 'nat', '-N', 'aad-metadata']);
      ipt(['-t', 'nat', '-A', 'aad-metadata', '-j', 'RETURN']);
      r = nmi(['cleanup'], env);
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stdout, new RegExp(`removed ${flavour}: nat chain aad-metadata`));
      assert.equal(saveNat(), before);
      // duplicated jumps, not first, and a jump from another chain
      ipt(['-t', 'nat', '-N', 'aad-metadata']);
      for (let i = 0; i < 3; i++) ipt(['-t', 'nat', '-A', 'PREROUTING', '-j', 'aad-metadata']);
      ipt(['-t', 'nat', '-A', 'OUTPUT', '-j', 'aad-metadata']);
      r = nmi(['cleanup'], env);
      assert.equal(r.code, 0, r.stderr);
      assert.equal((r.stdout.match(new RegExp(`removed ${flavour}: nat PREROUTING -j aad-metadata`, 'g')) ?? []).length, 3);
      assert.match(r.stdout, new RegExp(`removed ${flavour}: nat OUTPUT -j aad-metadata`));
    }
    assert.equal(saveNat(), before, 'nothing else touched');
    r = nmi(['cleanup'], env);
    assert.match(r.stdout, /nothing to remove/);
    if (flavour !== 'iptables-legacy') {
      // iptables-legacy creates the table it is asked about; cleanup and status must not.
      assert.equal(nmi(['status'], env).code, 0);
      assert.doesNotMatch(node.exec('cat', ['/proc/net/ip_tables_names']), /^nat$/m, 'no iptables-legacy nat table created');
      assert.doesNotMatch(node.exec('iptables-nft-save', []), /legacy tables present/);
    }
  });

  if (flavour !== 'nftables') {
    test(`${flavour}: the manual clean-up commands remove an installed redirect completely`, async () => {
      const before = saveNat();
      running = await start();
      await running.stop('SIGKILL');
      running = undefined;
      ipt(['-t', 'nat', '-D', 'PREROUTING', '-j', 'aad-metadata']);
      ipt(['-t', 'nat', '-F', 'aad-metadata']);
      ipt(['-t', 'nat', '-X', 'aad-metadata']);
      assert.equal(saveNat(), before);
      assert.deepEqual(await agent.connect(METADATA, 80), { line: 'imds' });
    });
  }

  test(`${flavour}: nmi status shows the rules with counters`, async () => {
    running = await start();
    await agent.connect(METADATA, 80);
    const r = nmi(['status', '--json'], env);
    assert.equal(r.code, 0, r.stderr);
    const status = JSON.parse(r.stdout) as { backends: { backend: string; installed: boolean; rules: { text: string; packets: number }[] }[]; daemon: { ready: boolean } };
    const mine = status.backends.find((b) => b.backend === flavour);
    assert.ok(mine?.installed);
    assert.ok(mine.rules.some((rule) => rule.packets > 0), 'the pod connect was counted');
    assert.equal(status.daemon.ready, true);
    assert.equal(await running.stop('SIGTERM'), 0);
    running = undefined;
  });
}
