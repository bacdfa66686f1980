// A small command-line parser: flags are declared per command; every mistake is a SnapPipeError('USAGE') naming it.
import { SnapPipeError } from '../errors.js';
import { printable } from '../format/text.js';

export type FlagKind = 'bool' | 'value' | 'optional-value';

export interface FlagSpec {
  kind: FlagKind;
  /** One line for --help. */
  help: string;
  /** Shown in --help as the value's name. */
  valueName?: string;
}

export interface Parsed {
  flags: Map<string, string | true>;
  positionals: string[];
}

export function parseArgs(command: string, argv: string[], spec: Record<string, FlagSpec>): Parsed {
  const flags = new Map<string, string | true>();
  const positionals: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--') {
      for (let k = i + 1; k < argv.length; k++) positionals.push(argv[k]); // a loop: argv may be long
      break;
    }
    if (!arg.startsWith('-') || arg === '-') {
      positionals.push(arg);
      continue;
    }
    const eq = arg.indexOf('=');
    const name = (eq >= 0 ? arg.slice(0, eq) : arg).replace(/^--?/, '');
    const s = spec[name];
    if (!s) throw new SnapPipeError('USAGE', `${command}: unknown option ${arg.slice(0, eq >= 0 ? eq : undefined)} (see snap-pipe ${command} --help)`);
    if (flags.has(name)) throw new SnapPipeError('USAGE', `${command}: --${name} given twice`);
    if (s.kind === 'bool') {
      if (eq >= 0) throw new SnapPipeError('USAGE', `${command}: --${name} takes no value`);
      flags.set(name, true);
    } else if (s.kind === 'optional-value') {
      flags.set(name, eq >= 0 ? arg.slice(eq + 1) : true);
    } else {
      let value: string | undefined;
      if (eq >= 0) value = arg.slice(eq + 1);
      else if (i + 1 < argv.length) value = argv[++i];
      if (value === undefined || value === '') {
        throw new SnapPipeError('USAGE', `${command}: --${name} needs a value (${s.valueName ?? 'VALUE'})`);
      }
      flags.set(name, value);
    }
  }
  return { flags, positionals };
}

const UNITS: Record<string, number> = { '': 1, k: 1 << 10, m: 1 << 20, g: 1 << 30, t: 2 ** 40 };

/** "64M", "64MiB", "1G", "1048576" -> bytes. */
export function parseSize(command: string, flag: string, text: string): number {
  const m = /^(\d+)\s*([kmgt]?)(i?b)?$/i.exec(text.trim());
  if (!m) throw new SnapPipeError('USAGE', `${command}: --${flag} ${text}: not a size (try 64M or 1G)`);
  const bytes = Number(m[1]) * UNITS[m[2].toLowerCase()];
  if (!Number.isSafeInteger(bytes)) throw new SnapPipeError('USAGE', `${command}: --${flag} ${text}: too large`);
  return bytes;
}

export function parseInteger(command: string, flag: string, text: string, min: number, max: number): number {
  if (!/^\d+$/.test(text)) throw new SnapPipeError('USAGE', `${command}: --${flag} ${text}: not a whole number`);
  const n = Number(text);
  if (n < min || n > max) throw new SnapPipeError('USAGE', `${command}: --${flag} ${text}: must be from ${min} to ${max}`);
  return n;
}

/** The value of the whole-number flag --flag (checked as parseInteger does), or `fallback` when it was not given. */
export function integerFlag(command: string, flags: Map<string, string | true>, flag: string, min: number, max: number, fallback: number): number {
  const value = flags.get(flag);
  return value === undefined ? fallback : parseInteger(command, flag, value as string, min, max);
}

export function formatHelp(usage: string, about: string, spec: Record<string, FlagSpec>): string {
  const rows = Object.entries(spec).map(([name, s]) => {
    const left =
      s.kind === 'bool' ? `--${name}` : s.kind === 'optional-value' ? `--${name}[=${s.valueName ?? 'VALUE'}]` : `--${name} ${s.valueName ?? 'VALUE'}`;
    return [left, s.help] as const;
  });
  const width = Math.max(...rows.map(([l]) => l.length)) + 2;
  return [`usage: ${usage}`, '', about, '', 'options:', ...rows.map(([l, h]) => `  ${l.padEnd(width)}${h}`), ''].join('\n');
}

/** The one IMG argument of a command. */
export function onePath(command: string, positionals: string[]): string {
  if (positionals.length === 0) throw new SnapPipeError('USAGE', `${command}: missing IMG (see snap-pipe ${command} --help)`);
  if (positionals.length > 1) throw new SnapPipeError('USAGE', `${command}: unexpected argument '${positionals[1]}'`);
  return positionals[0];
}

/** --io uring|sync; 'auto' (uring where io_uring works) when not given. */
export function parseIo(command: string, value: string | true | undefined): 'uring' | 'sync' | 'auto' {
  const io = value ?? 'auto';
  if (io !== 'uring' && io !== 'sync' && io !== 'auto') throw new SnapPipeError('USAGE', `${command}: --io ${String(io)}: must be uring or sync`);
  return io;
}

/** A bad command line: one line, exit 2 (main.ts). */
export function usage(msg: string): never {
  throw new SnapPipeError('USAGE', msg);
}

/** sockaddr_un's sun_path holds 108 bytes, the NUL included. */
const UNIX_PATH_BYTES_MAX = 107;

/**
 * The path of a `unix:PATH` flag value (save --listen, load --connect); anything else is a usage error, its line
 * starting with `what` (the flag, with its command where the command says so).
 */
export function unixSocketPath(what: string, spec: string | true): string {
  if (typeof spec !== 'string' || !spec.startsWith('unix:') || spec.length === 'unix:'.length) {
    throw new SnapPipeError('USAGE', `${what} takes unix:PATH (got ${printable(String(spec))})`);
  }
  const path = spec.slice('unix:'.length);
  if (Buffer.byteLength(path) > UNIX_PATH_BYTES_MAX) {
    throw new SnapPipeError('USAGE', `${what}: ${printable(path)} is longer than a unix socket path may be (${UNIX_PATH_BYTES_MAX} bytes)`);
  }
  return path;
}
