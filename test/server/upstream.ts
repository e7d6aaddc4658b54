// A stand-in for the real IMDS behind the token server's proxy: a plain HTTP
// server on 127.0.0.1 that records every request it receives and answers as
// the test says (or never, to exercise timeouts).
import http from 'node:http';
import { once } from 'node:events';

export interface ReceivedRequest {
  method: string;
  url: string;
  headers: http.IncomingHttpHeaders;
  body: string;
}

export interface UpstreamReply {
  status: number;
  headers?: Record<string, string>;
  body?: string;
}

export interface Upstream {
  url: URL;
  received: ReceivedRequest[];
  /** How the next requests are answered; 'hang' never answers. */
  reply: UpstreamReply | 'hang';
  close(): Promise<void>;
}

export const DEFAULT_REPLY: UpstreamReply = {
  status: 200,
  headers: { 'Content-Type': 'application/json; charset=utf-8', 'X-Upstream': 'imds-standin' },
  body: '{"compute":{"name":"standin"}}',
};

export async function startUpstream(): Promise<Upstream> {
  const upstream: Upstream = {
    url: new URL('http://127.0.0.1'),
    received: [],
    reply: DEFAULT_REPLY,
    close: async () => {
      server.closeAllConnections();
      server.close();
      await once(server, 'close');
    },
  };
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (chunk: Buffer) => chunks.push(chunk));
    req.on('end', () => {
      upstream.received.push({ method: req.method ?? '', url: req.url ?? '', headers: req.headers, body: Buffer.concat(chunks).toString() });
      const reply = upstream.reply;
      if (reply === 'hang') return;
      res.writeHead(reply.status, reply.headers ?? {});
      res.end(reply.body ?? '');
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as { port: number };
  upstream.url = new URL(`http://127.0.0.1:${port}`);
  return upstream;
}
