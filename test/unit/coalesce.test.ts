import { describe, expect, it } from 'vitest';
import { Coalescer } from '../../src/save/stages/coalesce.js';
import { crc32cJs } from '../../src/native/fastmem.js';
import { SPARSE_FIRST_PAGES_MAX } from '../../src/save/stages/coalesce.js';
import {
  BLOCK_F64S,
  SLOT_BLOCK,
  SLOT_BYTES,
  SLOT_CHUNK,
  SLOT_CRC,
  SLOT_CRC_UPDATE,
  SLOT_FIRST,
  SLOT_INTS,
  SLOT_SEEN_BITS,
  SLOT_SEEN_COUNT,
  SLOT_WHOLE,
} from '../../src/save/ring/layout.js';
import { pageContent } from '../helpers/model.js';

/** The clusters as the writer leaves them on disk, and the CRC it holds for each. */
type Disk = Map<string, { bytes: Uint8Array; crc: number }>;
const ZERO_CLUSTER_CRC = crc32cJs(new Uint8Array(SLOT_BYTES));

/**
 * Applies a published slot to `disk` as the writer would: a new cluster (a hole: zeros) gets the whole slot or only
 * its carried pages, a cluster written before gets its carried pages. Checks the coalescer's CRC of a first
 * publication against the bytes on disk, and updates the cluster's CRC for a later one as the writer does (from the
 * zero cluster when SLOT_CRC_UPDATE says the carried pages read as zeros, which is checked, else from their old
 * content), checking the result against the bytes on disk. Returns the cluster's content after this write.
 */
function asWritten(disk: Disk, slots: Uint8Array, headers: Int32Array, s: number): { seen: number[]; bytes: Uint8Array; whole: boolean; crcUpdate: boolean } {
  const h = s * SLOT_INTS;
  const seen: number[] = [];
  for (let p = 0; p < 256; p++) if (headers[h + SLOT_SEEN_BITS + (p >>> 5)] & (1 << (p & 31))) seen.push(p);
  expect(seen.length).toBe(headers[h + SLOT_SEEN_COUNT]);
  const slot = slots.subarray(s * SLOT_BYTES, (s + 1) * SLOT_BYTES);
  const whole = headers[h + SLOT_WHOLE] === 1;
  const first = headers[h + SLOT_FIRST] === 1;
  const key = `${headers[h + SLOT_BLOCK]}:${headers[h + SLOT_CHUNK]}`;
  expect(disk.has(key)).toBe(!first);
  if (whole) expect(first).toBe(true);
  if (first) expect(whole).toBe(seen.length >= SPARSE_FIRST_PAGES_MAX);
  const cluster = disk.get(key) ?? { bytes: new Uint8Array(SLOT_BYTES), crc: ZERO_CLUSTER_CRC };
  // The old content of the carried pages, zeros elsewhere (what the writer reads before overwriting them).
  const old = new Uint8Array(SLOT_BYTES);
  for (const p of seen) old.set(cluster.bytes.subarray(p * 4096, (p + 1) * 4096), p * 4096);
  if (whole) cluster.bytes.set(slot);
  else for (const p of seen) cluster.bytes.set(slot.subarray(p * 4096, (p + 1) * 4096), p * 4096);
  const crcUpdate = headers[h + SLOT_CRC_UPDATE] === 1;
  if (first) {
    expect(crcUpdate).toBe(false);
    cluster.crc = headers[h + SLOT_CRC] >>> 0;
    expect(cluster.crc).toBe(crc32cJs(cluster.bytes));
  } else {
    if (crcUpdate) expect(old.every((b) => b === 0)).toBe(true);
    const oldCrc = crcUpdate ? ZERO_CLUSTER_CRC : crc32cJs(old);
    cluster.crc = (cluster.crc ^ oldCrc ^ (headers[h + SLOT_CRC] >>> 0)) >>> 0;
    expect(cluster.crc).toBe(crc32cJs(cluster.bytes));
  }
  disk.set(key, cluster);
  return { seen, bytes: cluster.bytes.slice(), whole, crcUpdate };
}

/** A coalescer over real slot memory; published slots are recorded and returned to the free list at once. */
function setup(slotCount: number, maxOpen: number, blockPages: number[]) {
  const slots = new Uint8Array(slotCount * SLOT_BYTES);
  const headers = new Int32Array(slotCount * SLOT_INTS);
  const free = Array.from({ length: slotCount }, (_, i) => i);
  const published: { block: number; chunk: number; seen: number[]; bytes: Uint8Array; whole: boolean; crcUpdate: boolean }[] = [];
  const disk: Disk = new Map();
  const co = new Coalescer(slots, headers, {
    acquire: () => {
      const s = free.shift();
      if (s === undefined) throw new Error('no free slot: the coalescer holds more than maxOpen');
      return s;
    },
    publish: (s) => {
      const h = s * SLOT_INTS;
      published.push({ block: headers[h + SLOT_BLOCK], chunk: headers[h + SLOT_CHUNK], ...asWritten(disk, slots, headers, s) });
      free.push(s);
    },
  }, maxOpen);
  const table = new Float64Array(blockPages.length * BLOCK_F64S);
  let vc = 0;
  blockPages.forEach((pages, b) => {
    table[b * 2] = pages;
    table[b * 2 + 1] = vc;
    vc += Math.ceil(pages / 256);
  });
  co.setup(table, blockPages.length);
  const ring = new Uint8Array(65536);
  const page = (block: number, p: number, seed: number) => {
    ring.set(pageContent(seed), 8192);
    co.page(block, p, ring, 8192, ring.length - 1);
  };
  return { co, published, page };
}

describe('Coalescer', () => {
  it('publishes a chunk when its last page first arrives, counting zero records sent before it opened', () => {
    const { co, published, page } = setup(4, 2, [512]);
    co.zero(0, 0);
    co.zero(0, 1);
    for (let p = 2; p < 256; p++) page(0, p, p);
    expect(published).toHaveLength(1);
    expect(published[0].chunk).toBe(0);
    expect(published[0].bytes.subarray(0, 8192).every((b) => b === 0)).toBe(true);
    expect(Buffer.compare(published[0].bytes.subarray(5 * 4096, 6 * 4096), pageContent(5))).toBe(0);
    expect(co.counters.partialChunks).toBe(0);
  });

  it('an all-zero chunk never takes a slot', () => {
    const { co, published } = setup(4, 2, [256]);
    for (let p = 0; p < 256; p++) co.zero(0, p);
    co.finish();
    expect(published).toHaveLength(0);
  });

  it('evicts the least recently touched chunk when too many are open, zero-filling pages it does not carry', () => {
    const { co, published, page } = setup(4, 2, [256 * 4]);
    page(0, 0, 1); // chunk 0
    page(0, 256, 2); // chunk 1
    page(0, 1, 3); // touches chunk 0 again
    page(0, 512, 4); // chunk 2: evicts chunk 1 (least recently touched)
    expect(published.map((p) => p.chunk)).toEqual([1]);
    expect(published[0].seen).toEqual([0]);
    expect(published[0].bytes.subarray(4096).every((b) => b === 0)).toBe(true);
    co.finish();
    expect(published.map((p) => p.chunk).sort()).toEqual([0, 1, 2]);
    expect(co.counters.partialChunks).toBe(3);
  });

  it('re-sent pages wait for eviction; a zero re-sent over data is carried so the writer clears it', () => {
    const { co, published, page } = setup(4, 2, [256]);
    for (let p = 0; p < 256; p++) page(0, p, p);
    expect(published).toHaveLength(1);
    page(0, 7, 1000);
    co.zero(0, 9);
    co.zero(0, 10); // was data: must be carried as zeros
    expect(published).toHaveLength(1); // re-sent pages do not complete the chunk
    co.finish();
    expect(published[1].seen).toEqual([7, 9, 10]);
    expect(Buffer.compare(published[1].bytes.subarray(7 * 4096, 8 * 4096), pageContent(1000))).toBe(0);
    expect(published[1].bytes.subarray(9 * 4096, 11 * 4096).every((b) => b === 0)).toBe(true);
    expect(co.counters.resentPages).toBe(3);
    expect(Array.from(co.data[0].subarray(1, 2))).toEqual([0b11111001 & 0xff]);
  });

  it('the last chunk of a block completes at the block end', () => {
    const { published, page } = setup(4, 2, [300]);
    for (let p = 256; p < 300; p++) page(0, p, p);
    expect(published).toHaveLength(1);
    expect(published[0].chunk).toBe(1);
    expect(published[0].bytes.subarray(44 * 4096).every((b) => b === 0)).toBe(true);
  });
});

describe('Coalescer checksum updates', () => {
  it('a later write over pages that read as zeros updates the CRC; one over data on disk asks for a read-back', () => {
    const { co, published, page } = setup(4, 2, [256 * 4]);
    page(0, 256 + 1, 1);
    page(0, 256 + 2, 2);
    page(0, 0, 3);
    page(0, 512, 4); // evicts chunk 1 with its two pages: written sparse
    expect(published.map((x) => [x.chunk, x.whole, x.crcUpdate])).toEqual([[1, false, false]]);
    for (let p = 256; p < 512; p++) if (p !== 257 && p !== 258) page(0, p, 10 + p); // the walk completes chunk 1
    const c1 = published.filter((x) => x.chunk === 1);
    expect(c1).toHaveLength(2);
    expect(c1[1].crcUpdate).toBe(true); // none of the 254 pages was on disk: CRC updated, checked by asWritten
    page(0, 300, 999); // re-sent over data that is on disk
    co.zero(0, 301); // and a data page re-sent as zero
    co.finish();
    const last = published.filter((x) => x.chunk === 1).pop()!;
    expect(last.seen).toEqual([44, 45]);
    expect(last.crcUpdate).toBe(false);
    expect(Buffer.compare(last.bytes.subarray(44 * 4096, 45 * 4096), pageContent(999))).toBe(0);
    expect(last.bytes.subarray(45 * 4096, 46 * 4096).every((x) => x === 0)).toBe(true);
  });
});

describe('Coalescer park pool', () => {
  /**
   * Like setup(), with a park pool of `parkPages` pages. Slots, input ring and park pool share one buffer, as in the
   * pipeline, so page and park copies go through the batched native memmove (setup() covers separate buffers).
   */
  function withPark(slotCount: number, maxOpen: number, blockPages: number[], parkPages: number) {
    const RING_BYTES = 65536;
    const memory = new ArrayBuffer(slotCount * SLOT_BYTES + RING_BYTES + parkPages * 4096);
    const slots = new Uint8Array(memory, 0, slotCount * SLOT_BYTES);
    const ring = new Uint8Array(memory, slotCount * SLOT_BYTES, RING_BYTES);
    const park = new Uint8Array(memory, slotCount * SLOT_BYTES + RING_BYTES, parkPages * 4096);
    const headers = new Int32Array(slotCount * SLOT_INTS);
    const free = Array.from({ length: slotCount }, (_, i) => i);
    const published: { chunk: number; seen: number[]; bytes: Uint8Array; whole: boolean; crcUpdate: boolean }[] = [];
    const disk: Disk = new Map();
    const co = new Coalescer(
      slots,
      headers,
      {
        acquire: () => {
          const s = free.shift();
          if (s === undefined) throw new Error('no free slot');
          return s;
        },
        publish: (s) => {
          published.push({ chunk: headers[s * SLOT_INTS + SLOT_CHUNK], ...asWritten(disk, slots, headers, s) });
          free.push(s);
        },
      },
      maxOpen,
      parkPages,
      park,
    );
    const table = new Float64Array(blockPages.length * BLOCK_F64S);
    blockPages.forEach((pages, b) => {
      table[b * 2] = pages;
      table[b * 2 + 1] = b * 1000;
    });
    co.setup(table, blockPages.length);
    const page = (p: number, seed: number) => {
      // The coalescer may still hold a queued copy out of the ring: flush it before the ring is overwritten, as the
      // coalescer worker does before it releases input.
      co.flushCopies();
      ring.set(pageContent(seed), 0);
      co.page(0, p, ring, 0, ring.length - 1);
    };
    return { co, published, page };
  }

  it('parks the pages of a nearly empty evicted chunk and merges them when the walk reaches it: one whole write', () => {
    const { co, published, page } = withPark(4, 2, [256 * 8], 64);
    page(5 * 256 + 10, 1); // pulled forward: chunk 5
    page(7 * 256 + 3, 2); // pulled forward: chunk 7
    page(0, 3); // the walk: chunk 0 opens, evicting chunk 5 (parked, not written)
    expect(published).toHaveLength(0);
    expect(co.counters.parkedPages).toBe(1);
    for (let p = 1; p < 256; p++) page(p, 100 + p); // evicts chunk 7 (parked) and completes chunk 0
    expect(published.map((x) => x.chunk)).toEqual([0]);
    for (let p = 5 * 256; p < 6 * 256; p++) if (p !== 5 * 256 + 10) page(p, 200 + p);
    expect(published.map((x) => x.chunk)).toEqual([0, 5]);
    expect(Buffer.compare(published[1].bytes.subarray(10 * 4096, 11 * 4096), pageContent(1))).toBe(0);
    expect(co.counters.partialChunks).toBe(0);
    co.finish(); // chunk 7's parked page goes out at the end
    expect(published.map((x) => x.chunk)).toEqual([0, 5, 7]);
    expect(Buffer.compare(published[2].bytes.subarray(3 * 4096, 4 * 4096), pageContent(2))).toBe(0);
    expect(co.parkedNow).toBe(0);
  });

  it('a zero record drops a parked page; a re-sent page replaces it', () => {
    const { co, published, page } = withPark(4, 1, [256 * 4], 64);
    page(256 + 1, 1);
    page(256 + 2, 2);
    page(0, 3); // parks chunk 1's two pages
    co.zero(0, 256 + 1); // drops the parked page 1
    page(512, 4); // parks chunk 0 (one page), opens chunk 2
    page(256 + 2, 5); // chunk 1 reopens with its parked page 2, then the re-sent version replaces it
    co.finish();
    const c1 = published.find((x) => x.chunk === 1)!;
    expect(c1.bytes.subarray(4096, 8192).every((b) => b === 0)).toBe(true);
    expect(Buffer.compare(c1.bytes.subarray(2 * 4096, 3 * 4096), pageContent(5))).toBe(0);
    expect(co.counters.resentPages).toBe(2); // the zero over page 257 and the new version of page 258
  });

  it('with the pool full, an evicted chunk is written as it is', () => {
    const { co, published, page } = withPark(4, 1, [256 * 4], 1);
    page(256 + 1, 1);
    page(256 + 2, 2);
    page(0, 3); // two pages do not fit a one-page pool: chunk 1 is published
    expect(published.map((x) => x.chunk)).toEqual([1]);
    expect(co.counters.parkedPages).toBe(0);
  });
});
