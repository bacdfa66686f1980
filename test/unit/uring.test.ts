// The io_uring addon and the two I/O backends, on real files with real io_uring: no mocks. A missing or unusable
// addon fails these tests (CI installs liburing-dev and builds it with scripts/build-native.mjs). Needs root for
// the tmpfs that runs out of space.
import { execFileSync, spawnSync } from 'node:child_process';
import { closeSync, constants as fsc, fstatSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeSync } from 'node:fs';
import { constants as osConstants, tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SnapPipeError } from '../../src/errors.js';
import { openIoBackend, type IoBackend, type IoBackendName } from '../../src/native/io.js';
import { UringRing, uringAvailable } from '../../src/native/uring.js';
import { alignedShared } from '../../src/native/memory.js';

const KiB = 1024;
const MiB = 1024 * KiB;

const dir = mkdtempSync(join(tmpdir(), 'snap-pipe-uring-')); // ext4 here: O_DIRECT works
const smallFs = join(dir, 'small-fs'); // a 2 MiB tmpfs, to run out of space
let smallFsMounted = false;

beforeAll(() => {
  mkdirSync(smallFs);
  const r = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', smallFs], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`mount -t tmpfs failed (these tests need root): ${r.stderr.trim()}`);
  smallFsMounted = true;
});

afterAll(() => {
  if (smallFsMounted) spawnSync('umount', [smallFs]);
  rmSync(dir, { recursive: true, force: true });
});

let fileCount = 0;
function openDirect(): number {
  return openSync(join(dir, `f${fileCount++}.bin`), fsc.O_RDWR | fsc.O_CREAT | fsc.O_TRUNC | fsc.O_DIRECT, 0o600);
}

/** Page-aligned memory filled with a seeded pseudo-random pattern. */
function patterned(bytes: number, seed: number): Uint8Array {
  const mem = new Uint8Array(alignedShared(bytes), 0, bytes);
  const words = new Uint32Array(mem.buffer, 0, bytes / 4);
  let x = seed | 1;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x;
  }
  return mem;
}

function random(seed: number): () => number {
  let x = seed | 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

function shuffle<T>(items: T[], seed: number): T[] {
  const rnd = random(seed);
  for (let i = items.length - 1; i > 0; i--) {
    const j = Math.floor(rnd() * (i + 1));
    [items[i], items[j]] = [items[j], items[i]];
  }
  return items;
}

interface Req {
  tag: number;
  pos: number; // file offset, also the memory offset
  len: number;
}

/** 1 MiB chunks and 4 KiB pages back to back, in shuffled order. */
function layout(chunks: number, pages: number, seed: number): { reqs: Req[]; bytes: number } {
  const reqs: Req[] = [];
  const stride = Math.floor((chunks + pages) / chunks);
  let pos = 0;
  let chunksLeft = chunks;
  for (let i = 0; i < chunks + pages; i++) {
    const chunk = chunksLeft > 0 && i % stride === 0;
    if (chunk) chunksLeft--;
    const len = chunk ? MiB : 4 * KiB;
    reqs.push({ tag: 1000 + i, pos, len });
    pos += len;
  }
  return { reqs: shuffle(reqs, seed), bytes: pos };
}

/** Runs every request keeping the queue full (io_uring-cp's loop); returns tag -> bytes. */
function runAll(b: IoBackend, op: 'write' | 'read', fd: number, mem: Uint8Array, reqs: Req[]): Map<number, number> {
  const seen = new Map<number, number>();
  let next = 0;
  for (let rounds = 0; next < reqs.length || b.inFlight > 0; rounds++) {
    if (rounds > 2 * reqs.length + 10) throw new Error('runAll: no progress');
    while (next < reqs.length && b.inFlight < b.queueDepth) {
      const r = reqs[next++];
      b[op](fd, mem, r.pos, r.len, r.pos, r.tag);
    }
    for (const c of b.reap(1)) {
      expect(seen.has(c.tag)).toBe(false);
      seen.set(c.tag, c.bytes);
    }
  }
  return seen;
}

function catchError(f: () => unknown): Error & { code?: string } {
  try {
    f();
  } catch (err) {
    return err as Error & { code?: string };
  }
  throw new Error('expected an error');
}

function mkfifo(): number {
  const path = join(dir, `fifo${fileCount++}`);
  execFileSync('mkfifo', [path]);
  return openSync(path, 'r+'); // O_RDWR: does not wait for a peer
}

describe('io_uring addon', () => {
  it('is built and can create a ring here', () => {
    expect(uringAvailable()).toEqual({ ok: true });
  });

  it.each([1, 64])('writes then reads back pattern data at depth %i (O_DIRECT, page-aligned shared memory)', (depth) => {
    const count = 256;
    const reqBytes = 64 * KiB;
    const src = patterned(count * reqBytes, 7 + depth);
    const dst = new Uint8Array(alignedShared(count * reqBytes), 0, count * reqBytes);
    const fd = openDirect();
    const ring = new UringRing(depth);
    const out = new Int32Array(2 * depth);
    try {
      for (const op of ['write', 'read'] as const) {
        const seen = new Set<number>();
        let next = 0;
        while (seen.size < count) {
          while (next < count && ring.inFlight < depth) {
            const ok =
              op === 'write'
                ? ring.prepWrite(fd, src, next * reqBytes, reqBytes, next * reqBytes, next)
                : ring.prepRead(fd, dst, next * reqBytes, reqBytes, next * reqBytes, next);
            expect(ok).toBe(true);
            next++;
          }
          const n = ring.wait(1, out);
          expect(n).toBeGreaterThanOrEqual(1);
          for (let i = 0; i < n; i++) {
            expect(out[2 * i + 1]).toBe(reqBytes);
            seen.add(out[2 * i] >>> 0);
          }
        }
        expect(seen.size).toBe(count);
      }
      expect(Buffer.compare(src, dst)).toBe(0);
      expect(Buffer.compare(readFileSync(join(dir, `f${fileCount - 1}.bin`)), src)).toBe(0);
    } finally {
      ring.close();
      closeSync(fd);
    }
  });

  it('returns false instead of queueing past its depth, and submit() counts what it sent', () => {
    const mem = patterned(64 * KiB, 3);
    const fd = openDirect();
    const ring = new UringRing(4);
    const out = new Uint32Array(8);
    for (let i = 0; i < 4; i++) expect(ring.prepWrite(fd, mem, i * 4096, 4096, i * 4096, 0xfffffff0 + i)).toBe(true);
    expect(ring.prepWrite(fd, mem, 0, 4096, 0, 9)).toBe(false);
    expect(ring.queued).toBe(4);
    expect(ring.submit()).toBe(4);
    expect(ring.queued).toBe(0);
    let got = 0;
    while (got < 4) got += ring.wait(4 - got, out.subarray(2 * got));
    expect([...out].filter((_, i) => i % 2 === 0).sort()).toEqual([0xfffffff0, 0xfffffff1, 0xfffffff2, 0xfffffff3]);
    expect(ring.wait(0, out)).toBe(0); // nothing in flight: a peek returns at once
    ring.close();
    closeSync(fd);
  });

  it('completes requests out of submission order (a pipe read waits while file writes finish)', () => {
    const mem = patterned(MiB, 11);
    const fifo = mkfifo();
    const fd = openDirect();
    const ring = new UringRing(64);
    const out = new Int32Array(128);
    try {
      expect(ring.prepRead(fifo, mem, 0, 4096, 0, 999)).toBe(true); // first in, cannot finish yet
      const tags = shuffle(Array.from({ length: 63 }, (_, i) => i), 5);
      for (const t of tags) expect(ring.prepWrite(fd, mem, 4096 + t * 4096, 4096, t * 4096, t)).toBe(true);
      const got: number[] = [];
      while (got.length < 63) {
        const n = ring.wait(63 - got.length, out);
        for (let i = 0; i < n; i++) got.push(out[2 * i]);
      }
      expect(got.sort((a, b) => a - b)).toEqual(tags.sort((a, b) => a - b));
      expect(ring.inFlight).toBe(1);
      const sent = patterned(4096, 12);
      writeSync(fifo, sent);
      expect(ring.wait(1, out)).toBe(1);
      expect([out[0], out[1]]).toEqual([999, 4096]);
      expect(Buffer.compare(mem.subarray(0, 4096), sent)).toBe(0);
    } finally {
      ring.close(true);
      closeSync(fd);
      closeSync(fifo);
    }
  });

  it('refuses misaligned address, length and offset with a clear error, before the kernel sees them', () => {
    const mem = patterned(64 * KiB, 1);
    const fd = openDirect();
    const ring = new UringRing(4, { blockBytes: 512 });
    const offset = catchError(() => ring.prepWrite(fd, mem, 0, 4096, 513, 1));
    expect(offset.message).toBe('write of 4096 bytes at file offset 513: offset not a multiple of 512');
    expect(offset.code).toBe('ERR_URING_ALIGNMENT');
    expect(catchError(() => ring.prepRead(fd, mem, 0, 4000, 0, 1)).message).toBe(
      'read of 4000 bytes at file offset 0: length not a multiple of 512',
    );
    expect(catchError(() => ring.prepWrite(fd, mem, 16, 4096, 0, 1)).message).toMatch(
      /^write of 4096 bytes at file offset 0: buffer address 0x[0-9a-f]+ not a multiple of 512/,
    );
    // A plain SharedArrayBuffer view is checked by its real address, not by its offset in the buffer. Its data lies
    // wherever malloc put it (16-byte aligned, so sometimes 512-aligned by chance). Where: a view one byte in is
    // refused wherever the data lies (an odd address), and the refusal names the address. Take a buffer whose data
    // is not 512-aligned, so that offsets and addresses disagree both ways.
    const addressOf = (sab: Uint8Array): number => {
      const probe = catchError(() => ring.prepWrite(fd, sab, 1, 512, 0, 2)).message;
      const m = /buffer address 0x([0-9a-f]+) not a multiple of 512/.exec(probe);
      if (!m) throw new Error(`no address in: ${probe}`);
      return Number.parseInt(m[1], 16) - 1;
    };
    const kept: Uint8Array[] = [];
    let sab: Uint8Array;
    let base: number;
    do {
      sab = new Uint8Array(new SharedArrayBuffer(64 * KiB));
      kept.push(sab); // not freed and reused while we look for another
      base = addressOf(sab);
    } while (base % 512 === 0 && kept.length < 64);
    expect(base % 512, 'a SharedArrayBuffer whose data is not 512-aligned').not.toBe(0);
    const pad = 512 - (base % 512);
    // Offset 0 (a multiple of 512) at a misaligned address: refused, naming that address, nothing queued.
    expect(catchError(() => ring.prepWrite(fd, sab, 0, 512, 0, 2)).message).toBe(
      `write of 512 bytes at file offset 0: buffer address 0x${base.toString(16)} not a multiple of 512 ` +
        '(SharedArrayBuffer memory is not page aligned; use a shared WebAssembly.Memory)',
    );
    expect(ring.inFlight).toBe(0);
    // Offset `pad` (not a multiple of 512) at an aligned address: queued, and the kernel, which fails an O_DIRECT
    // write from a misaligned buffer with EINVAL, writes it.
    sab.set(patterned(4096, 3).subarray(0, 512), pad);
    expect(ring.prepWrite(fd, sab, pad, 512, 0, 2)).toBe(true);
    const done = new Int32Array(2);
    expect(ring.wait(1, done)).toBe(1);
    expect([...done]).toEqual([2, 512]);
    expect(readFileSync(`/proc/self/fd/${fd}`).equals(Buffer.from(sab.subarray(pad, pad + 512)))).toBe(true);
    expect(catchError(() => ring.prepWrite(fd, mem, 0, 4096, 4096, 1.5)).message).toMatch(/tag must be an integer/);
    expect(catchError(() => ring.prepWrite(fd, mem, 60 * KiB, 8192, 0, 1)).code).toBe('ERR_OUT_OF_RANGE');
    expect(ring.inFlight).toBe(0);
    ring.close();
    closeSync(fd);
  });

  it('close() refuses while requests are in flight, close(true) waits for them, and close is idempotent', () => {
    const mem = patterned(MiB, 2);
    const fd = openDirect();
    const ring = new UringRing(8);
    for (let i = 0; i < 8; i++) ring.prepWrite(fd, mem, i * 128 * KiB, 128 * KiB, i * 128 * KiB, i);
    ring.submit();
    const busy = catchError(() => ring.close());
    expect(busy.code).toBe('ERR_URING_BUSY');
    expect(busy.message).toMatch(/8 requests in flight/);
    ring.close(true);
    expect(ring.closed).toBe(true);
    expect(fstatSync(fd).size).toBe(MiB); // every write landed before the ring was freed
    ring.close();
    expect(catchError(() => ring.submit()).code).toBe('ERR_URING_CLOSED');
    closeSync(fd);
  });

  it('uses fixed files and fixed buffers when registered', () => {
    const src = patterned(MiB, 21);
    const dst = new Uint8Array(alignedShared(MiB), 0, MiB);
    const fd = openDirect();
    const ring = new UringRing(16);
    const out = new Int32Array(32);
    ring.registerFiles([fd]);
    ring.registerBuffers([src, dst]);
    for (let i = 0; i < 16; i++) ring.prepWrite(fd, src, i * 64 * KiB, 64 * KiB, i * 64 * KiB, i);
    for (let got = 0; got < 16; ) {
      const n = ring.wait(16 - got, out);
      for (let i = 0; i < n; i++) expect(out[2 * i + 1]).toBe(64 * KiB);
      got += n;
    }
    for (let i = 0; i < 16; i++) ring.prepRead(fd, dst, i * 64 * KiB, 64 * KiB, i * 64 * KiB, i);
    for (let got = 0; got < 16; ) got += ring.wait(16 - got, out);
    expect(Buffer.compare(src, dst)).toBe(0);
    ring.registerFiles([]);
    ring.registerBuffers([]);
    ring.close();
    closeSync(fd);
  });

  it('refuses to register too many files or buffers, or while requests are in flight', () => {
    const mem = patterned(64 * KiB, 22);
    const fd = openDirect();
    const ring = new UringRing(4);
    expect(catchError(() => ring.registerFiles(new Array<number>(65).fill(fd))).message).toBe('registerFiles: at most 64 fds');
    expect(catchError(() => ring.registerBuffers(new Array<Uint8Array>(17).fill(mem))).message).toBe('registerBuffers: at most 16 views');
    ring.prepWrite(fd, mem, 0, 4096, 0, 1);
    ring.submit();
    expect(catchError(() => ring.registerFiles([fd]))).toMatchObject({ code: 'ERR_URING_BUSY', message: 'registerFiles: 1 requests in flight' });
    expect(catchError(() => ring.registerBuffers([mem]))).toMatchObject({ code: 'ERR_URING_BUSY', message: 'registerBuffers: 1 requests in flight' });
    const out = new Int32Array(2);
    expect(ring.wait(1, out)).toBe(1);
    ring.registerFiles([fd]); // nothing in flight any more
    ring.close();
    closeSync(fd);
  });

  it('reports a failed request as a negative errno in its completion, and keeps working', () => {
    const mem = patterned(64 * KiB, 4);
    const path = join(dir, `ro${fileCount++}.bin`);
    closeSync(openSync(path, 'w'));
    const ro = openSync(path, 'r');
    const ring = new UringRing(2);
    const out = new Int32Array(4);
    ring.prepWrite(ro, mem, 0, 4096, 0, 7);
    expect(ring.wait(1, out)).toBe(1);
    expect([out[0], out[1]]).toEqual([7, -osConstants.errno.EBADF]);
    const fd = openDirect();
    ring.prepWrite(fd, mem, 0, 4096, 0, 8);
    expect(ring.wait(1, out)).toBe(1);
    expect([out[0], out[1]]).toEqual([8, 4096]);
    ring.close();
    closeSync(ro);
    closeSync(fd);
  });

  it('the uring backend finishes a short read by resubmitting the rest', () => {
    const { backend } = openIoBackend({ io: 'uring', queueDepth: 4 });
    const fifo = mkfifo();
    const mem = new Uint8Array(alignedShared(64 * KiB), 0, 64 * KiB);
    const sent = patterned(8192, 9);
    try {
      backend.read(fifo, mem, 0, 8192, 0, 5);
      expect(backend.reap(0)).toEqual([]); // submitted; the pipe is empty
      writeSync(fifo, sent, 0, 4096); // the read completes short, with 4096 bytes
      writeSync(fifo, sent, 4096, 4096);
      const done = backend.reap(1).map((c) => ({ ...c }));
      expect(done).toEqual([{ tag: 5, bytes: 8192 }]);
      expect(Buffer.compare(mem.subarray(0, 8192), sent)).toBe(0);
      expect((backend as unknown as { resubmits: number }).resubmits).toBeGreaterThanOrEqual(1);
    } finally {
      backend.close();
      closeSync(fifo);
    }
  });

  it('the uring backend completes requests out of order and maps them back to their tags', () => {
    const { backend } = openIoBackend({ io: 'uring', queueDepth: 8 });
    const fifo = mkfifo();
    const fd = openDirect();
    const mem = patterned(64 * KiB, 13);
    try {
      backend.read(fifo, mem, 0, 4096, 0, 100);
      for (let i = 1; i < 8; i++) backend.write(fd, mem, i * 4096, 4096, i * 4096, 100 + i);
      const first = backend.reap(7).map((c) => c.tag);
      expect(first.sort()).toEqual([101, 102, 103, 104, 105, 106, 107]);
      writeSync(fifo, mem, 4096, 4096);
      expect(backend.reap(1).map((c) => ({ ...c }))).toEqual([{ tag: 100, bytes: 4096 }]);
    } finally {
      backend.close();
      closeSync(fd);
      closeSync(fifo);
    }
  });
});

describe('openIoBackend', () => {
  it("'auto' picks io_uring here, without a note", () => {
    const { backend, note } = openIoBackend({ io: 'auto', queueDepth: 4 });
    expect(backend.name).toBe('uring');
    expect(note).toBeUndefined();
    backend.close();
  });

  it('validates its options', () => {
    expect(() => openIoBackend({ io: 'sync', queueDepth: 0 })).toThrow(/queueDepth/);
    expect(() => openIoBackend({ io: 'bogus' as IoBackendName, queueDepth: 4 })).toThrow(/io must be/);
    expect(() => openIoBackend({ io: 'sync', queueDepth: 4, blockBytes: 1000 })).toThrow(/power of two/);
  });
});

describe.each(['uring', 'sync'] as const)('%s backend contract', (io) => {
  it.each([1, 4, 64])('writes 1 MiB chunks and 4 KiB pages, then reads them back, at depth %i', (depth) => {
    const { backend } = openIoBackend({ io, queueDepth: depth });
    expect(backend.name).toBe(io);
    expect(backend.queueDepth).toBe(depth);
    const { reqs, bytes } = layout(8, 120, depth);
    const src = patterned(bytes, 31 + depth);
    const dst = new Uint8Array(alignedShared(bytes), 0, bytes);
    const fd = openDirect();
    const path = join(dir, `f${fileCount - 1}.bin`);
    try {
      const wrote = runAll(backend, 'write', fd, src, reqs);
      expect(wrote.size).toBe(reqs.length);
      for (const r of reqs) expect(wrote.get(r.tag)).toBe(r.len);
      expect(Buffer.compare(readFileSync(path), src)).toBe(0);
      const read = runAll(backend, 'read', fd, dst, shuffle([...reqs], 99));
      expect(read.size).toBe(reqs.length);
      expect(Buffer.compare(dst, src)).toBe(0);
      expect(backend.inFlight).toBe(0);
    } finally {
      backend.close();
      closeSync(fd);
    }
  });

  it('throws when the queue is full, and reap(min) returns at least min', () => {
    const { backend } = openIoBackend({ io, queueDepth: 4 });
    const mem = patterned(64 * KiB, 5);
    const fd = openDirect();
    for (let i = 0; i < 4; i++) backend.write(fd, mem, i * 4096, 4096, i * 4096, i);
    expect(backend.inFlight).toBe(4);
    expect(() => backend.write(fd, mem, 0, 4096, 0, 9)).toThrow(/queue is full \(4 in flight\)/);
    const got = backend.reap(3).map((c) => c.tag);
    expect(got.length).toBeGreaterThanOrEqual(3);
    if (got.length < 4) got.push(...backend.reap(1).map((c) => c.tag));
    expect(got.sort()).toEqual([0, 1, 2, 3]);
    expect(backend.inFlight).toBe(0);
    expect(backend.reap(5)).toEqual([]); // min is capped at what is in flight
    backend.close();
    backend.close();
    closeSync(fd);
  });

  it('refuses misaligned requests with a clear error', () => {
    const { backend } = openIoBackend({ io, queueDepth: 4 });
    const mem = patterned(64 * KiB, 6);
    const fd = openDirect();
    expect(() => backend.write(fd, mem, 0, 4096, 513, 1)).toThrow(
      'write of 4096 bytes at file offset 513: offset not a multiple of 4096',
    );
    expect(() => backend.write(fd, mem, 0, 1000, 0, 1)).toThrow(
      'write of 1000 bytes at file offset 0: length not a multiple of 4096',
    );
    expect(() => backend.read(fd, mem.subarray(16), 0, 4096, 0, 1)).toThrow(
      'read of 4096 bytes at file offset 0: memory offset 16 not a multiple of 4096',
    );
    expect(() => backend.write(fd, mem, 60 * KiB, 8192, 0, 1)).toThrow(RangeError);
    expect(backend.inFlight).toBe(0);
    backend.close();
    closeSync(fd);
  });

  it('a read past the end of the file is TRUNCATED, naming the request', () => {
    const { backend } = openIoBackend({ io, queueDepth: 2 });
    const mem = patterned(64 * KiB, 8);
    const fd = openDirect();
    backend.write(fd, mem, 0, 8192, 0, 1);
    backend.reap(1);
    backend.read(fd, mem, 0, 16384, 0, 2); // 8192 bytes come back, then end of file
    const err = catchError(() => backend.reap(1));
    expect(err).toBeInstanceOf(SnapPipeError);
    expect(err.code).toBe('TRUNCATED');
    expect(err.message).toBe('read of 16384 bytes at offset 0 (8192 done): end of file');
    expect(backend.inFlight).toBe(0);
    backend.close();
    closeSync(fd);
  });

  it('a failed write throws an IO error naming the errno', () => {
    const { backend } = openIoBackend({ io, queueDepth: 2 });
    const mem = patterned(64 * KiB, 8);
    const path = join(dir, `ro${fileCount++}.bin`);
    closeSync(openSync(path, 'w'));
    const ro = openSync(path, 'r');
    backend.write(ro, mem, 0, 4096, 8192, 3);
    const err = catchError(() => backend.reap(1));
    expect(err).toBeInstanceOf(SnapPipeError);
    expect(err.code).toBe('IO');
    expect(err.message).toMatch(/^write of 4096 bytes at offset 8192: EBADF \(bad file descriptor/);
    backend.close();
    closeSync(ro);
  });

  it('a write past a full file system throws an IO error naming ENOSPC', () => {
    const { backend } = openIoBackend({ io, queueDepth: 4 });
    const mem = patterned(4 * MiB, 10);
    // tmpfs has no O_DIRECT semantics worth testing: a plain fd, still 4 KiB-aligned requests.
    const path = join(smallFs, `full-${io}.bin`);
    const fd = openSync(path, 'w+');
    let failure: (Error & { code?: string }) | undefined;
    let written = 0;
    try {
      for (let i = 0; i < 4; i++) backend.write(fd, mem, i * MiB, MiB, i * MiB, i);
      for (let rounds = 0; backend.inFlight > 0 && rounds < 8 && !failure; rounds++) {
        try {
          written += backend.reap(1).length;
        } catch (err) {
          failure = err as Error & { code?: string };
        }
      }
    } finally {
      backend.close();
      closeSync(fd);
      rmSync(path); // the next backend gets an empty file system
    }
    expect(failure).toBeInstanceOf(SnapPipeError);
    expect(failure?.code).toBe('IO');
    expect(failure?.message).toMatch(/^write of 1048576 bytes at offset \d+( \(\d+ done\))?: ENOSPC \(no space left on device/);
    expect(written).toBeLessThan(4);
  });
});
