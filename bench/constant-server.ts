// The node:http baseline: a plain node:http server that answers every request
// with one fixed answer (the bytes nmi gave the bench), through the same
// writeHead/end calls nmi's js server uses. What nmi does beyond this is its cost.
//
//   node dist/bench/constant-server.js <answer.json> [host] [port]
//
// answer.json: { "status": 200, "headers": [[name, value], ...], "body": "<base64>", "keepAliveTimeoutS": 5 }.
// Listens on host (127.0.0.1) and port (0: any free one), and prints `listening <port>` once it does.
import { readFileSync } from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';

export interface FixedAnswer {
  status: number;
  /** In the order nmi wrote them; node:http adds Date, Connection and Keep-Alive itself. */
  headers: Array<[string, string]>;
  /** base64 */
  body: string;
  /** What nmi's Keep-Alive header says, so node:http writes the same one. */
  keepAliveTimeoutS: number;
}

function main(file: string | undefined, host = '127.0.0.1', port = '0'): void {
  if (!file) {
    process.stderr.write('usage: node dist/bench/constant-server.js <answer.json> [host] [port]\n');
    process.exitCode = 2;
    return;
  }
  const answer = JSON.parse(readFileSync(file, 'utf8')) as FixedAnswer;
  const headers = answer.headers.flat();
  const body = Buffer.from(answer.body, 'base64');
  const server = http.createServer((_req, res) => {
    res.writeHead(answer.status, headers);
    res.end(body);
  });
  server.keepAliveTimeout = answer.keepAliveTimeoutS * 1000;
  server.listen(Number(port), host, () => process.stdout.write(`listening ${(server.address() as AddressInfo).port}\n`));
  // A clean exit on SIGTERM, so --cpu-prof writes its profile.
  process.once('SIGTERM', () => {
    server.close();
    server.closeAllConnections();
  });
}

main(process.argv[2], process.argv[3], process.argv[4]);
