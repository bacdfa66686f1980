// A small file system made by the test (tmpfs with a size limit), to see what happens when the disk fills up.
// Needs root, as CI has; without it the test fails with the reason (it does not skip).
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export interface SmallFs {
  dir: string;
  unmount(): void;
}

export function mountSmallFs(sizeMiB: number): SmallFs {
  if (process.getuid?.() !== 0) throw new Error('this test mounts a small tmpfs and needs root');
  const dir = mkdtempSync(join(tmpdir(), 'snap-pipe-smallfs-'));
  const r = spawnSync('mount', ['-t', 'tmpfs', '-o', `size=${sizeMiB}m`, 'tmpfs', dir], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`mount tmpfs on ${dir}: ${r.stderr || r.error?.message}`);
  return {
    dir,
    unmount() {
      spawnSync('umount', [dir]);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
