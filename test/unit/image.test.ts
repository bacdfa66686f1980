// Real images, real qemu-img: the writer's output must be a QCOW2 file QEMU accepts, and the reader must refuse
// every damaged, truncated, unfinished or foreign file with its own error code.

import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { crc32cJs } from '../../src/native/fastmem.js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SnapPipeError } from '../../src/errors.js';
import { readInfo } from '../../src/image/info.js';
import { formatInfo } from '../../src/commands/info.js';
import { encodeMeta } from '../../src/format/image/metadata.js';
import { ImageReader } from '../../src/image/reader.js';
import { FORMAT_VERSION, type RamBlockInfo, type SnapshotMeta } from '../../src/format/image/types.js';
import { CLUSTER_BYTES, PAGE_BYTES } from '../../src/format/units.js';
import { ImageWriter, SIZE_AHEAD_BYTES } from '../../src/image/writer.js';
import { layoutBlocks } from '../../src/format/image/qcow2.js';
import { mountSmallFs } from '../helpers/smallfs.js';
import { alignedShared } from '../../src/native/memory.js';

const C = CLUSTER_BYTES;
const MiB = 1 << 20;
const KiB = 1 << 10;

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snap-pipe-image-'));
});
afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

let counter = 0;
function tmp(name: string): string {
  counter++;
  return path.join(dir, `${counter}-${name}`);
}

function codeOf(fn: () => unknown): { code: string; message: string } {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(SnapPipeError);
    const e = err as SnapPipeError;
    return { code: e.code, message: e.message };
  }
  throw new Error('expected a SnapPipeError, nothing was thrown');
}

/** Deterministic content of virtual cluster `v` at version `gen`. */
function fillCluster(dst: Uint8Array, v: number, gen: number): void {
  for (let i = 0; i < C; i += 4096) dst.fill((v * 37 + gen * 11 + i / 4096) & 0xff, i, i + 4096);
  new DataView(dst.buffer, dst.byteOffset, C).setUint32(8, v);
}

interface Built {
  img: string;
  meta: SnapshotMeta;
  /** Expected raw content of the whole virtual disk. */
  expected: Uint8Array;
  virtualBytes: number;
  dataClusters: number;
}

const BLOCKS = [
  { id: 'pc.ram', lengthBytes: 5 * MiB },
  { id: 'vga.vram', lengthBytes: 128 * KiB },
  { id: '/rom@etc/acpi/tables', lengthBytes: 4 * KiB },
];

function setBit(bitmap: Uint8Array, i: number): void {
  bitmap[i >> 3] |= 1 << (i & 7);
}

function makeMeta(blocks: { id: string; lengthBytes: number }[], clusterCrc: Map<number, number>): SnapshotMeta {
  const { virtOffsetsBytes } = layoutBlocks(blocks.map((b) => b.lengthBytes));
  const ramBlocks: RamBlockInfo[] = blocks.map((b, i) => ({ ...b, virtOffsetBytes: virtOffsetsBytes[i] }));
  ramBlocks[1] = { ...ramBlocks[1], addr: 0xfd000000 };
  const pages = ramBlocks.map((b) => {
    const n = b.lengthBytes / PAGE_BYTES;
    const sent = new Uint8Array(Math.ceil(n / 8));
    const data = new Uint8Array(Math.ceil(n / 8));
    for (let p = 0; p < n; p += 3) {
      setBit(sent, p);
      if (p % 2 === 0) setBit(data, p);
    }
    return { sent, data };
  });
  const chunkCrc32c = ramBlocks.map((b) => {
    const chunks = Math.ceil(b.lengthBytes / C);
    const crcs = new Uint32Array(chunks);
    for (let k = 0; k < chunks; k++) crcs[k] = clusterCrc.get(b.virtOffsetBytes / C + k) ?? 0;
    return crcs;
  });
  const deviceState = new Uint8Array(300_001);
  for (let i = 0; i < deviceState.length; i++) deviceState[i] = (i * 7) & 0xff;
  return {
    formatVersion: FORMAT_VERSION,
    machineType: 'pc-i440fx-7.2',
    capabilities: ['x-ignore-shared'],
    ramSectionId: 2,
    ramVersionId: 4,
    head: new Uint8Array([0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3, 7, 1, 2]),
    ramSetup: new Uint8Array(Array.from({ length: 123 }, (_, i) => i)),
    switchoverCommands: new Uint8Array([8, 0, 11, 0, 0]),
    deviceState,
    sawRamEnd: true,
    blocks: ramBlocks,
    pages,
    chunkCrc32c,
    counters: {
      dataPages: 1000,
      zeroPages: 234,
      resentPages: 17,
      streamBytes: 9_876_543,
      dataClusters: 5,
      rewrittenClusters: 1,
    },
    savedAt: '2024-05-01T12:00:00.000Z',
    writer: 'snap-pipe 0.1.0',
  };
}

/** Writes clusters in a non-sequential virtual order (one of them twice), then finishes. */
function buildImage(direct: boolean, opts: { finish?: boolean; img?: string; force?: boolean } = {}): Built {
  const img = opts.img ?? tmp(direct ? 'direct.qcow2' : 'buffered.qcow2');
  const { ramEndBytes } = layoutBlocks(BLOCKS.map((b) => b.lengthBytes));
  expect(ramEndBytes).toBe(7 * MiB);
  const writer = ImageWriter.create(img, { direct, force: opts.force ?? false });
  expect(writer.direct).toBe(direct);
  const buf = new Uint8Array(alignedShared(C), 0, C);
  const order = [4, 0, 6, 5, 2, 0];
  const clusterCrc = new Map<number, number>();
  const hostOf = new Map<number, number>();
  const expected = new Uint8Array(8 * MiB);
  let gen = 0;
  for (const v of order) {
    gen++;
    const { hostOffsetBytes, fresh } = writer.allocate(v);
    expect(fresh).toBe(!clusterCrc.has(v));
    // A cluster allocated again keeps its place.
    expect(hostOffsetBytes).toBe(hostOf.get(v) ?? hostOffsetBytes);
    hostOf.set(v, hostOffsetBytes);
    fillCluster(buf, v, gen);
    expect(fs.writeSync(writer.fd, buf, 0, C, hostOffsetBytes)).toBe(C);
    clusterCrc.set(v, crc32cJs(buf));
    expected.set(buf, v * C);
  }
  expect(writer.dataClusters).toBe(5);
  // Host clusters 1..5 in allocation order; nothing else (virtual cluster 1 among them) allocated.
  expect([...hostOf]).toEqual([[4, 1 * C], [0, 2 * C], [6, 3 * C], [5, 4 * C], [2, 5 * C]]);
  const meta = makeMeta(BLOCKS, clusterCrc);
  if (opts.finish ?? true) writer.finish(meta);
  writer.close();
  writer.close(); // idempotent
  const metaBytes = encodeMeta(meta);
  expect(metaBytes.byteLength).toBeLessThan(C);
  expected.set(metaBytes, 7 * MiB);
  return { img, meta, expected, virtualBytes: 8 * MiB, dataClusters: 5 };
}

/** Deep equality; large bitmaps compared as bytes (vitest's toEqual is slow on multi-MB typed arrays). */
function expectSameMeta(got: SnapshotMeta | undefined, want: SnapshotMeta): void {
  expect(got).toBeDefined();
  const g = got as SnapshotMeta;
  expect(g.pages.length).toBe(want.pages.length);
  g.pages.forEach((p, i) => {
    expect(p.sent).toBeInstanceOf(Uint8Array);
    expect(Buffer.compare(p.sent, want.pages[i].sent)).toBe(0);
    expect(Buffer.compare(p.data, want.pages[i].data)).toBe(0);
  });
  const strip = (m: SnapshotMeta) => ({ ...m, pages: [] });
  expect(strip(g)).toEqual(strip(want));
}

function qemuImg(args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync('qemu-img', args, { encoding: 'utf8' });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe.each([
  { direct: true, name: 'O_DIRECT' },
  { direct: false, name: 'buffered' },
])('image written $name', ({ direct }) => {
  let built: Built;
  beforeAll(() => {
    built = buildImage(direct);
  });

  it('passes qemu-img check with no errors or leaks', () => {
    const r = qemuImg(['check', '--output=json', built.img]);
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    const report = JSON.parse(r.stdout) as Record<string, unknown>;
    expect(report['check-errors']).toBe(0);
    expect(report['corruptions'] ?? 0).toBe(0);
    expect(report['leaks'] ?? 0).toBe(0);
    expect(report['format']).toBe('qcow2');
    const human = qemuImg(['check', built.img]);
    expect(human.status).toBe(0);
    expect(human.stdout).toContain('No errors were found on the image.');
  });

  it('qemu-img info shows 1 MiB clusters and the virtual size', () => {
    const out = execFileSync('qemu-img', ['info', '--output=json', built.img], { encoding: 'utf8' });
    const info = JSON.parse(out) as Record<string, unknown>;
    expect(info['format']).toBe('qcow2');
    expect(info['cluster-size']).toBe(C);
    expect(info['virtual-size']).toBe(built.virtualBytes);
    expect(info['actual-size']).toBeGreaterThan(0);
    expect(info['backing-filename']).toBeUndefined();
  });

  it('qemu-img convert -O raw yields the data at each virtual offset and zeros elsewhere', () => {
    const raw = tmp('raw.img');
    execFileSync('qemu-img', ['convert', '-O', 'raw', built.img, raw]);
    const got = fs.readFileSync(raw);
    expect(got.byteLength).toBe(built.virtualBytes);
    // Compare cluster by cluster for a readable failure.
    for (let v = 0; v < built.virtualBytes / C; v++) {
      const a = got.subarray(v * C, (v + 1) * C);
      const b = built.expected.subarray(v * C, (v + 1) * C);
      expect(Buffer.compare(a, b), `virtual cluster ${v}`).toBe(0);
    }
    fs.rmSync(raw);
  });

  it('the reader returns the same metadata and cluster contents', () => {
    const reader = ImageReader.open(built.img, { direct });
    try {
      expect(reader.complete).toBe(true);
      expect(reader.meta).toEqual(built.meta);
      expect(reader.fileBytes).toBe(fs.statSync(built.img).size);
      expect(reader.fileBytes % C).toBe(0);
      expect(reader.virtualBytes).toBe(built.virtualBytes);
      expect(reader.dataClusters).toBe(built.dataClusters);
      const dst = new Uint8Array(alignedShared(C), 0, C);
      for (let v = 0; v < built.virtualBytes / C; v++) {
        reader.readCluster(v, dst);
        expect(Buffer.compare(dst, built.expected.subarray(v * C, (v + 1) * C)), `cluster ${v}`).toBe(0);
      }
      // Data clusters sit right after the header, in arrival order.
      expect(reader.hostOffsetOf(4)).toBe(1 * C);
      expect(reader.hostOffsetOf(0)).toBe(2 * C);
      expect(reader.hostOffsetOf(2)).toBe(5 * C);
      expect(reader.hostOffsetOf(1)).toBeUndefined();
      expect(reader.hostOffsetOf(7)).toBe(6 * C); // metadata
      expect(reader.hostOffsetOf(8)).toBeUndefined();
    } finally {
      reader.close();
      reader.close();
    }
  });

  it('readInfo and formatInfo report the right figures', () => {
    const info = readInfo(built.img);
    expect(info).toMatchObject({
      path: built.img,
      complete: true,
      formatVersion: FORMAT_VERSION,
      machineType: 'pc-i440fx-7.2',
      virtualBytes: built.virtualBytes,
      clusterBytes: C,
      dataClusters: 5,
      deviceStateBytes: 300_001,
      dataPages: 1000,
      zeroPages: 234,
      resentPages: 17,
      savedAt: '2024-05-01T12:00:00.000Z',
      sawRamEnd: true,
      capabilities: ['x-ignore-shared'],
    });
    // Bitmaps: every third page sent, every sixth page data.
    const expectBlock = (lengthBytes: number) => {
      const pages = lengthBytes / PAGE_BYTES;
      const sent = Math.ceil(pages / 3);
      const data = Math.ceil(pages / 6);
      return { pages, dataPages: data, zeroPages: sent - data, unsentPages: pages - sent };
    };
    expect(info.blocks).toEqual([
      { id: 'pc.ram', lengthBytes: 5 * MiB, virtOffsetBytes: 0, ...expectBlock(5 * MiB) },
      { id: 'vga.vram', lengthBytes: 128 * KiB, virtOffsetBytes: 5 * MiB, ...expectBlock(128 * KiB) },
      { id: '/rom@etc/acpi/tables', lengthBytes: 4 * KiB, virtOffsetBytes: 6 * MiB, ...expectBlock(4 * KiB) },
    ]);
    const text = formatInfo(info);
    expect(text).toContain('complete');
    expect(text).toContain('pc-i440fx-7.2');
    expect(text).toContain('virtual size:   8 MiB');
    expect(text).toContain('vga.vram');
    expect(text.split('\n').length).toBeGreaterThan(6);
    expect(JSON.parse(JSON.stringify(info))).toEqual(info);
  });
});

describe('file blocks ahead of the data', () => {
  /**
   * Allocates and writes virtual clusters 0..n-1, returning the file's length and allocated bytes before finish, and
   * `dataEnd`, the end of the last cluster handed out.
   */
  function writeClusters(
    img: string,
    n: number,
  ): { writer: ImageWriter; clusterCrc: Map<number, number>; size: number; allocated: number; dataEnd: number } {
    const writer = ImageWriter.create(img, { direct: true, force: false });
    const buf = new Uint8Array(alignedShared(C), 0, C);
    const clusterCrc = new Map<number, number>();
    let dataEnd = 0;
    for (let v = 0; v < n; v++) {
      const { hostOffsetBytes } = writer.allocate(v);
      fillCluster(buf, v, 1);
      fs.writeSync(writer.fd, buf, 0, C, hostOffsetBytes);
      clusterCrc.set(v, crc32cJs(buf));
      dataEnd = Math.max(dataEnd, hostOffsetBytes + C);
    }
    const st = fs.fstatSync(writer.fd);
    return { writer, clusterCrc, size: st.size, allocated: st.blocks * 512, dataEnd };
  }

  const blocks = [
    { id: 'pc.ram', lengthBytes: 4 * MiB },
    { id: 'vga.vram', lengthBytes: 1 * MiB },
  ];

  it('are allocated (fallocate) while the save runs, and the finished file keeps only its clusters', () => {
    const img = tmp('ahead.qcow2');
    const { writer, clusterCrc, size, allocated } = writeClusters(img, 4);
    expect(size).toBeGreaterThanOrEqual(2 * C + SIZE_AHEAD_BYTES);
    expect(allocated).toBeGreaterThanOrEqual(size);
    writer.finish(makeMeta(blocks, clusterCrc));
    writer.close();
    const st = fs.statSync(img);
    expect(st.size).toBeLessThan(16 * C);
    expect(st.blocks * 512).toBeLessThanOrEqual(st.size + 64 * 1024);
    expect(qemuImg(['check', img]).status).toBe(0);
  });

  it('are left sparse where fallocate is refused (no room for that much), and the save goes on', () => {
    const small = mountSmallFs(16);
    let writer: ImageWriter | undefined;
    try {
      const img = path.join(small.dir, 'sparse-ahead.qcow2');
      const w = writeClusters(img, 4);
      writer = w.writer;
      expect(w.size).toBeGreaterThanOrEqual(2 * C + SIZE_AHEAD_BYTES);
      // The file is sized tens of MiB past its data, but not one block past the last cluster handed out is
      // allocated: the region ahead is a hole (the 4 data clusters themselves are there).
      expect(w.allocated).toBeGreaterThanOrEqual(4 * C);
      expect(w.allocated, `allocated bytes of a file whose clusters end at byte ${w.dataEnd}`).toBeLessThanOrEqual(w.dataEnd);
      writer.finish(makeMeta(blocks, w.clusterCrc));
      writer.close();
      const clusterCrc = w.clusterCrc;
      expect(fs.statSync(img).size).toBeLessThan(16 * C);
      const reader = ImageReader.open(img, { direct: false });
      const dst = new Uint8Array(alignedShared(C), 0, C);
      for (const [v, crc] of clusterCrc) {
        reader.readCluster(v, dst);
        expect(crc32cJs(dst)).toBe(crc);
      }
      reader.close();
    } finally {
      writer?.close();
      small.unmount();
    }
  });
});

describe('unfinished saves and overwriting', () => {
  it('an image closed without finish is incomplete', () => {
    const { img } = buildImage(true, { finish: false });
    expect(codeOf(() => ImageReader.open(img))).toMatchObject({
      code: 'INCOMPLETE',
      message: expect.stringContaining('the save that wrote this image never finished'),
    });
    const reader = ImageReader.open(img, { allowIncomplete: true });
    expect(reader.complete).toBe(false);
    expect(reader.meta).toBeUndefined();
    reader.close();
    const info = readInfo(img);
    expect(info.complete).toBe(false);
    expect(info.formatVersion).toBe(FORMAT_VERSION);
    expect(info.fileBytes).toBe(6 * C);
    expect(formatInfo(info)).toContain('INCOMPLETE');
    // An unfinished image may be overwritten without --force.
    const again = buildImage(false, { img });
    expect(readInfo(again.img).complete).toBe(true);
  });

  it('create() refuses a complete image unless forced', () => {
    const { img } = buildImage(false);
    expect(codeOf(() => ImageWriter.create(img, { direct: true, force: false }))).toMatchObject({
      code: 'EXISTS',
      message: expect.stringContaining('use --force to overwrite'),
    });
    // Still intact after the refusal.
    expect(readInfo(img).complete).toBe(true);
    const w = ImageWriter.create(img, { direct: true, force: true });
    w.close();
    expect(readInfo(img).complete).toBe(false);
    expect(fs.statSync(img).size).toBe(C);
  });

  it('create() over an image puts a new file in its place (the old one is freed in the background), keeping its mode', () => {
    const { img } = buildImage(false);
    fs.chmodSync(img, 0o600);
    const before = fs.statSync(img);
    // A reader still holding the old image: it must keep reading the old bytes, not a truncated file.
    const oldFd = fs.openSync(img, 'r');
    try {
      const w = ImageWriter.create(img, { direct: true, force: true });
      w.close();
      const after = fs.statSync(img);
      expect(after.ino).not.toBe(before.ino);
      expect(after.mode & 0o7777).toBe(0o600);
      expect(after.uid).toBe(before.uid);
      expect(readInfo(img).complete).toBe(false);
      expect(fs.fstatSync(oldFd).size).toBe(before.size);
      const head = new Uint8Array(4);
      fs.readSync(oldFd, head, 0, head.length, 0);
      expect(Buffer.from(head).toString('latin1')).toBe('QFI\xfb');
    } finally {
      fs.closeSync(oldFd);
    }
  });

  it('create() truncates in place what must keep its identity: a symlink\'s target, a file with other links', () => {
    const { img } = buildImage(false);
    const link = tmp('via-symlink.qcow2');
    fs.rmSync(link, { force: true });
    fs.symlinkSync(img, link);
    const ino = fs.statSync(img).ino;
    ImageWriter.create(link, { direct: true, force: true }).close();
    expect(fs.lstatSync(link).isSymbolicLink()).toBe(true);
    expect(fs.statSync(img).ino).toBe(ino);
    expect(readInfo(link).complete).toBe(false);

    const built = buildImage(false, { img: tmp('hard-a.qcow2'), force: true });
    const other = tmp('hard-b.qcow2');
    fs.rmSync(other, { force: true });
    fs.linkSync(built.img, other);
    ImageWriter.create(built.img, { direct: true, force: true }).close();
    expect(fs.statSync(built.img).ino).toBe(fs.statSync(other).ino);
    expect(readInfo(other).complete).toBe(false);
  });

  it('create() truncates in place where the file system has no room for the old file again', () => {
    const small = mountSmallFs(16);
    try {
      const img = path.join(small.dir, 'big-old.bin');
      fs.writeFileSync(img, Buffer.alloc(12 * MiB, 1));
      const ino = fs.statSync(img).ino;
      ImageWriter.create(img, { direct: false, force: true }).close();
      expect(fs.statSync(img).ino).toBe(ino);
      expect(readInfo(img).complete).toBe(false);
    } finally {
      small.unmount();
    }
  });

  it('create() refuses unrelated files unless forced, accepts empty ones', () => {
    const text = tmp('notes.txt');
    fs.writeFileSync(text, 'precious\n');
    expect(codeOf(() => ImageWriter.create(text, { direct: false, force: false })).code).toBe('EXISTS');
    expect(fs.readFileSync(text, 'utf8')).toBe('precious\n');
    const foreign = tmp('foreign.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', foreign, '16M']);
    expect(codeOf(() => ImageWriter.create(foreign, { direct: false, force: false })).code).toBe('EXISTS');
    const empty = tmp('empty.qcow2');
    fs.writeFileSync(empty, '');
    ImageWriter.create(empty, { direct: true, force: false }).close();
    ImageWriter.create(text, { direct: true, force: true }).close();
    expect(readInfo(text).complete).toBe(false);
  });
});

describe('damaged and foreign files', () => {
  let good: Built;
  beforeAll(() => {
    good = buildImage(true);
  });

  function copy(name: string): string {
    const p = tmp(name);
    fs.copyFileSync(good.img, p);
    return p;
  }

  it('a flipped byte in the metadata region is BAD_IMAGE', () => {
    const img = copy('flipped.qcow2');
    const reader = ImageReader.open(img);
    const metaHost = reader.hostOffsetOf(7);
    reader.close();
    expect(metaHost).toBe(6 * C);
    const fd = fs.openSync(img, 'r+');
    const b = Buffer.alloc(1);
    fs.readSync(fd, b, 0, 1, (metaHost as number) + 5000);
    b[0] ^= 0x40;
    fs.writeSync(fd, b, 0, 1, (metaHost as number) + 5000);
    fs.closeSync(fd);
    expect(codeOf(() => ImageReader.open(img))).toMatchObject({
      code: 'BAD_IMAGE',
      message: expect.stringContaining('metadata damaged'),
    });
    expect(codeOf(() => readInfo(img)).code).toBe('BAD_IMAGE');
  });

  it('a truncated file is TRUNCATED', () => {
    for (const keepBytes of [good.expected.byteLength, fs.statSync(good.img).size - 4096, 3 * C + 12345]) {
      const img = copy('truncated.qcow2');
      fs.truncateSync(img, keepBytes);
      expect(codeOf(() => ImageReader.open(img, { direct: true })).code).toBe('TRUNCATED');
      expect(codeOf(() => ImageReader.open(img, { direct: false })).code).toBe('TRUNCATED');
    }
  });

  it('a file that is not QCOW2 is BAD_IMAGE', () => {
    const img = tmp('text.img');
    fs.writeFileSync(img, 'hello, this is not a disk image\n'.repeat(1000));
    expect(codeOf(() => ImageReader.open(img))).toMatchObject({ code: 'BAD_IMAGE', message: expect.stringContaining('not a QCOW2 image') });
    const empty = tmp('empty.img');
    fs.writeFileSync(empty, '');
    expect(codeOf(() => ImageReader.open(empty, { direct: true })).message).toContain('not a QCOW2 image');
  });

  it('a plain qemu-img qcow2 image is "not a snap-pipe image"', () => {
    const img = tmp('plain.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', img, '64M']);
    expect(codeOf(() => ImageReader.open(img))).toMatchObject({
      code: 'BAD_IMAGE',
      message: expect.stringContaining('QCOW2 but not a snap-pipe image'),
    });
    expect(codeOf(() => readInfo(img)).message).toContain('not a snap-pipe image');
  });

  it('an unknown snap-pipe format version is BAD_IMAGE', () => {
    const img = copy('future.qcow2');
    const fd = fs.openSync(img, 'r+');
    const v = Buffer.alloc(4);
    v.writeUInt32BE(99);
    fs.writeSync(fd, v, 0, 4, 104 + 8); // first field of the snap-pipe extension
    fs.closeSync(fd);
    expect(codeOf(() => ImageReader.open(img))).toMatchObject({ code: 'BAD_IMAGE', message: expect.stringContaining('version 99') });
  });

  it('a format version 1 image (CRC-32 checksums) is refused as written by an older snap-pipe', () => {
    const img = copy('v1.qcow2');
    const fd = fs.openSync(img, 'r+');
    const v = Buffer.alloc(4);
    v.writeUInt32BE(1);
    fs.writeSync(fd, v, 0, 4, 104 + 8);
    fs.closeSync(fd);
    expect(codeOf(() => ImageReader.open(img))).toMatchObject({
      code: 'BAD_IMAGE',
      message: expect.stringContaining('written by an older snap-pipe (format version 1'),
    });
  });

  it('a damaged L2 entry offset is caught before use', () => {
    const img = copy('badl2.qcow2');
    // L2 table follows the metadata cluster (host cluster 7); entry 0 maps virtual cluster 0.
    const fd = fs.openSync(img, 'r+');
    const e = Buffer.alloc(8);
    e.writeBigUInt64BE((1n << 63n) | BigInt(1000 * C));
    fs.writeSync(fd, e, 0, 8, 7 * C);
    fs.closeSync(fd);
    expect(codeOf(() => ImageReader.open(img)).code).toBe('TRUNCATED');
    e.writeBigUInt64BE((1n << 63n) | BigInt(C + 512));
    const fd2 = fs.openSync(img, 'r+');
    fs.writeSync(fd2, e, 0, 8, 7 * C);
    fs.closeSync(fd2);
    expect(codeOf(() => ImageReader.open(img)).code).toBe('BAD_IMAGE');
  });
});

describe('large sparse virtual disk', () => {
  it('maps clusters beyond 128 GiB through L1 entry 1 and leaves the unused L2 table out', () => {
    const img = tmp('sparse.qcow2');
    const blocks = [
      { id: 'pc.ram', lengthBytes: 160 * 1024 * MiB },
      { id: 'vga.vram', lengthBytes: 16 * MiB },
    ];
    const { virtOffsetsBytes, ramEndBytes } = layoutBlocks(blocks.map((b) => b.lengthBytes));
    expect(virtOffsetsBytes).toEqual([0, 160 * 1024 * MiB]);
    const writer = ImageWriter.create(img, { direct: true, force: false });
    const buf = new Uint8Array(alignedShared(C), 0, C);
    const clusterCrc = new Map<number, number>();
    // Only clusters in the second L2 range (>= 128 GiB): L1 entry 0 stays empty.
    for (const v of [150_000, 131_072, virtOffsetsBytes[1] / C + 3]) {
      const { hostOffsetBytes } = writer.allocate(v);
      fillCluster(buf, v, 1);
      fs.writeSync(writer.fd, buf, 0, C, hostOffsetBytes);
      clusterCrc.set(v, crc32cJs(buf));
    }
    const meta = makeMeta(blocks, clusterCrc);
    writer.finish(meta);
    writer.close();
    const check = qemuImg(['check', img]);
    expect(check.stderr).toBe('');
    expect(check.status).toBe(0);
    const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', img], { encoding: 'utf8' })) as Record<string, unknown>;
    const metaClusters = Math.ceil(encodeMeta(meta).byteLength / C);
    expect(info['virtual-size']).toBe(ramEndBytes + metaClusters * C);
    const reader = ImageReader.open(img, { direct: true });
    expectSameMeta(reader.meta, meta);
    expect(reader.dataClusters).toBe(3);
    expect(reader.hostOffsetOf(0)).toBeUndefined();
    const dst = new Uint8Array(alignedShared(C), 0, C);
    for (const [v, crc] of clusterCrc) {
      reader.readCluster(v, dst);
      expect(crc32cJs(dst)).toBe(crc);
    }
    reader.readCluster(5, dst);
    expect(dst.every((x) => x === 0)).toBe(true);
    reader.close();
    // Header, data, metadata, one L2 table (L1 index 1: data, vga, metadata), L1, refcount block, refcount table.
    expect(fs.statSync(img).size).toBe((1 + 3 + metaClusters + 1 + 1 + 1 + 1) * C);
  });
});
