// The DaemonSet's image under a real container runtime: podman builds
// deploy/Containerfile from the Debian package on a base made here
// (deploy/base-image.sh). The build is the offline check: its steps run with
// --network none and podman itself in a namespace with no network
// (test/harness/podman.ts), so a build that fetched anything, a base image
// included, fails here. Then it runs the image as deploy/daemonset.yaml says
// (capabilities, read-only root, environment, xtables lock, memory limit, grace
// period; podman's default seccomp profile for RuntimeDefault) in a node
// namespace this test made, with the stand-in kubelet and IMDS on that
// namespace's loopback, which the container shares.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { request } from 'undici';
import { parse } from 'yaml';
import { createCluster, crd, TOKEN_URL, type Cluster } from '../harness/cluster.js';
import { comparableRules, projectRoot, type PodAgent } from '../harness/netns.js';
import { failures, steadyAcross } from '../harness/restarts.js';
import { attackFrom, attacks, mib, sampleRss, tokenMeanwhile } from '../harness/hostile.js';
import { nmi } from '../harness/nmi-process.js';
import { waitFor } from '../harness/wait-for.js';
import { containerLogs, podman, podmanQuiet, ulimits } from '../harness/podman.js';
import { nmiPackage } from '../harness/runtime.js';
import { decodeStandinToken } from '../standins/imds.js';

type Doc = Record<string, any>;
const daemonSet = parse(readFileSync(path.join(projectRoot, 'deploy', 'base', 'daemonset.yaml'), 'utf8')) as Doc;
const pod: Doc = daemonSet.spec.template.spec;
const container: Doc = pod.containers[0];

const image = `localhost/nmi-test-${process.pid}:latest`;
const noConntrackBase = `localhost/nmi-test-${process.pid}-noconntrack:latest`;
/** What a build on that base would have tagged, had it not been refused. */
const refused = `localhost/nmi-test-${process.pid}-refused:latest`;
const rebuilt = `localhost/nmi-test-${process.pid}-rebuilt:latest`;
const arm64 = `localhost/nmi-test-${process.pid}-arm64:latest`;
const MGMT = 'https://management.azure.com/';
const QUERY = `${TOKEN_URL}?api-version=2018-02-01&resource=${encodeURIComponent(MGMT)}`;
const ID = { client: '11111111-1111-1111-1111-111111111111', res: '/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a' };
/** Where the container sees the stand-ins' files. */
const CERTS = '/etc/kubernetes/certs';
const BINDINGS = '/etc/nmi/bindings.yaml';

const scratch = mkdtempSync(path.join(tmpdir(), 'nmi-image-'));
const containers: string[] = [];
let base: string;
let deb: string;
let cluster: Cluster;
let agent: PodAgent;

/** The context is the package's folder (nmiPackage's: the .deb and a marker file), as the README builds it from dist/. */
function build(baseImage: string, tag: string, context = path.dirname(deb), extra: string[] = []): void {
  podman(['build', '--network', 'none', ...extra, '--build-arg', `BASE=${baseImage}`, '-f', path.join(projectRoot, 'deploy', 'Containerfile'), '-t', tag, context], 300_000);
}

/** The manifest's environment as the kubelet would give it on the test's node: downward API and service account replaced by the stand-ins. */
function environment(onExit: string): string[] {
  const { kubelet, imds, node } = cluster;
  const standins: Record<string, string | undefined> = {
    NODE_NAME: 'node1',
    NMI_NODE_IP: node.nodeIp,
    NMI_BINDINGS: BINDINGS,
    NMI_ON_EXIT: onExit,
    // The manifest's AKS Engine variant: the stand-in kubelet takes a client certificate; there is no service account.
    NMI_KUBELET_URL: kubelet.url.href,
    NMI_KUBELET_TOKEN_FILE: undefined,
    NMI_KUBELET_CA: path.join(CERTS, path.basename(kubelet.caFile)),
    NMI_KUBELET_CLIENT_CERT: path.join(CERTS, path.basename(kubelet.client.cert)),
    NMI_KUBELET_CLIENT_KEY: path.join(CERTS, path.basename(kubelet.client.key)),
    NMI_UPSTREAM_IMDS: imds.url,
  };
  const env: Record<string, string> = {};
  for (const { name, value, valueFrom } of container.env as Doc[]) {
    if (name in standins) continue;
    if (valueFrom) throw new Error(`daemonset.yaml sets ${name} from ${JSON.stringify(valueFrom)}: give the test a stand-in for it`);
    // $(VAR) expands variables defined before it, as the kubelet does.
    env[name] = String(value).replace(/\$\((\w+)\)/g, (ref, v: string) => env[v] ?? ref);
  }
  for (const [name, value] of Object.entries(standins)) if (value !== undefined) env[name] = value;
  return Object.entries(env).flatMap(([name, value]) => ['--env', `${name}=${value}`]);
}

/** The manifest's hostPath mounts, each on a file or folder of the test's (FileOrCreate and DirectoryOrCreate are what the test stands in for). */
function hostMounts(): string[] {
  return (container.volumeMounts as Doc[]).flatMap((mount) => {
    const hostPath: Doc | undefined = (pod.volumes as Doc[]).find((v) => v.name === mount.name)?.hostPath;
    const stand = path.join(scratch, 'host', hostPath?.path ?? '');
    if (hostPath?.type === 'FileOrCreate') {
      mkdirSync(path.dirname(stand), { recursive: true });
      writeFileSync(stand, '');
    } else if (hostPath?.type === 'DirectoryOrCreate') {
      mkdirSync(stand, { recursive: true, mode: 0o700 });
    } else {
      throw new Error(`daemonset.yaml mounts ${mount.name} (${JSON.stringify(hostPath)}): the test has no stand-in for it`);
    }
    return ['--volume', `${stand}:${mount.mountPath}${mount.readOnly ? ':ro' : ''}`];
  });
}

/** `podman run` with the manifest's security context and resources, in the test's node namespace; waits for /readyz. */
async function runNmi(onExit: 'keep' | 'remove'): Promise<string> {
  const sc: Doc = container.securityContext;
  assert.equal(pod.securityContext.seccompProfile.type, 'RuntimeDefault', "podman's default seccomp profile stands for RuntimeDefault");
  assert.equal(sc.privileged, false);
  const name = `nmi-test-${process.pid}-${containers.length}`;
  containers.push(name);
  podman([
    'run', '--detach', '--name', name,
    `--network=ns:/run/netns/${cluster.node.name}`,
    ...(sc.capabilities.drop as string[]).map((c) => `--cap-drop=${c}`),
    ...(sc.capabilities.add as string[]).map((c) => `--cap-add=${c}`),
    ...(sc.allowPrivilegeEscalation === false ? ['--security-opt=no-new-privileges'] : []),
    // Kubernetes mounts no tmpfs over /run or /tmp of a read-only root, podman does unless told not to.
    ...(sc.readOnlyRootFilesystem ? ['--read-only', '--read-only-tmpfs=false'] : []),
    `--memory=${String(container.resources.limits.memory).replace(/Mi$/, 'm')}`,
    ...ulimits(),
    ...hostMounts(),
    '--volume', `${cluster.pki.dir}:${CERTS}:ro`,
    '--volume', `${path.join(cluster.bindingsDir, 'bindings.yaml')}:${BINDINGS}:ro`,
    ...environment(onExit),
    image,
  ]);
  const probe = (container.env as Doc[]).find((e) => e.name === 'NMI_PROBE_ADDRESS')?.value ?? '127.0.0.1:8085';
  await waitFor(`nmi ready in container ${name}`, async () => {
    try {
      const res = await request(`http://${probe}/readyz`, { headersTimeout: 1000, bodyTimeout: 1000 });
      await res.body.dump();
      if (res.statusCode === 200) return true;
    } catch {
      // not listening yet
    }
    const { status } = state(name);
    if (status !== 'running') throw new Error(`container ${name} ${status}:\n${containerLogs(name)}`);
    return undefined;
  }, 60_000);
  return name;
}

function state(name: string): { status: string; exitCode: number } {
  const [status, exitCode] = podman(['inspect', '--format', '{{.State.Status}} {{.State.ExitCode}}', name]).trim().split(' ');
  return { status: status!, exitCode: Number(exitCode) };
}

/** podman stop: SIGTERM, then SIGKILL after the manifest's grace period, as the kubelet does. */
function stop(name: string): { status: string; exitCode: number } {
  const grace = Number(pod.terminationGracePeriodSeconds);
  podman(['stop', '--time', String(grace), name], (grace + 30) * 1000);
  return state(name);
}

// The image's iptables is bookworm's default, iptables-nft, whatever the host's alternatives say.
const natRules = () => cluster.node.exec('iptables-nft-save', ['-t', 'nat']);
const REDIRECT = /^-A aad-metadata -d 169\.254\.169\.254\/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10\.240\.0\.4:2579$/m;
const JUMP = /^-A PREROUTING -j aad-metadata$/m;

before(async () => {
  deb = nmiPackage();
  base = execFileSync('bash', [path.join(projectRoot, 'deploy', 'base-image.sh')], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], timeout: 900_000 }).trim();
  build(base, image);
  cluster = await createCluster();
  const app = cluster.addPod({ name: 'app', labels: { aadpodidbinding: 'a' } });
  cluster.writeBindings([crd.userAssigned('id-a', ID.client, ID.res), crd.binding('bind-a', 'id-a', 'a')]);
  agent = await app.ns.agent();
});

after(async () => {
  for (const name of containers) podmanQuiet(['rm', '--force', '--time', '0', name]);
  // The base stays: like the Debian root it is made from, it is a cache shared by runs (deploy/base-image.sh).
  for (const tag of [image, rebuilt, noConntrackBase, refused, arm64]) podmanQuiet(['rmi', '--force', tag]);
  await agent?.close();
  await cluster?.close();
  rmSync(scratch, { recursive: true, force: true });
});

test('the image is the package on the Debian base, with `nmi run` as its entrypoint', () => {
  const config = JSON.parse(podman(['image', 'inspect', '--format', '{{json .Config}}', image])) as { Entrypoint: string[]; Cmd?: string[] | null; Env: string[] };
  assert.deepEqual(config.Entrypoint, ['nmi', 'run']);
  assert.deepEqual(config.Cmd ?? [], [], "the base's CMD is not passed to nmi run");
  assert.ok(config.Env.includes('NODE_ENV=production'));
  const version = execFileSync('dpkg-deb', ['--field', deb, 'Version'], { encoding: 'utf8' }).trim();
  const installed = podman(['run', '--rm', '--network', 'none', ...ulimits(), '--entrypoint', 'dpkg-query', image, '--show', '--showformat', '${Version} ${db:Status-Status}', 'nmi']);
  assert.equal(installed, `${version} installed`);
});

test('a new package of the same name builds a new image, not the cached install of the old one', () => {
  // What a rebuilt package is to podman's layer cache: the same name, other contents (one file more).
  const dir = path.join(scratch, 'rebuilt');
  const context = path.join(dir, 'context');
  mkdirSync(context, { recursive: true });
  execFileSync('dpkg-deb', ['--raw-extract', deb, path.join(dir, 'root')]);
  writeFileSync(path.join(dir, 'root', 'usr', 'lib', 'nmi', 'REBUILT'), '');
  execFileSync('dpkg-deb', ['--root-owner-group', '-Znone', '--build', path.join(dir, 'root'), path.join(context, path.basename(deb))], { stdio: 'ignore' });
  build(base, rebuilt, context);
  assert.match(podman(['run', '--rm', '--network', 'none', ...ulimits(), '--entrypoint', 'ls', rebuilt, '/usr/lib/nmi']), /^REBUILT$/m);
});

test('the arm64 image builds the same way, from the arm64 package on an arm64 base (its steps under qemu), and runs its runtime', () => {
  const deb64 = nmiPackage('arm64');
  const base64 = execFileSync('bash', [path.join(projectRoot, 'deploy', 'base-image.sh'), '--arch', 'arm64'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], timeout: 900_000 }).trim();
  build(base64, arm64, path.dirname(deb64), ['--platform', 'linux/arm64']);
  assert.equal(podman(['image', 'inspect', '--format', '{{.Architecture}}', arm64]).trim(), 'arm64');
  const line = podman(['run', '--rm', '--network', 'none', '--platform', 'linux/arm64', ...ulimits(), '--entrypoint', 'nmi', arm64, '--version']);
  assert.match(line, /^nmi \S+ \(Node\.js v\d+\.\d+\.\d+, linux-arm64, N-API \d+\)\n$/);
});

test('a base without conntrack: the build stops with one line naming what is missing', () => {
  const dir = path.join(scratch, 'noconntrack');
  mkdirSync(dir);
  writeFileSync(path.join(dir, 'Containerfile'), `FROM ${base}\nRUN rm "$(command -v conntrack)"\n`);
  podman(['build', '--network', 'none', '-t', noConntrackBase, dir]);
  // --layers=false: a refused build would otherwise leave its COPY layer behind as an untagged image.
  assert.throws(() => build(noConntrackBase, refused, undefined, ['--layers=false']), /^nmi image: the base lacks conntrack; use Debian 12 with iptables, nftables, libnftables1 and conntrack \(deploy\/base-image\.sh\)$/m);
});

test("as the DaemonSet runs it: installs the chain in the node's namespace, a pod gets its token, podman stop with NMI_ON_EXIT=remove removes the rules", async () => {
  const name = await runNmi('remove');
  // What the kernel says of nmi's process, not what podman was asked.
  const status = readFileSync(`/proc/${podman(['inspect', '--format', '{{.State.Pid}}', name]).trim()}/status`, 'utf8');
  assert.match(status, /^CapEff:\s+0000000000003000$/m, 'CAP_NET_ADMIN and CAP_NET_RAW, nothing else');
  assert.match(status, /^NoNewPrivs:\s+1$/m);
  assert.match(status, /^Seccomp:\s+2$/m, 'a seccomp filter');
  assert.throws(() => podman(['exec', name, 'touch', '/probe']), /Read-only file system/);
  assert.match(natRules(), JUMP);
  assert.match(natRules(), REDIRECT);
  const r = await agent.http(QUERY, { headers: { Metadata: 'true' } });
  assert.equal(r.status, 200, r.body);
  const body = JSON.parse(r.body) as Record<string, string>;
  assert.equal(body.client_id, ID.client);
  assert.equal(decodeStandinToken(body.access_token!).identity, `client_id:${ID.client}`);
  assert.ok(cluster.imds.calls >= 1, "the token came from the IMDS stand-in, through the container's nmi");
  assert.deepEqual(stop(name), { status: 'exited', exitCode: 0 });
  assert.doesNotMatch(natRules(), /aad-metadata/);
});

test('a rolling update with maxSurge, as two containers: the new one takes the sockets and rules over, the old one stops; no request fails', async (t) => {
  const old = await runNmi('keep');
  const rules = comparableRules(natRules());
  const { counts, longestGapMs, samples } = await steadyAcross(agent, () => natRules().split('\n').filter((l) => JUMP.test(l)).length, async () => {
    // The manifest's NMI_TAKE_OVER=true and the shared /run/nmi make it a handoff.
    const fresh = await runNmi('keep');
    await waitFor(() => `the new container keeping the rules:\n${containerLogs(fresh)}\nthe old one:\n${containerLogs(old)}`, () => /"msg":"rules installed"/.test(containerLogs(fresh)) || undefined, 60_000);
    assert.deepEqual(stop(old), { status: 'exited', exitCode: 0 });
    assert.match(containerLogs(old), /leaving the rules and the listening sockets to the nmi that took over/);
    assert.match(containerLogs(fresh), /taking over from the running nmi/);
  }, 15_000);
  t.diagnostic(`${JSON.stringify(counts)}; longest without an answer ${longestGapMs} ms`);
  assert.equal(failures(counts), 0, JSON.stringify(counts));
  assert.deepEqual(samples, [1], 'one jump throughout');
  assert.equal(comparableRules(natRules()), rules);
  const newest = containers.at(-1)!;
  assert.deepEqual(stop(newest), { status: 'exited', exitCode: 0 });
  nmi(['cleanup']);
});

test('NMI_ON_EXIT=keep: podman stop leaves the rules (pods fail closed); nmi cleanup from the host removes them', async () => {
  const name = await runNmi('keep');
  assert.deepEqual(stop(name), { status: 'exited', exitCode: 0 });
  assert.match(natRules(), JUMP);
  assert.match(natRules(), REDIRECT);
  assert.deepEqual(await agent.connect('169.254.169.254', 80), { error: 'ECONNREFUSED' }, 'redirected to the stopped nmi, never elsewhere');
  const cleanup = nmi(['cleanup']);
  assert.equal(cleanup.code, 0, cleanup.stderr);
  assert.doesNotMatch(natRules(), /aad-metadata/);
});

test("issue 27's attack (a) under the manifest's memory limit: a pod never reading its answers does not get nmi killed, other pods keep their tokens", async (t) => {
  const name = await runNmi('remove');
  const pid = Number(podman(['inspect', '--format', '{{.State.Pid}}', name]).trim());
  const attacker = cluster.addPod({ name: 'attacker', labels: { aadpodidbinding: 'a' } });
  const attackerAgent = await attacker.ns.agent();
  // Its token cached first: the attack is cache hits, the fast path's case.
  const first = await attackerAgent.http(QUERY, { headers: { Metadata: 'true' } });
  await attackerAgent.close();
  assert.equal(first.status, 200, first.body);
  const { result: { result, other }, rss } = await sampleRss(pid, (signal) => tokenMeanwhile(agent, () => attackFrom(attacker.ns, attacks.a.attack, signal)));
  t.diagnostic(`VmRSS peak ${mib(rss.peakKiB)}, VmHWM ${mib(rss.hwmKiB)}${rss.died ? ', nmi died' : ''}; the other pod meanwhile: ${JSON.stringify(other)}; attack: ${JSON.stringify(result)}`);
  // runc on this host does not always set OOMKilled: a cgroup OOM kill shows as exit code 137.
  assert.equal(podman(['inspect', '--format', '{{.State.Status}} exit={{.State.ExitCode}} OOMKilled={{.State.OOMKilled}}', name]).trim(), 'running exit=0 OOMKilled=false', containerLogs(name));
  assert.deepEqual(Object.keys(other.counts), ['200'], `the other pod got its token during the attack: ${JSON.stringify(other.counts)}`);
  const after = await agent.http(QUERY, { headers: { Metadata: 'true' } });
  assert.equal(after.status, 200, after.body);
  assert.deepEqual(stop(name), { status: 'exited', exitCode: 0 });
});
