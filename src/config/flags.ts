// Flag parsing shared by every command: util.parseArgs for the tokens, then the
// contract's precedence, flag > NMI_* environment variable > default, and one
// parser per flag so a bad value names its flag.
import { parseArgs } from 'node:util';
import { UsageError, messageOf } from '../errors/errors.js';
import type { Parser } from './values.js';

export interface FlagSpec<T> {
  parse: Parser<T>;
  /** The default as the operator would type it; a function for computed defaults, undefined for none. */
  default?: string | (() => string | undefined);
  help: string;
  /** A flag that takes no value (`--json`); `--flag=false` is accepted too. */
  boolean?: boolean;
}

export type FlagSpecs = Record<string, FlagSpec<unknown>>;

type Camel<S extends string> = S extends `${infer A}-${infer B}` ? `${A}${Capitalize<Camel<B>>}` : S;

/** The parsed values: `--node-ip` becomes `nodeIp`; a flag without default may be undefined. */
export type Parsed<S extends FlagSpecs> = {
  [K in keyof S & string as Camel<K>]: S[K]['default'] extends string | (() => string)
    ? ReturnType<S[K]['parse']>
    : ReturnType<S[K]['parse']> | undefined;
};

/** Keeps the literal type of `default`, which decides whether the parsed value can be undefined. */
export function flag<const S extends FlagSpec<any>>(spec: S): S {
  return spec;
}

export function envName(name: string): string {
  return `NMI_${name.replace(/-/g, '_').toUpperCase()}`;
}

function camel(name: string): string {
  return name.replace(/-([a-z])/g, (_, c: string) => c.toUpperCase());
}

export interface ParseResult<S extends FlagSpecs> {
  help: boolean;
  values: Parsed<S>;
  /** The arguments that are not flags; only a command taking one (`nmi explain <pod>`) allows them. */
  positionals: string[];
}

export function parseFlags<S extends FlagSpecs>(
  specs: S,
  argv: readonly string[],
  env: NodeJS.ProcessEnv = process.env,
  allowPositionals = false,
): ParseResult<S> {
  // parseArgs cannot give a boolean a value, yet `--force-namespaced=false` is how
  // Go-flag users spell it: take those out first.
  const explicit = new Map<string, string>();
  const rest: string[] = [];
  for (const arg of argv) {
    const m = /^--([a-z0-9-]+)=(.*)$/s.exec(arg);
    if (m && specs[m[1] as string]?.boolean) explicit.set(m[1] as string, m[2] as string);
    else rest.push(arg);
  }
  const options: Record<string, { type: 'string' | 'boolean' }> = { help: { type: 'boolean' } };
  for (const [name, spec] of Object.entries(specs)) options[name] = { type: spec.boolean ? 'boolean' : 'string' };
  let parsed: ReturnType<typeof parseArgs>;
  try {
    parsed = parseArgs({ args: [...rest], options, strict: true, allowPositionals });
  } catch (err) {
    // parseArgs explains itself over several lines; operators get the first.
    throw new UsageError(messageOf(err).split('\n')[0]!.replace(/\. To specify.*$/, ''));
  }
  const values: Record<string, unknown> = {};
  for (const [name, spec] of Object.entries(specs)) {
    const given = parsed.values[name];
    let raw: string | undefined;
    if (explicit.has(name)) raw = explicit.get(name);
    else if (given !== undefined) raw = String(given);
    else if (env[envName(name)] !== undefined) raw = env[envName(name)];
    else raw = typeof spec.default === 'function' ? spec.default() : spec.default;
    values[camel(name)] = raw === undefined ? undefined : spec.parse(raw, name);
  }
  return { help: parsed.values.help === true, values: values as Parsed<S>, positionals: parsed.positionals };
}

export function usage(command: string, summary: string, specs: FlagSpecs, positional?: string): string {
  const lines = [`Usage: nmi ${command}${positional ? ` ${positional}` : ''} [flags]`, '', summary, ''];
  const entries = Object.entries(specs);
  if (entries.length > 0) lines.push('Flags (each also read from NMI_<FLAG>, a flag beats its variable):');
  for (const [name, spec] of entries) {
    // An empty default is an empty list: say so rather than print "[]".
    const def = typeof spec.default === 'string' ? ` [${spec.default === '' ? 'none' : spec.default}]` : '';
    lines.push(`  --${name}${spec.boolean ? '' : ' VALUE'}${def}`, `      ${spec.help} (${envName(name)})`);
  }
  lines.push('  --help', '      this text');
  return lines.join('\n');
}
