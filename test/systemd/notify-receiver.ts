// Plays systemd's side of sd_notify: a datagram socket the test owns. Node cannot
// receive on AF_UNIX datagram sockets, so a small python3 child binds it and
// prints each datagram, with its sender's pid (SCM_CREDENTIALS, which systemd
// uses to enforce NotifyAccess=main), as a JSON line.
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import readline from 'node:readline';
import { setTimeout as sleep } from 'node:timers/promises';

const SCRIPT = `
import json, socket, struct, sys
addr = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
s.bind("\\0" + addr[1:] if addr.startswith("@") else addr)
print(json.dumps({"bound": True}), flush=True)
while True:
    data, anc, _, _ = s.recvmsg(65536, socket.CMSG_SPACE(12) + socket.CMSG_SPACE(16 * 4))
    pid = None
    fds = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = struct.unpack("3i", payload[:12])[0]
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            for fd in struct.unpack("%di" % (len(payload) // 4), payload):
                with socket.socket(fileno=fd) as passed:
                    listening = passed.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    host, port = passed.getsockname()[:2]
                    fds.append({"address": "%s:%d" % (host, port), "listening": bool(listening)})
    print(json.dumps({"data": data.decode(), "pid": pid, "fds": fds}), flush=True)
`;

export interface Datagram {
  data: string;
  pid: number | null;
  /** Descriptors that came with it (SCM_RIGHTS), each as the socket it is. */
  fds: { address: string; listening: boolean }[];
}

export interface Receiver {
  address: string;
  messages: Datagram[];
  /** Calls `onMessage` synchronously as each datagram is read (to look at the world at that moment). */
  onMessage?: (message: Datagram) => void;
  /** Waits (bounded) until `check` holds over the messages received so far. */
  until(what: string | (() => string), check: (messages: Datagram[]) => boolean, timeoutMs?: number): Promise<Datagram[]>;
  close(): Promise<void>;
}

/** Binds `address` (a path, or '@name' for an abstract socket) and resolves once it is bound. */
export async function startReceiver(address: string): Promise<Receiver> {
  const child: ChildProcess = spawn('python3', ['-c', SCRIPT, address], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const lines = readline.createInterface({ input: child.stdout! });
  const receiver: Receiver = {
    address,
    messages: [],
    async until(what, check, timeoutMs = 10_000) {
      const deadline = Date.now() + timeoutMs;
      while (!check(receiver.messages)) {
        if (Date.now() > deadline) {
          throw new Error(`timed out waiting for ${typeof what === 'function' ? what() : what}; received: ${JSON.stringify(receiver.messages.map((m) => m.data))}`);
        }
        await sleep(20);
      }
      return receiver.messages;
    },
    async close() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill('SIGKILL');
      await once(child, 'exit');
    },
  };
  const bound = new Promise<void>((resolve, reject) => {
    child.once('exit', (code) => reject(new Error(`receiver exited ${code}: ${stderr}`)));
    lines.on('line', (line) => {
      const parsed = JSON.parse(line) as { bound?: true; data?: string; pid?: number | null; fds?: Datagram['fds'] };
      if (parsed.bound) return resolve();
      const message: Datagram = { data: parsed.data ?? '', pid: parsed.pid ?? null, fds: parsed.fds ?? [] };
      receiver.messages.push(message);
      receiver.onMessage?.(message);
    });
  });
  await bound;
  return receiver;
}

export const isWatchdog = (m: Datagram): boolean => m.data === 'WATCHDOG=1';
