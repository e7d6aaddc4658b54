// The request bytes the native server defers to TypeScript, read as node:http
// reads them (llhttp's acceptance, node's req.headers), so the request core sees
// the same request from either server.
import http from 'node:http';
import type { RequestHeaders } from './request.js';

export interface RawRequest {
  method: string;
  target: string;
  /** name, value, name, value... as node's rawHeaders. */
  rawHeaders: string[];
  /** As node's req.headers: lower-case names, duplicates joined or dropped as node does. */
  headers: RequestHeaders;
  body: Buffer;
  keepAlive: boolean;
}

// The target as llhttp accepts it: no control characters, no space (a raw NUL once slipped through).
const REQUEST_LINE = /^([A-Z]+) ([^\x00-\x20\x7f]+) HTTP\/1\.([01])$/;
const HEADER_LINE = /^([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*(.*?)[ \t]*$/;
const BAD_VALUE = /[\x00-\x08\x0a-\x1f\x7f]/;
/** Headers node keeps only the first of (its matchKnownFields). */
const SINGLE = new Set([
  'content-type', 'content-length', 'user-agent', 'referer', 'host', 'authorization', 'proxy-authorization',
  'if-modified-since', 'if-unmodified-since', 'from', 'location', 'max-forwards', 'retry-after', 'etag',
  'last-modified', 'server', 'age', 'expires',
]);
const METHODS = new Set(http.METHODS);

/** One complete request as the native side framed it; 'malformed' where llhttp would refuse it. */
export function parseRawRequest(raw: Buffer): RawRequest | 'malformed' | 'no-host' {
  const headEnd = raw.indexOf('\r\n\r\n');
  if (headEnd < 0) return 'malformed';
  const [requestLine = '', ...lines] = raw.subarray(0, headEnd).toString('latin1').split('\r\n');
  const line = REQUEST_LINE.exec(requestLine);
  if (!line || !METHODS.has(line[1]!)) return 'malformed';
  const [, method, target, minor] = line as unknown as [string, string, string, string];
  const rawHeaders: string[] = [];
  const headers: Record<string, string | string[]> = {};
  for (const text of lines) {
    const header = HEADER_LINE.exec(text);
    if (!header || BAD_VALUE.test(header[2]!)) return 'malformed';
    const [, name, value] = header as unknown as [string, string, string];
    rawHeaders.push(name, value);
    addHeader(headers, name.toLowerCase(), value);
  }
  if (minor === '1' && headers['host'] === undefined) return 'no-host';
  const connection = String(headers['connection'] ?? '').toLowerCase().split(',').map((t) => t.trim());
  const keepAlive = minor === '1' ? !connection.includes('close') : connection.includes('keep-alive') && !connection.includes('close');
  return { method, target, rawHeaders, headers, body: raw.subarray(headEnd + 4), keepAlive };
}

function addHeader(headers: Record<string, string | string[]>, name: string, value: string): void {
  const seen = headers[name];
  if (seen === undefined) headers[name] = name === 'set-cookie' ? [value] : value;
  else if (name === 'set-cookie') (seen as string[]).push(value);
  else if (SINGLE.has(name)) return;
  else headers[name] = `${seen as string}${name === 'cookie' ? '; ' : ', '}${value}`;
}
