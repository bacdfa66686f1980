// Pure encoders: QCOW2 header/extension, tail layout, refcount blocks, snap-pipe metadata container.

import { describe, expect, it } from 'vitest';
import { SnapPipeError } from '../../src/errors.js';
import {
  BLOCKS_MAX,
  FILE_CLUSTERS_MAX,
  JSON_SECTION_BYTES_MAX,
  L1_ENTRIES_MAX,
  REFCOUNT_TABLE_CLUSTERS_MAX,
  VIRTUAL_BYTES_MAX,
} from '../../src/format/image/limits.js';
import { decodeMeta, encodeMeta } from '../../src/format/image/metadata.js';
import {
  HEADER_AREA_BYTES,
  REFCOUNTS_PER_BLOCK,
  SNAP_EXT_MAGIC,
  SNAP_FAILURE_EXT_MAGIC,
  SNAP_FLAG_COMPLETE,
  decodeHeader,
  encodeHeader,
  fillRefcountBlock,
  layoutBlocks,
  layoutTail,
  snapHeader,
} from '../../src/format/image/qcow2.js';
import { FORMAT_VERSION, type SnapshotMeta } from '../../src/format/image/types.js';
import { CLUSTER_BYTES } from '../../src/format/units.js';

const C = CLUSTER_BYTES;

function sampleMeta(): SnapshotMeta {
  return {
    formatVersion: FORMAT_VERSION,
    machineType: 'pc-q35-7.2',
    capabilities: [],
    ramSectionId: 3,
    ramVersionId: 4,
    head: new Uint8Array([1, 2, 3]),
    ramSetup: new Uint8Array(0),
    switchoverCommands: new Uint8Array(0),
    deviceState: new Uint8Array([9, 8, 7, 6, 5]),
    sawRamEnd: false,
    blocks: [
      { id: 'pc.ram', lengthBytes: 3 * C + 8192, virtOffsetBytes: 0 },
      { id: 'x', lengthBytes: 4096, virtOffsetBytes: 4 * C, addr: 2 ** 40 },
    ],
    pages: [
      { sent: new Uint8Array(98).fill(0xff), data: new Uint8Array(98).fill(0x0f) },
      { sent: new Uint8Array([1]), data: new Uint8Array([0]) },
    ],
    chunkCrc32c: [new Uint32Array([1, 0xffffffff, 3, 4]), new Uint32Array([0])],
    counters: { dataPages: 1, zeroPages: 2, resentPages: 3, streamBytes: 4, dataClusters: 5, rewrittenClusters: 6 },
    savedAt: '2024-01-01T00:00:00.000Z',
    writer: 'test',
  };
}

describe('layoutBlocks', () => {
  it('puts each block on a cluster boundary, rounded up to whole clusters', () => {
    expect(layoutBlocks([5 * C, 128 * 1024, 4096, 0, C + 4096])).toEqual({
      virtOffsetsBytes: [0, 5 * C, 6 * C, 7 * C, 7 * C],
      ramEndBytes: 9 * C,
    });
    expect(layoutBlocks([])).toEqual({ virtOffsetsBytes: [], ramEndBytes: 0 });
  });
});

describe('header', () => {
  it('round-trips the header and the snap-pipe extension', () => {
    const buf = new Uint8Array(HEADER_AREA_BYTES);
    const header = snapHeader({
      virtualBytes: 300 * C,
      l1Entries: 1,
      l1OffsetBytes: 17 * C,
      refcountTableOffsetBytes: 19 * C,
      refcountTableClusters: 1,
    });
    const ext = {
      formatVersion: FORMAT_VERSION,
      flags: SNAP_FLAG_COMPLETE,
      metaVirtOffsetBytes: 299 * C,
      metaBytes: 12345,
      metaCrc32: 0xdeadbeef,
    };
    encodeHeader(buf, header, ext);
    const d = decodeHeader(buf);
    expect(d.kind).toBe('ok');
    if (d.kind !== 'ok') return;
    expect(d.header).toEqual(header);
    expect(d.snap).toEqual(ext);
    expect(d.extensions).toEqual([{ type: SNAP_EXT_MAGIC, offsetBytes: 112, lengthBytes: 32 }]);
    expect(decodeHeader(new Uint8Array(50)).kind).toBe('not-qcow2');
    expect(decodeHeader(buf.subarray(0, 80)).kind).toBe('short');
    expect(d.failure).toBeUndefined();
  });

  it('an incomplete image\'s failure note: one line of UTF-8 in its own extension, cut at 1024 bytes, escaped when read', () => {
    const buf = new Uint8Array(HEADER_AREA_BYTES);
    const header = snapHeader({ virtualBytes: 0, l1Entries: 0, l1OffsetBytes: 0, refcountTableOffsetBytes: 0, refcountTableClusters: 0 });
    const ext = { formatVersion: FORMAT_VERSION, flags: 0, metaVirtOffsetBytes: 0, metaBytes: 0, metaCrc32: 0 };
    encodeHeader(buf, header, ext, 'stream ended at byte 42 while reading page data');
    const d = decodeHeader(buf);
    if (d.kind !== 'ok') throw new Error(d.kind);
    expect(d.failure).toBe('stream ended at byte 42 while reading page data');
    expect(d.extensions.map((e) => e.type)).toEqual([SNAP_EXT_MAGIC, SNAP_FAILURE_EXT_MAGIC]);
    // Longer than the limit: cut at a character boundary (é is 2 bytes: 1023 bytes of them end on a boundary at 1022).
    encodeHeader(buf, header, ext, 'é'.repeat(600));
    const long = decodeHeader(buf);
    if (long.kind !== 'ok') throw new Error(long.kind);
    expect(long.failure).toBe('é'.repeat(512));
    // Whatever bytes another tool put there come back without control characters (a terminal escape, a newline).
    encodeHeader(buf, header, ext, 'bad\u001b[31mred\nline\u009b');
    const esc = decodeHeader(buf);
    if (esc.kind !== 'ok') throw new Error(esc.kind);
    expect(esc.failure).toBe('bad\\x1b[31mred\\x0aline\\x9b');
    // A complete image never carries one.
    expect(() => encodeHeader(buf, header, { ...ext, flags: SNAP_FLAG_COMPLETE }, 'x')).toThrow(/failure note in a complete image/);
  });
});

describe('layoutTail', () => {
  it('counts refcount blocks and table clusters among the clusters they cover', () => {
    const small = layoutTail({ dataClusters: 5, metaVirtOffsetBytes: 7 * C, metaBytes: 10, isL1IndexUsedByData: () => true });
    expect(small).toMatchObject({
      metaFirstCluster: 6,
      metaClusters: 1,
      l2FirstCluster: 7,
      l2ForL1Index: [0],
      l1FirstCluster: 8,
      l1Entries: 1,
      refcountBlockFirstCluster: 9,
      refcountBlocks: 1,
      refcountTableFirstCluster: 10,
      totalClusters: 11,
      virtualBytes: 8 * C,
    });
    // Exactly at the boundary: the second refcount block is needed only because the tables themselves spill over.
    // Header, data, metadata, one L2, L1 = R - 1 clusters; one refcount block + one table cluster would make R + 1.
    const data = REFCOUNTS_PER_BLOCK - 5;
    const edge = layoutTail({ dataClusters: data, metaVirtOffsetBytes: 0, metaBytes: 1, isL1IndexUsedByData: () => false });
    expect(edge.l2ForL1Index).toEqual([0]);
    expect(edge.refcountBlocks * REFCOUNTS_PER_BLOCK).toBeGreaterThanOrEqual(edge.totalClusters);
    expect(edge.refcountBlocks).toBe(2);
    expect(edge.totalClusters).toBe(REFCOUNTS_PER_BLOCK + 2);
  });

  it('fills refcount blocks with big-endian 1 up to the last used cluster', () => {
    const dst = new Uint8Array(C).fill(0xaa);
    fillRefcountBlock(dst, 0, 3);
    expect(Array.from(dst.subarray(0, 8))).toEqual([0, 1, 0, 1, 0, 1, 0, 0]);
    expect(dst.subarray(6).every((x) => x === 0)).toBe(true);
  });
});

describe('metadata container', () => {
  it('round-trips SnapshotMeta exactly', () => {
    const meta = sampleMeta();
    const bytes = encodeMeta(meta);
    expect(bytes.byteLength % 8).toBe(0);
    expect(decodeMeta(bytes)).toEqual(meta);
  });

  it('detects any flipped byte, truncation and trailing garbage', () => {
    const bytes = encodeMeta(sampleMeta());
    // The bytes undamaged decode: the refusals below are detections, not a decoder that refuses everything.
    expect(decodeMeta(bytes)).toEqual(sampleMeta());
    // The bytes a flip must never get through: the magic, section count and total length, and each section's length,
    // CRC and data. The others are never read or are skipped by design (the container's copy of formatVersion, the
    // reserved words, padding, and tags: an unknown tag is skipped, harmlessly where the section was empty).
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const guarded = new Set<number>();
    const guard = (from: number, n: number) => {
      for (let k = from; k < from + n; k++) guarded.add(k);
    };
    guard(0, 8);
    guard(12, 12);
    for (let i = 0, pos = 24; i < view.getUint32(12, true); i++) {
      const len = Number(view.getBigUint64(pos + 8, true));
      guard(pos + 8, 12);
      guard(pos + 24, len);
      pos += 24 + Math.ceil(len / 8) * 8;
    }
    const passed: number[] = [];
    for (let i = 0; i < bytes.byteLength; i++) {
      const copy = bytes.slice();
      copy[i] ^= 0x01;
      let threw: unknown;
      try {
        const back = decodeMeta(copy);
        // A flip in padding is harmless only if the decoded content is unchanged.
        expect(back).toEqual(sampleMeta());
        passed.push(i);
      } catch (err) {
        threw = err;
      }
      if (threw !== undefined) {
        expect(threw).toBeInstanceOf(SnapPipeError);
        expect((threw as SnapPipeError).code).toBe('BAD_IMAGE');
        expect((threw as SnapPipeError).message).toContain('metadata damaged');
      }
    }
    expect(passed.filter((i) => guarded.has(i)), 'flipped bytes in guarded fields that decoded').toEqual([]);
    expect(() => decodeMeta(bytes.subarray(0, bytes.byteLength - 8))).toThrow(/metadata damaged/);
    const longer = new Uint8Array(bytes.byteLength + 8);
    longer.set(bytes);
    expect(() => decodeMeta(longer)).toThrow(/metadata damaged/);
  });

  it('switch-over commands: optional when decoding (images from before QEMU 10), skipped as an unknown tag by older readers', () => {
    const meta = { ...sampleMeta(), switchoverCommands: Uint8Array.of(8, 0, 11, 0, 0) };
    const bytes = encodeMeta(meta);
    expect(decodeMeta(bytes).switchoverCommands).toEqual(meta.switchoverCommands);
    // The container without its last section (tag 8, written last): what snap-pipe wrote before this change.
    const view = new DataView(bytes.buffer, bytes.byteOffset);
    const sections = view.getUint32(12, true);
    let pos = 24;
    for (let i = 0; i < sections - 1; i++) pos += 24 + Math.ceil(Number(view.getBigUint64(pos + 8, true)) / 8) * 8;
    expect(view.getUint32(pos, true)).toBe(8);
    const older = bytes.slice(0, pos);
    const olderView = new DataView(older.buffer);
    olderView.setUint32(12, sections - 1, true);
    olderView.setBigUint64(16, BigInt(pos), true);
    expect(decodeMeta(older)).toEqual({ ...meta, switchoverCommands: new Uint8Array(0) });
    // An older reader skips unknown tags: a tag it does not know in place of 8 is skipped the same way here.
    view.setUint32(pos, 99, true);
    expect(decodeMeta(bytes)).toEqual({ ...meta, switchoverCommands: new Uint8Array(0) });
  });
});

describe('limits on what an image may say', () => {
  it('derive from what snap-pipe writes: 16 TiB of RAM in 4096 blocks, 2 GiB of metadata, the writer\'s tables', () => {
    const TiB = 2 ** 40;
    const GiB = 2 ** 30;
    expect(VIRTUAL_BYTES_MAX).toBe(16 * TiB + 4096 * C + 2 * GiB);
    expect(L1_ENTRIES_MAX).toBe(129);
    // The largest image's tables: the header, 129 L2 tables, one L1 cluster, 33 refcount blocks, one table cluster.
    expect(FILE_CLUSTERS_MAX).toBe(VIRTUAL_BYTES_MAX / C + 1 + 129 + 1 + 33 + 1);
    expect(REFCOUNT_TABLE_CLUSTERS_MAX).toBe(1);
  });

  it('the metadata decoder refuses a JSON section over its bound and a block table over BLOCKS_MAX before using them', () => {
    const big = { ...sampleMeta(), machineType: 'x'.repeat(JSON_SECTION_BYTES_MAX) };
    expect(() => decodeMeta(encodeMeta(big))).toThrow(/^metadata damaged: scalar section of \d+ bytes \(at most 8388608\)$/);
    const m = sampleMeta();
    const many = {
      ...m,
      blocks: Array.from({ length: BLOCKS_MAX + 1 }, (_, i) => ({ id: `b${i}`, lengthBytes: 4096, virtOffsetBytes: i * C })),
      pages: Array.from({ length: BLOCKS_MAX + 1 }, () => m.pages[1]),
      chunkCrc32c: Array.from({ length: BLOCKS_MAX + 1 }, () => m.chunkCrc32c[1]),
    };
    expect(() => decodeMeta(encodeMeta(many))).toThrow(`metadata damaged: ${BLOCKS_MAX + 1} RAM blocks (at most ${BLOCKS_MAX})`);
    const longName = { ...m, blocks: [m.blocks[0], { ...m.blocks[1], id: 'y'.repeat(256) }] };
    expect(() => decodeMeta(encodeMeta(longName))).toThrow('metadata damaged: block name of 256 characters');
  });

  it('the metadata decoder hands out views of its input, not copies', () => {
    const bytes = encodeMeta(sampleMeta());
    const meta = decodeMeta(bytes);
    for (const part of [meta.head, meta.deviceState, meta.pages[0].sent, meta.pages[0].data]) expect(part.buffer).toBe(bytes.buffer);
  });
});
