// `nmi <command> [flags]`: parses, dispatches, and turns errors into exit codes
// (0 clean stop, 1 runtime failure, 2 bad usage or config).
import { readFileSync } from 'node:fs';
import { isNmiError, codes, UsageError, messageOf } from '../errors/errors.js';
import { parseFlags, usage, type FlagSpecs } from '../config/flags.js';
import { runFlags, cleanupFlags, statusFlags, explainFlags, demoFlags, type RunConfig } from '../config/commands.js';
import { fixMallocThresholds } from '../lifecycle/malloc.js';
import { NODE_FLAGS, useNodeFlags } from '../lifecycle/node-flags.js';

interface Command {
  summary: string;
  flags: FlagSpecs;
  /** The one argument the command takes besides its flags, as its usage names it; the handler gets it as `target`. */
  positional?: string;
  /** V8's flags the command runs with: it re-executes itself with them, and fixes malloc's thresholds (lifecycle/malloc.ts), before loading anything else. */
  nodeFlags?: (values: never) => readonly string[];
  load: () => Promise<(values: never) => Promise<number>>;
}

const commands: Record<string, Command> = {
  run: {
    summary: 'The daemon: installs the redirect, answers pods\' token requests, keeps the rules repaired.',
    flags: runFlags,
    nodeFlags: (values: RunConfig) => NODE_FLAGS[values.server],
    load: async () => (await import('./run.js')).run,
  },
  cleanup: {
    summary: 'Removes every rule nmi may have installed, in every backend. Safe at any time; touches nothing else.',
    flags: cleanupFlags,
    load: async () => (await import('./cleanup.js')).cleanup,
  },
  status: {
    summary: 'Prints the installed rules with packet counters and, if a daemon answers on the probe address, its state.',
    flags: statusFlags,
    load: async () => (await import('./status.js')).status,
  },
  explain: {
    summary: 'Asks the running daemon (loopback only) why a pod of this node gets a token or does not: bindings, exceptions, identities, cached tokens, refusals.',
    flags: explainFlags,
    positional: '<namespace>/<pod>|<pod IP>',
    load: async () => (await import('./explain.js')).explainCommand,
  },
  demo: {
    summary: 'Builds a throwaway node and pod namespace, stand-in kubelet and IMDS, and fetches a token through 169.254.169.254. Needs root.',
    flags: demoFlags,
    load: async () => (await import('./demo.js')).demo,
  },
};

const topUsage = [
  'Usage: nmi <command> [flags]',
  '',
  'Commands:',
  ...Object.entries(commands).map(([name, c]) => `  ${name.padEnd(8)} ${c.summary}`),
  '',
  "Run 'nmi <command> --help' for a command's flags; 'nmi --version' for the versions of nmi and its runtime.",
].join('\n');

/** nmi's version and the runtime under it: what a bug report or a scanner's finding needs. */
function versionLine(): string {
  // dist/src/cli/main.js, beside package.json in the checkout and in the package's /usr/lib/nmi.
  const { version } = JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version: string };
  return `nmi ${version} (Node.js ${process.version}, ${process.platform}-${process.arch}, N-API ${process.versions.napi})`;
}

export async function main(argv: readonly string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === '--help' || name === '-h' || name === 'help') {
    process.stdout.write(`${topUsage}\n`);
    return name === undefined ? 2 : 0;
  }
  if (name === '--version') {
    process.stdout.write(`${versionLine()}\n`);
    return 0;
  }
  const command = commands[name];
  if (!command) {
    process.stderr.write(`nmi: unknown command "${name}"\n${topUsage}\n`);
    return 2;
  }
  try {
    const { help, values, positionals } = parseFlags(command.flags, rest, process.env, command.positional !== undefined);
    if (help) {
      process.stdout.write(`${usage(name, command.summary, command.flags, command.positional)}\n`);
      return 0;
    }
    if (command.positional && positionals.length !== 1) {
      throw new UsageError(`takes one argument, ${command.positional}; got ${positionals.length === 0 ? 'none' : positionals.join(' ')}`);
    }
    if (command.nodeFlags) {
      useNodeFlags(command.nodeFlags(values as never));
      const mallocProblem = fixMallocThresholds();
      if (mallocProblem) process.stderr.write(`nmi: malloc keeps its default thresholds (${mallocProblem})\n`);
    }
    const handler = await command.load();
    return await handler((command.positional ? { ...values, target: positionals[0] } : values) as never);
  } catch (err) {
    if (isNmiError(err, codes.USAGE)) {
      process.stderr.write(`nmi ${name}: ${err.message}\n`);
      return 2;
    }
    const code = isNmiError(err) ? ` [${err.code}]` : '';
    process.stderr.write(`nmi ${name}: ${messageOf(err)}${code}\n`);
    return 1;
  }
}
