// Runs inside a pod namespace; reads JSON-line commands on stdin, answers on stdout.
// A long-lived process so tests do not pay a node start per request.
import http from 'node:http';
import net from 'node:net';
import readline from 'node:readline';

interface Command {
  id: number;
  op: string;
  [key: string]: unknown;
}

const held = new Map<number, { socket: net.Socket; lines: string[]; waiters: ((line: string) => void)[] }>();
let heldId = 0;

/** Sent on connect: nmi's server answers it with an HTTP status line, a raw line server greets regardless. */
const PROBE = 'GET /nmi-probe HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n';

function firstLine(host: string, port: number, timeoutMs: number): Promise<{ line?: string; error?: string }> {
  return new Promise((resolve) => {
    const socket = net.connect({ host, port }, () => socket.write(PROBE));
    let data = '';
    const done = (result: { line?: string; error?: string }) => {
      socket.destroy();
      resolve(result);
    };
    socket.setTimeout(timeoutMs, () => done({ error: 'timeout' }));
    socket.on('data', (chunk) => {
      data += chunk.toString();
      if (data.includes('\n')) done({ line: data.split('\n')[0]!.trim() });
    });
    socket.on('error', (err: NodeJS.ErrnoException) => done({ error: err.code ?? err.message }));
    socket.on('end', () => done(data ? { line: data } : { error: 'closed' }));
  });
}

/** agent: a keep-alive pool to share; without one, a connection of its own. */
function request(url: string, method = 'GET', headers: Record<string, string> = {}, agent: http.Agent | false = false): Promise<unknown> {
  const started = process.hrtime.bigint();
  return new Promise((resolve) => {
    const req = http.request(url, { method, headers, agent, timeout: 10_000 }, (res) => {
      let body = '';
      res.setEncoding('utf8').on('data', (d: string) => (body += d));
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body, ms: Number(process.hrtime.bigint() - started) / 1e6 }));
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', (err: NodeJS.ErrnoException) => resolve({ status: 0, headers: {}, body: '', error: err.code ?? err.message }));
    req.end();
  });
}

async function handle(cmd: Command): Promise<unknown> {
  const host = cmd.host as string;
  const port = cmd.port as number;
  switch (cmd.op) {
    case 'http':
      return request(cmd.url as string, cmd.method as string | undefined, cmd.headers as Record<string, string> | undefined);
    case 'burst': {
      // n requests at once, each on its own connection or over `connections` kept alive; answers counted by status and body.
      const agent = cmd.connections === undefined ? false : new http.Agent({ keepAlive: true, maxSockets: cmd.connections as number });
      const results = (await Promise.all(
        Array.from({ length: cmd.n as number }, () => request(cmd.url as string, 'GET', cmd.headers as Record<string, string> | undefined, agent)),
      )) as { status: number; body: string }[];
      if (agent) agent.destroy();
      const counts: Record<string, number> = {};
      for (const r of results) counts[`${r.status} ${r.body.slice(0, 200)}`] = (counts[`${r.status} ${r.body.slice(0, 200)}`] ?? 0) + 1;
      return counts;
    }
    case 'many': {
      // Every URL once (or round and round until durationMs is over), `concurrency` at a time:
      // answers counted by status, the first of each status kept.
      const urls = cmd.urls as string[];
      const until = cmd.durationMs === undefined ? undefined : Date.now() + (cmd.durationMs as number);
      const counts: Record<string, number> = {};
      const samples: Record<string, unknown> = {};
      let next = 0;
      const more = () => (until === undefined ? next < urls.length : Date.now() < until);
      const worker = async () => {
        while (more()) {
          const r = (await request(urls[next++ % urls.length]!, 'GET', cmd.headers as Record<string, string> | undefined)) as { status: number; error?: string };
          const key = r.error ? `error:${r.error}` : String(r.status);
          counts[key] = (counts[key] ?? 0) + 1;
          samples[key] ??= r;
        }
      };
      await Promise.all(Array.from({ length: cmd.concurrency as number }, worker));
      return { counts, samples };
    }
    case 'steady': {
      // One request at a time, each on a new connection, intervalMs apart, for durationMs:
      // answers counted by status (or error), the longest any one took, and the longest
      // stretch between two 200s (what a pod that retries on failure waits).
      const counts: Record<string, number> = {};
      let longestMs = 0;
      let longestGapMs = 0;
      let lastAnswer = process.hrtime.bigint();
      const end = Date.now() + (cmd.durationMs as number);
      while (Date.now() < end) {
        const started = process.hrtime.bigint();
        const r = (await request(cmd.url as string, 'GET', cmd.headers as Record<string, string> | undefined)) as { status: number; error?: string };
        const now = process.hrtime.bigint();
        longestMs = Math.max(longestMs, Number(now - started) / 1e6);
        if (r.status === 200) {
          longestGapMs = Math.max(longestGapMs, Number(now - lastAnswer) / 1e6);
          lastAnswer = now;
        }
        const key = r.error ? `error:${r.error}` : String(r.status);
        counts[key] = (counts[key] ?? 0) + 1;
        await new Promise((resolve) => setTimeout(resolve, cmd.intervalMs as number));
      }
      return { counts, longestMs: Math.round(longestMs), longestGapMs: Math.round(longestGapMs) };
    }
    case 'connect':
      return firstLine(host, port, cmd.timeoutMs as number);
    case 'connectLoop': {
      const counts: Record<string, number> = {};
      const end = Date.now() + (cmd.durationMs as number);
      while (Date.now() < end) {
        const r = await firstLine(host, port, 1000);
        const key = r.line ?? `error:${r.error}`;
        counts[key] = (counts[key] ?? 0) + 1;
      }
      return counts;
    }
    case 'hold': {
      const id = heldId++;
      const socket = net.connect({ host, port });
      const entry = { socket, lines: [] as string[], waiters: [] as ((line: string) => void)[] };
      held.set(id, entry);
      let buf = '';
      const push = (line: string) => {
        const waiter = entry.waiters.shift();
        if (waiter) waiter(line);
        else entry.lines.push(line);
      };
      socket.on('data', (chunk) => {
        buf += chunk.toString();
        let i;
        while ((i = buf.indexOf('\n')) >= 0) {
          push(buf.slice(0, i));
          buf = buf.slice(i + 1);
        }
      });
      socket.on('error', (err: NodeJS.ErrnoException) => push(`error:${err.code ?? err.message}`));
      socket.on('close', () => push('error:closed'));
      const line = await new Promise<string>((resolve) => entry.waiters.push(resolve));
      return line.startsWith('error:') ? { id, error: line.slice(6) } : { id, line };
    }
    case 'send': {
      const entry = held.get(cmd.conn as number);
      if (!entry) return { error: 'no such connection' };
      entry.socket.write(cmd.text as string);
      const queued = entry.lines.shift();
      const line =
        queued ??
        (await new Promise<string>((resolve) => {
          const timer = setTimeout(() => resolve('error:timeout'), cmd.timeoutMs as number);
          entry.waiters.push((l) => {
            clearTimeout(timer);
            resolve(l);
          });
        }));
      return line.startsWith('error:') ? { error: line.slice(6) } : { line };
    }
    default:
      return { error: `unknown op ${cmd.op}` };
  }
}

const rl = readline.createInterface({ input: process.stdin });
rl.on('line', (line) => {
  const cmd = JSON.parse(line) as Command;
  void handle(cmd).then((result) => process.stdout.write(`${JSON.stringify({ id: cmd.id, result })}\n`));
});
rl.on('close', () => {
  for (const { socket } of held.values()) socket.destroy();
});
