// CRC-32C and batched copies within one buffer: through the fastmem addon (native/fastmem.c) when it is built, else
// in JavaScript (same results, several times slower). Both are used on the hot paths of save (coalescer, writer),
// load and verify; the image's cluster checksums are CRC-32C from format version 2 on.
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

export const FASTMEM_ADDON_PATH = fileURLToPath(new URL('../../build/Release/fastmem.node', import.meta.url));

interface FastmemAddon {
  crc32c(view: ArrayBufferView, offset: number, length: number, seed?: number): number;
  crc32cSoftware(view: ArrayBufferView, offset: number, length: number, seed?: number): number;
  copyRanges(view: ArrayBufferView, ops: Float64Array, count: number): void;
  zero(view: ArrayBufferView, offset: number, length: number): void;
  crc32cZeros(seed: number, length: number): number;
  adviseHugePages(view: ArrayBufferView, offset: number, length: number): number;
  preallocate(fd: number, offset: number, length: number): number;
  readonly hardwareCrc: boolean;
}

function load(): FastmemAddon | undefined {
  if (process.env.SNAP_PIPE_NO_FASTMEM === '1' || !existsSync(FASTMEM_ADDON_PATH)) return undefined;
  try {
    return createRequire(import.meta.url)(FASTMEM_ADDON_PATH) as FastmemAddon;
  } catch {
    return undefined;
  }
}

/** The addon, or undefined when it is not built (or SNAP_PIPE_NO_FASTMEM=1, which tests use to run the fallback). */
export const fastmemAddon: FastmemAddon | undefined = load();

/** How crc32c() runs here: 'hardware' (SSE4.2 instruction), 'native' (C tables) or 'javascript'. */
export const crc32cImplementation: 'hardware' | 'native' | 'javascript' = fastmemAddon
  ? fastmemAddon.hardwareCrc
    ? 'hardware'
    : 'native'
  : 'javascript';

// ---- JavaScript CRC-32C (slicing by 4) --------------------------------------------------------------------------

const POLY = 0x82f63b78;
let tables: Uint32Array[] | undefined;

function jsTables(): Uint32Array[] {
  if (tables) return tables;
  const t = [0, 1, 2, 3].map(() => new Uint32Array(256));
  for (let b = 0; b < 256; b++) {
    let c = b;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ POLY : c >>> 1;
    t[0][b] = c >>> 0;
  }
  for (let b = 0; b < 256; b++) {
    for (let k = 1; k < 4; k++) t[k][b] = ((t[k - 1][b] >>> 8) ^ t[0][t[k - 1][b] & 0xff]) >>> 0;
  }
  tables = t;
  return t;
}

/** CRC-32C in JavaScript: the fallback, and an independent implementation for testing the addon. */
export function crc32cJs(bytes: Uint8Array, seed = 0): number {
  const [t0, t1, t2, t3] = jsTables();
  let crc = ~seed;
  const n = bytes.length;
  let i = 0;
  for (; i + 4 <= n; i += 4) {
    crc ^= bytes[i] | (bytes[i + 1] << 8) | (bytes[i + 2] << 16) | (bytes[i + 3] << 24);
    crc = t3[crc & 0xff] ^ t2[(crc >>> 8) & 0xff] ^ t1[(crc >>> 16) & 0xff] ^ t0[crc >>> 24];
  }
  for (; i < n; i++) crc = (crc >>> 8) ^ t0[(crc ^ bytes[i]) & 0xff];
  return ~crc >>> 0;
}

/** CRC-32C (Castagnoli) of `bytes`, continuing from `seed` (the CRC of what came before); unsigned. */
export function crc32c(bytes: Uint8Array, seed = 0): number {
  if (fastmemAddon) return fastmemAddon.crc32c(bytes, 0, bytes.length, seed);
  return crc32cJs(bytes, seed);
}

const ZERO_PAGE = new Uint8Array(4096);

/** CRC-32C of `length` zero bytes continuing from `seed`, without reading memory (a table shift per 4 KiB). */
export function crc32cZeros(seed: number, length: number): number {
  if (fastmemAddon) return fastmemAddon.crc32cZeros(seed, length);
  let crc = seed;
  for (; length >= ZERO_PAGE.length; length -= ZERO_PAGE.length) crc = crc32cJs(ZERO_PAGE, crc);
  return crc32cJs(ZERO_PAGE.subarray(0, length), crc);
}

/**
 * CRC-32C of `pages` pages of `pageBytes` each from bytes[base], where only the pages for which has(p) holds count
 * with their bytes and the others as zeros (not read): a cluster as it is on disk when only some of its pages are
 * written (the coalescer's carried pages, the writer's old content).
 */
export function crc32cOfPages(bytes: Uint8Array, base: number, pageBytes: number, pages: number, has: (p: number) => boolean): number {
  let crc = 0;
  let zeros = 0;
  for (let p = 0; p < pages; p++) {
    if (!has(p)) {
      zeros += pageBytes;
      continue;
    }
    if (zeros > 0) crc = crc32cZeros(crc, zeros);
    zeros = 0;
    const at = base + p * pageBytes;
    crc = crc32c(bytes.subarray(at, at + pageBytes), crc);
  }
  return zeros > 0 ? crc32cZeros(crc, zeros) : crc;
}

/** Sets bytes[start, end) to 0 (memset through the addon: V8 fills shared memory a byte at a time). */
export function zeroFill(bytes: Uint8Array, start: number, end: number): void {
  if (fastmemAddon && end > start) fastmemAddon.zero(bytes, start, end - start);
  else bytes.fill(0, start, end);
}

/**
 * Asks the kernel to back the whole 2 MiB areas of `bytes` with huge pages (transparent huge pages in "madvise" or
 * "always" mode; see native/fastmem.c for what it saves). Returns the bytes advised: 0 without the addon, when no
 * whole 2 MiB area fits, or when the kernel refuses. Only advice: the memory works the same either way.
 */
export function adviseHugePages(bytes: Uint8Array): number {
  return fastmemAddon ? fastmemAddon.adviseHugePages(bytes, 0, bytes.length) : 0;
}

/**
 * Allocates the file's blocks for [offset, offset + length) and extends it that far (fallocate, mode 0), so that
 * O_DIRECT writes there need no block allocation (see native/fastmem.c for what that is worth). Returns 0 when done,
 * else the errno (ENOSPC, EOPNOTSUPP on file systems without fallocate, ...), or -1 without the addon: the caller
 * decides what to do instead.
 */
export function preallocate(fd: number, offset: number, length: number): number {
  return fastmemAddon ? fastmemAddon.preallocate(fd, offset, length) : -1;
}

/**
 * Copies queued ranges within one buffer in one call: add() queues memmove(dst, src, length) (byte offsets into
 * `whole`), flush() performs every queued copy in order. Callers flush before reading any destination or reusing
 * any source. Without the addon, copies happen at once in add() (nothing is ever pending).
 */
export class RangeCopier {
  private readonly ops: Float64Array;
  private count = 0;

  constructor(
    private readonly whole: Uint8Array,
    private readonly capacity = 256,
  ) {
    this.ops = new Float64Array(capacity * 3);
  }

  get pending(): number {
    return this.count;
  }

  add(dst: number, src: number, length: number): void {
    if (!fastmemAddon) {
      this.whole.copyWithin(dst, src, src + length);
      return;
    }
    const i = this.count * 3;
    this.ops[i] = dst;
    this.ops[i + 1] = src;
    this.ops[i + 2] = length;
    if (++this.count === this.capacity) this.flush();
  }

  flush(): void {
    if (this.count === 0) return;
    fastmemAddon!.copyRanges(this.whole, this.ops, this.count);
    this.count = 0;
  }
}
