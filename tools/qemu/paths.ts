// Where things are: snap-pipe's repository (its build, the test guest, cached QEMUs) and executables in PATH.
import { accessSync, constants, existsSync, readFileSync } from 'node:fs';
import { delimiter, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

let rootCached: string | null = null;

/** The repository root: the nearest directory above this module holding snap-pipe's package.json. */
export function repoRoot(): string {
  if (rootCached) return rootCached;
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let depth = 0; depth < 8; depth++) {
    const pkg = join(dir, 'package.json');
    if (existsSync(pkg)) {
      try {
        if ((JSON.parse(readFileSync(pkg, 'utf8')) as { name?: string }).name === 'snap-pipe') {
          rootCached = dir;
          return dir;
        }
      } catch {
        // not ours; keep walking up
      }
    }
    const up = dirname(dir);
    if (up === dir) break;
    dir = up;
  }
  throw new Error(`cannot find snap-pipe's repository root above ${fileURLToPath(import.meta.url)}`);
}

/** Finds an executable in PATH; throws naming the Debian package when it is missing. */
export function findExecutable(name: string, debianPackage: string): string {
  for (const dir of (process.env.PATH ?? '/usr/bin:/bin').split(delimiter)) {
    if (!dir) continue;
    const candidate = join(dir, name);
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // keep looking
    }
  }
  throw new Error(`${name} not found in PATH: install the Debian package ${debianPackage}`);
}

