// One request (keep-alive, or Connection: close) over a plain socket, and the exact bytes of its answer:
// what wrk sends (GET, Host, Metadata: true, nothing else) and what every
// server under test must answer alike. node:http would hide the bytes.
import net from 'node:net';

export interface RawTarget {
  host: string;
  port: number;
  /** Request-target: path and query. */
  target: string;
  /** Source address of the connection (any 127.0.0.0/8 address on loopback). */
  localAddress?: string;
  /** Asks with Connection: close, as --churn's wrk does. */
  close?: boolean;
}

export interface ParsedAnswer {
  status: number;
  /** In wire order. */
  headers: Array<[string, string]>;
  body: Buffer;
}

const TIMEOUT_MS = 10_000;

/** Where the answer in `bytes` ends, or -1 while it is incomplete. */
function answerEnd(bytes: Buffer): number {
  const head = bytes.indexOf('\r\n\r\n');
  if (head < 0) return -1;
  const length = /\r\ncontent-length:\s*(\d+)/i.exec(bytes.subarray(0, head).toString('latin1'))?.[1];
  if (length === undefined) throw new Error('answer without Content-Length');
  const end = head + 4 + Number(length);
  return bytes.length >= end ? end : -1;
}

export function rawGet({ host, port, target, localAddress, close = false }: RawTarget): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    let received = Buffer.alloc(0);
    const socket = net.connect({ host, port, localAddress });
    const fail = (err: Error) => {
      socket.destroy();
      reject(new Error(`GET http://${host}:${port}${target}: ${err.message}`));
    };
    socket.setTimeout(TIMEOUT_MS, () => fail(new Error(`no answer in ${TIMEOUT_MS / 1000}s`)));
    socket.on('error', fail);
    socket.on('end', () => fail(new Error('connection closed before a whole answer')));
    socket.on('data', (chunk: Buffer) => {
      received = Buffer.concat([received, chunk]);
      try {
        const end = answerEnd(received);
        if (end < 0) return;
        socket.destroy();
        resolve(received.subarray(0, end));
      } catch (err) {
        fail(err as Error);
      }
    });
    socket.write(`GET ${target} HTTP/1.1\r\nHost: ${host}${port === 80 ? '' : `:${port}`}\r\nMetadata: true\r\n${close ? 'Connection: close\r\n' : ''}\r\n`);
  });
}

export function parseAnswer(bytes: Buffer): ParsedAnswer {
  const head = bytes.indexOf('\r\n\r\n');
  const [statusLine = '', ...lines] = bytes.subarray(0, head).toString('latin1').split('\r\n');
  const status = Number(/^HTTP\/1\.1 (\d{3}) /.exec(statusLine)?.[1] ?? 0);
  const headers = lines.map((line): [string, string] => {
    const colon = line.indexOf(':');
    return [line.slice(0, colon), line.slice(colon + 1).trim()];
  });
  return { status, headers, body: bytes.subarray(head + 4) };
}

/**
 * The answer with what depends on when it was made blanked, lengths kept: the
 * Date header, and the token's times (each daemon fetched its own token).
 */
export function timeless(bytes: Buffer): string {
  const blank = (text: string) => text.replace(/\d/g, '#');
  return bytes
    .toString('latin1')
    .replace(/\r\nDate: [^\r]*/i, blank)
    .replace(/"(expires_in|ext_expires_in|expires_on|not_before)":"\d+"/g, blank);
}
