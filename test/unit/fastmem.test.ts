// The fastmem addon (CRC-32C, batched copies) against independent implementations: the hardware path, the addon's
// own table path and the JavaScript fallback must agree on every length, alignment and seed; copies must behave as
// memmove and refuse ranges outside the buffer before copying anything. A missing addon fails these tests (the
// project's setup builds it; it needs only a C compiler).
import { execFileSync } from 'node:child_process';
import { closeSync, fstatSync, mkdtempSync, openSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it, vi } from 'vitest';
import { crc32c, crc32cImplementation, crc32cJs, crc32cOfPages, crc32cZeros, fastmemAddon, preallocate, RangeCopier, zeroFill } from '../../src/native/fastmem.js';
import { alignedShared } from '../../src/native/memory.js';

function addon(): NonNullable<typeof fastmemAddon> {
  if (!fastmemAddon) throw new Error('build/Release/fastmem.node is not built (run node scripts/build-native.mjs)');
  return fastmemAddon;
}

/** Deterministic bytes in shared memory (the pipelines' buffers are shared). */
function bytes(n: number, seed: number): Uint8Array {
  const u = new Uint8Array(new SharedArrayBuffer(n));
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    u[i] = x & 0xff;
  }
  return u;
}

describe('crc32c', () => {
  it('matches the published check values', () => {
    const check = new TextEncoder().encode('123456789');
    expect(crc32cJs(check)).toBe(0xe3069283);
    expect(addon().crc32c(check, 0, 9)).toBe(0xe3069283);
    expect(addon().crc32cSoftware(check, 0, 9)).toBe(0xe3069283);
    // RFC 3720 (iSCSI) B.4: 32 bytes of zeros, of 0xff, ascending, descending.
    const zeros = new Uint8Array(32);
    const ones = new Uint8Array(32).fill(0xff);
    const up = Uint8Array.from({ length: 32 }, (_, i) => i);
    const down = Uint8Array.from({ length: 32 }, (_, i) => 31 - i);
    expect([zeros, ones, up, down].map((b) => crc32c(b))).toEqual([0x8a9136aa, 0x62a8ab43, 0x46dd794e, 0x113fdb5c]);
    expect(crc32c(new Uint8Array(0))).toBe(0);
  });

  it('this machine uses the CPU instruction (the speed the image format was chosen for)', () => {
    const hasSse42 = execFileSync('grep', ['-c', 'sse4_2', '/proc/cpuinfo'], { encoding: 'utf8' }).trim() !== '0';
    expect(crc32cImplementation).toBe(hasSse42 ? 'hardware' : 'native');
  });

  it('hardware, table and JavaScript paths agree on every length, offset and seed', () => {
    const mem = bytes(3 * 1024 * 1024 + 4096, 7);
    const a = addon();
    // Lengths around the lane sizes (3 x 8192, 3 x 256, 8) and a whole cluster, at odd offsets.
    const lengths = [0, 1, 7, 8, 9, 255, 767, 768, 769, 3 * 8192 - 1, 3 * 8192, 3 * 8192 + 769, 1 << 20, 3 << 20];
    for (const n of lengths) {
      for (const off of [0, 1, 3, 4096 - 5]) {
        const view = mem.subarray(off, off + n);
        const js = crc32cJs(view);
        expect(a.crc32c(mem, off, n), `length ${n} offset ${off}`).toBe(js);
        expect(a.crc32cSoftware(mem, off, n), `length ${n} offset ${off}`).toBe(js);
      }
    }
    // Continuing from a seed equals checksumming the concatenation.
    for (let k = 0; k < 200; k++) {
      const n = (k * 7919) % 100_000;
      const cut = (k * 104_729) % (n + 1);
      const whole = a.crc32c(mem, 11, n);
      expect(a.crc32c(mem, 11 + cut, n - cut, a.crc32c(mem, 11, cut))).toBe(whole);
      expect(crc32cJs(mem.subarray(11 + cut, 11 + n), crc32cJs(mem.subarray(11, 11 + cut)))).toBe(whole);
    }
  });

  it('crc32cZeros equals the CRC of that many zero bytes, from any seed', () => {
    const zeros = new Uint8Array(3 * 4096 + 100);
    for (const n of [0, 1, 4095, 4096, 4097, 3 * 4096 + 100]) {
      for (const seed of [0, 0xe3069283, 0xffffffff]) {
        expect(crc32cZeros(seed, n), `${n} zeros from ${seed}`).toBe(crc32cJs(zeros.subarray(0, n), seed));
      }
    }
  });

  it('refuses ranges outside the view and non-views', () => {
    const a = addon();
    const u = new Uint8Array(16);
    expect(() => a.crc32c(u, 10, 7)).toThrow(/outside the view/);
    expect(() => a.crc32c(u, -1, 1)).toThrow(/non-negative integers/);
    expect(() => a.crc32c(u, 0.5, 1)).toThrow(/non-negative integers/);
    expect(() => a.crc32c(u, 0, 1, 2 ** 32)).toThrow(/seed/);
    expect(() => a.crc32c({} as Uint8Array, 0, 1)).toThrow(/TypedArray or DataView/);
    // A view into the middle of a buffer: offsets count from the view, not the buffer.
    const inner = bytes(64, 3);
    expect(a.crc32c(inner.subarray(8, 40), 0, 32)).toBe(crc32cJs(inner.subarray(8, 40)));
  });
});

describe('crc32cOfPages', () => {
  it('equals the CRC of the pages with every page left out zeroed, whichever pages are left out', () => {
    const page = 4096;
    const src = bytes(16 * page + 512, 7);
    for (const pick of [() => true, () => false, (p: number) => p % 3 === 1, (p: number) => p === 0 || p === 15, (p: number) => p >= 5 && p < 9]) {
      const expected = new Uint8Array(16 * page);
      for (let p = 0; p < 16; p++) if (pick(p)) expected.set(src.subarray(512 + p * page, 512 + (p + 1) * page), p * page);
      expect(crc32cOfPages(src, 512, page, 16, pick)).toBe(crc32cJs(expected));
    }
  });
});

describe('zeroFill', () => {
  /** The zeroFill of a fresh copy of the module loaded with SNAP_PIPE_NO_FASTMEM=1: the JavaScript fallback. */
  async function fallbackZeroFill(): Promise<typeof zeroFill> {
    const before = process.env.SNAP_PIPE_NO_FASTMEM;
    process.env.SNAP_PIPE_NO_FASTMEM = '1';
    vi.resetModules();
    try {
      const m = await import('../../src/native/fastmem.js');
      expect(m.fastmemAddon, 'the fallback module loaded no addon').toBeUndefined();
      expect(m.crc32cImplementation).toBe('javascript');
      return m.zeroFill;
    } finally {
      if (before === undefined) delete process.env.SNAP_PIPE_NO_FASTMEM;
      else process.env.SNAP_PIPE_NO_FASTMEM = before;
      vi.resetModules();
    }
  }

  it('zeroes exactly the range, through the addon and without it', async () => {
    addon();
    const fallback = await fallbackZeroFill();
    expect(fallback).not.toBe(zeroFill);
    for (const [how, fill] of [['addon', zeroFill], ['JavaScript', fallback]] as const) {
      const mem = bytes(8192, 5);
      const want = mem.slice();
      want.fill(0, 100, 5000);
      fill(mem, 100, 5000);
      expect(Buffer.compare(mem, want), how).toBe(0);
      fill(mem, 10, 10); // empty range: nothing
      expect(Buffer.compare(mem, want), how).toBe(0);
      // A view into the middle of a buffer: offsets count from the view.
      const inner = bytes(64, 6);
      const innerWant = inner.slice();
      innerWant.fill(0, 12, 20);
      fill(inner.subarray(8), 4, 12);
      expect(Buffer.compare(inner, innerWant), how).toBe(0);
    }
    expect(() => addon().zero(bytes(8192, 5), 8000, 193)).toThrow(/outside the view/);
  });
});

describe('copyRanges / RangeCopier', () => {
  it('performs queued copies in order, as memmove (overlap allowed)', () => {
    const src = bytes(64 * 1024, 9);
    const mem = new Uint8Array(new SharedArrayBuffer(src.length));
    mem.set(src);
    const want = src.slice();
    const ops: [number, number, number][] = [
      [32768, 0, 4096],
      [100, 200, 1000], // overlapping, backwards
      [300, 100, 1000], // overlapping, forwards, reading what the previous copy wrote
      [0, 60000, 5536],
    ];
    for (const [d, s, n] of ops) want.copyWithin(d, s, s + n);
    const c = new RangeCopier(mem, 3);
    for (const [d, s, n] of ops) c.add(d, s, n);
    // capacity 3: the first three went out when the third was added.
    expect(c.pending).toBe(1);
    c.flush();
    expect(c.pending).toBe(0);
    expect(Buffer.compare(mem, want)).toBe(0);
  });

  it('copies whole pages into aligned memory (the non-temporal path) and odd ranges alike', () => {
    const bytesTotal = 4 << 20;
    const mem = new Uint8Array(alignedShared(bytesTotal), 0, bytesTotal); // page aligned, as the pipeline's
    mem.set(bytes(1 << 20, 11), 0);
    const want = mem.slice();
    const c = new RangeCopier(mem, 64);
    const ops: [number, number, number][] = [];
    // Pages from unaligned sources (8 bytes past each record header) to aligned slots, as the coalescer does.
    for (let i = 0; i < 200; i++) ops.push([(1 << 20) + i * 4096, 8 + i * 4104, 4096]);
    ops.push([(3 << 20) + 4096, 100, 1000]); // not whole 128-byte blocks: plain memmove
    ops.push([(3 << 20) + 3, 5000, 4096]); // unaligned destination: plain memmove
    for (const [d, s, n] of ops) {
      want.copyWithin(d, s, s + n);
      c.add(d, s, n);
    }
    c.flush();
    expect(Buffer.compare(mem, want)).toBe(0);
  });

  it('refuses a batch with any range outside the view, copying none of it', () => {
    const a = addon();
    const mem = bytes(8192, 4);
    const before = mem.slice();
    const ops = new Float64Array([0, 4096, 4096, 4096, 0, 4097]);
    expect(() => a.copyRanges(mem, ops, 2)).toThrow(/outside the view/);
    expect(Buffer.compare(mem, before)).toBe(0);
    expect(() => a.copyRanges(mem, new Float64Array([0, 1.5, 1]), 1)).toThrow(/not an integer/);
    expect(() => a.copyRanges(mem, ops, 3)).toThrow(/count exceeds ops/);
    expect(() => a.copyRanges(mem, new Int32Array(3) as unknown as Float64Array, 1)).toThrow(/Float64Array/);
  });
});

describe('adviseHugePages', () => {
  it('advises the whole 2 MiB areas of a buffer, keeps its bytes, and the kernel records the advice', async () => {
    const { readFileSync } = await import('node:fs');
    const MiB = 1 << 20;
    const mem = new Uint8Array(new WebAssembly.Memory({ initial: 160, maximum: 160, shared: true }).buffer); // 10 MiB
    for (let i = 0; i < mem.length; i += 4096) mem[i] = (i >>> 12) & 0xff;
    const advised = addon().adviseHugePages(mem, 0, mem.length);
    // 10 MiB hold four or five whole 2 MiB areas, depending on where the buffer starts.
    expect([8 * MiB, 10 * MiB]).toContain(advised);
    for (let i = 0; i < mem.length; i += 4096) expect(mem[i]).toBe((i >>> 12) & 0xff);
    // The advice shows as the "hg" flag on a mapping at least that large in /proc/self/smaps.
    const areas = readFileSync('/proc/self/smaps', 'utf8').split(/\n(?=[0-9a-f]+-[0-9a-f]+ )/);
    const flagged = areas.filter((a) => /\nVmFlags:.* hg/.test(a)).map((a) => Number(/\nSize:\s+(\d+) kB/.exec(a)![1]) * 1024);
    expect(Math.max(0, ...flagged)).toBeGreaterThanOrEqual(advised);
    // No whole 2 MiB area in 1 MiB, ranges outside the view refused.
    expect(addon().adviseHugePages(mem, 0, MiB)).toBe(0);
    expect(() => addon().adviseHugePages(mem, mem.length - 10, 11)).toThrow(/outside the view/);
  });
});

describe('preallocate', () => {
  it('allocates the blocks of a range and extends the file to it; errors come back as errno values', () => {
    const MiB = 1 << 20;
    const dir = mkdtempSync(join(tmpdir(), 'snap-pipe-prealloc-'));
    try {
      const fd = openSync(join(dir, 'f'), 'w+');
      try {
        expect(preallocate(fd, 0, 8 * MiB)).toBe(0);
        let st = fstatSync(fd);
        expect(st.size).toBe(8 * MiB);
        expect(st.blocks * 512).toBeGreaterThanOrEqual(8 * MiB); // allocated, not a sparse length
        expect(preallocate(fd, 8 * MiB, 4 * MiB)).toBe(0);
        st = fstatSync(fd);
        expect(st.size).toBe(12 * MiB);
        expect(st.blocks * 512).toBeGreaterThanOrEqual(12 * MiB);
      } finally {
        closeSync(fd);
      }
      const ro = openSync(join(dir, 'f'), 'r');
      try {
        expect(preallocate(ro, 0, 16 * MiB)).toBe(9); // EBADF: not open for writing
      } finally {
        closeSync(ro);
      }
      expect(() => addon().preallocate(-1, 0, MiB)).toThrow(/non-negative integers/);
      expect(() => addon().preallocate(0, 0, 0)).toThrow(/length above 0/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
