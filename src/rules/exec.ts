// Runs the rule tools (iptables-restore, nft, conntrack) with stdin and a timeout.
import { spawn } from 'node:child_process';
import { accessSync, constants } from 'node:fs';
import path from 'node:path';
import { NmiError, codes } from '../errors/errors.js';

export interface ExecResult {
  code: number;
  stdout: string;
  stderr: string;
}

export function exec(file: string, args: readonly string[], input = '', timeoutMs = 30_000): Promise<ExecResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, { stdio: ['pipe', 'pipe', 'pipe'], timeout: timeoutMs });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.on('error', (err) => reject(new NmiError(codes.COMMAND_FAILED, `${file}: ${err.message}`, { cause: err })));
    child.on('close', (code, signal) => resolve({ code: code ?? (signal ? 128 : 1), stdout, stderr }));
    child.stdin.on('error', () => {}); // a tool that exits early closes its stdin; the exit code tells why
    child.stdin.end(input);
  });
}

/** Like exec, but a non-zero exit becomes an NmiError with the tool's first error line. */
export async function execOk(file: string, args: readonly string[], input = '', code: NmiError['code'] = codes.COMMAND_FAILED): Promise<string> {
  const result = await exec(file, args, input);
  if (result.code !== 0) {
    const why = result.stderr.trim().split('\n')[0] || `exit ${result.code}`;
    throw new NmiError(code, `${file} ${args.join(' ')}: ${why}`);
  }
  return result.stdout;
}

/** The absolute path of an executable in PATH, or undefined. */
export function which(name: string, envPath = process.env.PATH ?? ''): string | undefined {
  for (const dir of envPath.split(':')) {
    if (!dir) continue;
    const candidate = path.join(dir, name);
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // not here
    }
  }
  return undefined;
}
