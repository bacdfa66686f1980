// Which QEMU runs a guest: the machine's own (Debian 12: 7.2), or one unpacked under .cache/qemu/ by
// scripts/qemu.sh (10.0 from bookworm-backports, 5.2 from bullseye), or one a user names with --qemu / SNAP_PIPE_QEMU.
// The end-to-end tests run once per entry of testedQemus(); the demo and the benches take the user's choice.
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { findExecutable, repoRoot } from './paths.js';

export interface Qemu {
  /** e.g. 'QEMU 7.2.22': what tests and reports print. */
  label: string;
  major: number;
  minor: number;
  micro: number;
  /** qemu-system-x86_64 */
  system: string;
  /** The qemu-img of the same version. */
  img: string;
  /** Arguments naming its firmware folders (-L DIR ...); empty for an installed QEMU, which knows its own. */
  firmwareArgs: string[];
  /**
   * Environment for it: an unpacked QEMU gets QEMU_MODULE_DIR naming its own modules, or it would load the
   * installed QEMU's (util/module.c refuses modules of another build), and LD_LIBRARY_PATH naming the folder of
   * libraries Debian 12 lacks, when it needs one (5.2: only those libraries are there, as snap-pipe inherits it).
   */
  env: Record<string, string>;
}

/** The QEMU folders scripts/qemu.sh fills, by name. */
export const CACHED_QEMUS = ['10.0', '5.2'] as const;
export type CachedQemuName = (typeof CACHED_QEMUS)[number];

const known = new Map<string, Qemu>();

/** The QEMU installed on the machine (PATH); throws naming the Debian package when it is missing. */
export function systemQemu(): Qemu {
  return describe(findExecutable('qemu-system-x86_64', 'qemu-system-x86'), findExecutable('qemu-img', 'qemu-utils'), [], {});
}

/** A QEMU unpacked under .cache/qemu/NAME/root by scripts/qemu.sh; throws (never skips) when it is missing. */
export function cachedQemu(name: CachedQemuName): Qemu {
  const dir = join(repoRoot(), '.cache', 'qemu', name);
  const system = join(dir, 'root', 'usr', 'bin', 'qemu-system-x86_64');
  if (!existsSync(system)) throw new Error(`QEMU ${name} is missing (${system}): run 'bash scripts/qemu.sh ${name}' (npm test does)`);
  return unpacked(system, join(dir, 'lib'));
}

/** Every QEMU the end-to-end suites run against, oldest first: the machine's own and each cached one. */
export function testedQemus(): Qemu[] {
  return [systemQemu(), ...CACHED_QEMUS.map(cachedQemu)].sort((a, b) => a.major - b.major || a.minor - b.minor || a.micro - b.micro);
}

/**
 * The QEMU a user asked for: a path to a qemu-system-x86_64, or the name of a cached one ('10.0'); `choice`
 * undefined falls back to SNAP_PIPE_QEMU, then to the machine's own.
 */
export function chosenQemu(choice: string | undefined = process.env.SNAP_PIPE_QEMU): Qemu {
  if (!choice) return systemQemu();
  if ((CACHED_QEMUS as readonly string[]).includes(choice)) return cachedQemu(choice as CachedQemuName);
  const system = resolve(choice);
  if (!existsSync(system)) throw new Error(`--qemu ${choice}: no such file (give a qemu-system-x86_64 or one of: ${CACHED_QEMUS.join(', ')})`);
  return unpacked(system);
}

/**
 * A qemu-system-x86_64 at PREFIX/usr/bin (or PREFIX/bin): its qemu-img beside it, and its firmware folders
 * PREFIX/usr/share/{qemu,seabios} passed with -L when they exist (an unpacked package does not know where it is).
 */
function unpacked(system: string, libDir?: string): Qemu {
  const bin = dirname(system);
  const img = join(bin, 'qemu-img');
  if (!existsSync(img)) throw new Error(`${system}: no qemu-img beside it`);
  const share = join(dirname(bin), 'share');
  const firmwareArgs = ['qemu', 'seabios'].map((d) => join(share, d)).filter((d) => existsSync(d) && share !== '/usr/share');
  const modules = join(dirname(bin), 'lib', 'x86_64-linux-gnu', 'qemu');
  const env: Record<string, string> = existsSync(modules) && !modules.startsWith('/usr/lib/') ? { QEMU_MODULE_DIR: modules } : {};
  if (libDir && existsSync(libDir) && readdirSync(libDir).length > 0) env.LD_LIBRARY_PATH = libDir;
  return describe(system, img, firmwareArgs.flatMap((d) => ['-L', d]), env);
}

function describe(system: string, img: string, firmwareArgs: string[], env: Record<string, string>): Qemu {
  const cached = known.get(system);
  if (cached) return cached;
  const r = spawnSync(system, ['--version'], { encoding: 'utf8', timeout: 10_000, env: { ...process.env, ...env } });
  const m = /version (\d+)\.(\d+)\.(\d+)/.exec(r.stdout ?? '');
  if (r.status !== 0 || !m) {
    throw new Error(`${system} --version: ${r.error?.message ?? `exit ${r.status}`}: ${(r.stderr ?? '').trim().slice(0, 200)}`);
  }
  const [major, minor, micro] = [m[1], m[2], m[3]].map(Number);
  const q: Qemu = { label: `QEMU ${major}.${minor}.${micro}`, major, minor, micro, system, img, firmwareArgs, env };
  known.set(system, q);
  return q;
}

/** At least major.minor. */
export function qemuAtLeast(q: Qemu, major: number, minor: number): boolean {
  return q.major > major || (q.major === major && q.minor >= minor);
}

/** background-snapshot came in QEMU 6.0 (migration.c bg_migration_thread). */
export function hasBackgroundSnapshot(q: Qemu): boolean {
  return qemuAtLeast(q, 6, 0);
}

/** The i440fx machine type of a QEMU's own version, e.g. 'pc-i440fx-7.2' (for restoring across versions). */
export function i440fxMachine(q: Qemu): string {
  return `pc-i440fx-${q.major}.${q.minor}`;
}
