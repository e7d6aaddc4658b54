// A real nmi logger whose JSON lines the test can read back.
import { Writable } from 'node:stream';
import { createLogger, type Logger } from '../../src/log/logger.js';

export interface LogLine {
  level: number;
  msg: string;
  [key: string]: unknown;
}

export function captureLogs(level = 'debug'): { log: Logger; lines: () => LogLine[] } {
  const chunks: string[] = [];
  const destination = new Writable({
    write(chunk, _encoding, done) {
      chunks.push(String(chunk));
      done();
    },
  });
  return {
    log: createLogger({ level, format: 'json', destination }),
    lines: () =>
      chunks
        .join('')
        .split('\n')
        .filter(Boolean)
        .map((l) => JSON.parse(l) as LogLine),
  };
}
