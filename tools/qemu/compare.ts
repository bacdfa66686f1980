// Comparing guest memory dumps: pmemsave files from two QEMUs, or a dump and a region extracted from an image.
import { open } from 'node:fs/promises';

const MiB = 1024 * 1024;

/** pmemsave reads VGA memory and ROM shadows here, not pc.ram. */
export const LEGACY_WINDOW: [number, number] = [0xa0000, 0x100000];

/**
 * First differing byte of two files over [0, lengthBytes), ignoring the byte ranges in `skip`; -1 if none.
 * `at` shifts where each file is read from (byte `aOffset + i` of a against byte `bOffset + i` of b).
 */
export async function firstDifference(
  aPath: string,
  bPath: string,
  lengthBytes: number,
  skip: [number, number][],
  at: { aOffset?: number; bOffset?: number } = {},
): Promise<number> {
  const aOffset = at.aOffset ?? 0;
  const bOffset = at.bOffset ?? 0;
  const chunkBytes = 4 * MiB;
  const a = Buffer.alloc(chunkBytes);
  const b = Buffer.alloc(chunkBytes);
  const fa = await open(aPath, 'r');
  const fb = await open(bPath, 'r');
  try {
    for (let pos = 0; pos < lengthBytes; pos += chunkBytes) {
      const n = Math.min(chunkBytes, lengthBytes - pos);
      const [ra, rb] = await Promise.all([fa.read(a, 0, n, aOffset + pos), fb.read(b, 0, n, bOffset + pos)]);
      if (ra.bytesRead !== n) throw new Error(`${aPath}: short read at ${pos} (${ra.bytesRead} of ${n})`);
      if (rb.bytesRead !== n) throw new Error(`${bPath}: short read at ${pos} (${rb.bytesRead} of ${n})`);
      // Zero the skipped ranges in both copies so they compare equal.
      for (const [s, e] of skip) {
        const from = Math.max(s, pos) - pos;
        const to = Math.min(e, pos + n) - pos;
        if (from < to) {
          a.fill(0, from, to);
          b.fill(0, from, to);
        }
      }
      if (Buffer.compare(a.subarray(0, n), b.subarray(0, n)) !== 0) {
        for (let i = 0; i < n; i++) if (a[i] !== b[i]) return pos + i;
      }
    }
    return -1;
  } finally {
    await fa.close();
    await fb.close();
  }
}
