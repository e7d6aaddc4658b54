// Operational JSON logs (pino). Redaction is a second line of defence: code must
// never hand a token or secret to a logger in the first place.
import { pino, type Logger } from 'pino';
import pretty from 'pino-pretty';

export type { Logger };

export const redactPaths = [
  'access_token',
  '*.access_token',
  'token',
  '*.token',
  'clientPassword',
  '*.clientPassword',
  'secret',
  '*.secret',
  'authorization',
  '*.authorization',
  'headers.authorization',
];

export interface LogOptions {
  level: string;
  format: 'json' | 'text';
  destination?: NodeJS.WritableStream;
}

export function createLogger({ level, format, destination }: LogOptions): Logger {
  const options = { level, base: { name: 'nmi' }, redact: { paths: redactPaths, censor: '[redacted]' } };
  if (format === 'text') {
    return pino(options, pretty({ sync: true, colorize: false, destination: destination ?? process.stderr }));
  }
  return pino(options, destination ?? pino.destination({ dest: 2, sync: true }));
}

/** For commands that should stay quiet unless something breaks. */
export const silentLogger: Logger = pino({ level: 'silent' });
