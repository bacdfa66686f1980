// Coalescing: pages, in whatever order the stream brings them, are copied into 1 MiB chunk slots (one per
// RAM-block chunk, which becomes one image cluster). A chunk is handed to the writer when the last of its pages
// arrives for the first time (zero records count, even those that came before the chunk was opened), or when it is
// the least recently touched of too many open chunks, or at the end of the stream. Pages re-sent by plain
// migration never complete a chunk: they wait in it for eviction, so nearby re-sent pages go out together. Background snapshots pull pages
// the guest writes forward; keeping a bounded set of chunks open lets the rest of each chunk catch up, so writes
// stay 1 MiB instead of degrading to 4 KiB pieces.
//
// Invariant kept on disk: a page whose last record was data holds that data; every other page of an allocated
// cluster holds zeros. Fresh clusters are written whole (absent pages zero-filled); clusters written before get
// only the pages this publication carries (data, or zeros for pages re-sent as ZERO after data).
import { PAGE_BYTES, PAGES_PER_CHUNK } from '../image/types.js';
import {
  BLOCK_F64S,
  BLOCK_PAGES,
  BLOCK_VIRT_CLUSTER,
  SLOT_BLOCK,
  SLOT_BYTES,
  SLOT_CHUNK,
  SLOT_INTS,
  SLOT_PAGES_IN_CHUNK,
  SLOT_SEEN_BITS,
  SLOT_SEEN_COUNT,
  SLOT_VIRT_CLUSTER,
} from '../ring/layout.js';

export interface SlotPool {
  /** A free slot number (may wait for the writer). */
  acquire(): number;
  /** Hands a filled slot to the writer. */
  publish(slot: number): void;
}

export interface CoalesceCounters {
  dataRecords: number;
  zeroRecords: number;
  resentPages: number;
  chunksPublished: number;
  /** Chunks published without being complete: evicted as least recently touched, or still open at the end. */
  partialChunks: number;
}

export class Coalescer {
  private blockPages: number[] = [];
  private blockVirtCluster: number[] = [];
  /** Per block: page sent at least once / last record was data. LSB-first bit order. */
  sent: Uint8Array[] = [];
  data: Uint8Array[] = [];
  /** Per block, per chunk: pages sent at least once. The chunk is complete when this reaches its page count. */
  private chunkSent: Uint16Array[] = [];
  /** Open chunks by virtual cluster, in least-recently-touched order (Map keeps insertion order). */
  private readonly open = new Map<number, number>();
  private lastTouched = -1;
  /** Per slot: which pages of the chunk hold data copied in this publication (8 x u32). */
  private readonly present: Uint32Array;
  private readonly presentCount: Int32Array;
  /** The whole buffer behind `slots`, for copyWithin. */
  private readonly whole: Uint8Array;
  readonly counters: CoalesceCounters = {
    dataRecords: 0,
    zeroRecords: 0,
    resentPages: 0,
    chunksPublished: 0,
    partialChunks: 0,
  };

  constructor(
    private readonly slots: Uint8Array,
    private readonly headers: Int32Array,
    private readonly pool: SlotPool,
    private readonly maxOpen: number,
  ) {
    const slotCount = headers.length / SLOT_INTS;
    if (slots.length < slotCount * SLOT_BYTES) throw new RangeError('slot memory smaller than the slot count');
    if (maxOpen < 1 || maxOpen >= slotCount) throw new RangeError(`maxOpen ${maxOpen} must be in [1, ${slotCount - 1}]`);
    this.present = new Uint32Array(slotCount * 8);
    this.whole = new Uint8Array(slots.buffer);
    this.presentCount = new Int32Array(slotCount);
  }

  /** Reads the block table the reader filled in. */
  setup(table: Float64Array, blockCount: number): void {
    for (let b = 0; b < blockCount; b++) {
      const pages = table[b * BLOCK_F64S + BLOCK_PAGES];
      this.blockPages.push(pages);
      this.blockVirtCluster.push(table[b * BLOCK_F64S + BLOCK_VIRT_CLUSTER]);
      this.sent.push(new Uint8Array(Math.ceil(pages / 8)));
      this.data.push(new Uint8Array(Math.ceil(pages / 8)));
      this.chunkSent.push(new Uint16Array(Math.ceil(pages / PAGES_PER_CHUNK)));
    }
  }

  /** A data page whose bytes are at src[pos & mask ...] (a ring: they may wrap). */
  page(block: number, page: number, src: Uint8Array, pos: number, mask: number): void {
    this.counters.dataRecords++;
    const byte = page >>> 3;
    const bit = 1 << (page & 7);
    const chunk = Math.floor(page / PAGES_PER_CHUNK);
    const completes = this.countSent(block, page, chunk, byte, bit);
    this.data[block][byte] |= bit;

    const vc = this.blockVirtCluster[block] + chunk;
    const slot = this.openChunk(block, chunk, vc);
    const inChunk = page % PAGES_PER_CHUNK;
    const dst = slot * SLOT_BYTES + inChunk * PAGE_BYTES;
    const at = pos & mask;
    const first = Math.min(PAGE_BYTES, src.length - at);
    this.copy(src, at, dst, first);
    if (first < PAGE_BYTES) this.copy(src, 0, dst + first, PAGE_BYTES - first);

    const w = slot * 8 + (inChunk >>> 5);
    const m = 1 << (inChunk & 31);
    if (!(this.present[w] & m)) {
      this.present[w] |= m;
      this.presentCount[slot]++;
    }
    this.markSeen(slot, inChunk);
    if (completes) this.publishSlot(slot);
  }

  zero(block: number, page: number): void {
    this.counters.zeroRecords++;
    const byte = page >>> 3;
    const bit = 1 << (page & 7);
    const chunk = Math.floor(page / PAGES_PER_CHUNK);
    const completes = this.countSent(block, page, chunk, byte, bit);
    const wasData = (this.data[block][byte] & bit) !== 0;
    this.data[block][byte] &= ~bit;

    const vc = this.blockVirtCluster[block] + chunk;
    let slot = this.open.get(vc);
    if (slot === undefined) {
      if (!wasData) return; // nothing on disk to clear, and no open chunk to complete
      slot = this.openChunk(block, chunk, vc);
    } else {
      this.touch(vc, slot);
    }
    const inChunk = page % PAGES_PER_CHUNK;
    const w = slot * 8 + (inChunk >>> 5);
    const m = 1 << (inChunk & 31);
    if (this.present[w] & m) {
      this.present[w] &= ~m;
      this.presentCount[slot]--;
    }
    this.markSeen(slot, inChunk);
    if (completes) this.publishSlot(slot);
  }

  /** Records that the page was sent; true when this is the first arrival of the chunk's last unsent page. */
  private countSent(block: number, page: number, chunk: number, byte: number, bit: number): boolean {
    if (this.sent[block][byte] & bit) {
      this.counters.resentPages++;
      return false;
    }
    this.sent[block][byte] |= bit;
    const pagesInChunk = Math.min(PAGES_PER_CHUNK, this.blockPages[block] - chunk * PAGES_PER_CHUNK);
    return ++this.chunkSent[block][chunk] === pagesInChunk;
  }

  /**
   * Copies n bytes from src[from] to slots[to]. When both live in the same shared buffer (the pipeline's one data
   * allocation), copyWithin moves them without creating a view per page (measured: 266 vs 452 ns per page here).
   */
  private copy(src: Uint8Array, from: number, to: number, n: number): void {
    if (src.buffer === this.slots.buffer) {
      const a = src.byteOffset + from;
      this.whole.copyWithin(this.slots.byteOffset + to, a, a + n);
    } else {
      this.slots.set(src.subarray(from, from + n), to);
    }
  }

  /** Publishes every chunk still open (end of stream). */
  finish(): void {
    for (const slot of [...this.open.values()]) {
      this.counters.partialChunks++;
      this.publishSlot(slot);
    }
  }

  get openChunks(): number {
    return this.open.size;
  }

  private touch(vc: number, slot: number): void {
    if (vc === this.lastTouched) return;
    this.open.delete(vc);
    this.open.set(vc, slot);
    this.lastTouched = vc;
  }

  private openChunk(block: number, chunk: number, vc: number): number {
    const existing = this.open.get(vc);
    if (existing !== undefined) {
      this.touch(vc, existing);
      return existing;
    }
    if (this.open.size >= this.maxOpen) {
      const lru = this.open.values().next().value as number;
      this.counters.partialChunks++;
      this.publishSlot(lru);
    }
    const slot = this.pool.acquire();
    const h = slot * SLOT_INTS;
    this.headers[h + SLOT_BLOCK] = block;
    this.headers[h + SLOT_CHUNK] = chunk;
    this.headers[h + SLOT_VIRT_CLUSTER] = vc;
    this.headers[h + SLOT_PAGES_IN_CHUNK] = Math.min(PAGES_PER_CHUNK, this.blockPages[block] - chunk * PAGES_PER_CHUNK);
    this.headers[h + SLOT_SEEN_COUNT] = 0;
    this.headers.fill(0, h + SLOT_SEEN_BITS, h + SLOT_SEEN_BITS + 8);
    this.present.fill(0, slot * 8, slot * 8 + 8);
    this.presentCount[slot] = 0;
    this.open.set(vc, slot);
    this.lastTouched = vc;
    return slot;
  }

  private markSeen(slot: number, inChunk: number): void {
    const h = slot * SLOT_INTS;
    const w = h + SLOT_SEEN_BITS + (inChunk >>> 5);
    const m = 1 << (inChunk & 31);
    if (this.headers[w] & m) return;
    this.headers[w] |= m;
    this.headers[h + SLOT_SEEN_COUNT]++;
  }

  private publishSlot(slot: number): void {
    const h = slot * SLOT_INTS;
    const vc = this.headers[h + SLOT_VIRT_CLUSTER];
    this.open.delete(vc);
    if (this.lastTouched === vc) this.lastTouched = -1;
    // Zero-fill every page that holds no data from this publication (including the cluster's tail beyond the block).
    if (this.presentCount[slot] < PAGES_PER_CHUNK) {
      const base = slot * SLOT_BYTES;
      let runStart = -1;
      for (let p = 0; p <= PAGES_PER_CHUNK; p++) {
        const isPresent = p < PAGES_PER_CHUNK && (this.present[slot * 8 + (p >>> 5)] & (1 << (p & 31))) !== 0;
        if (!isPresent && p < PAGES_PER_CHUNK) {
          if (runStart < 0) runStart = p;
        } else if (runStart >= 0) {
          this.slots.fill(0, base + runStart * PAGE_BYTES, base + p * PAGE_BYTES);
          runStart = -1;
        }
      }
    }
    this.counters.chunksPublished++;
    this.pool.publish(slot);
  }
}

export function popcount8(bits: Uint8Array): number {
  let n = 0;
  for (let i = 0; i < bits.length; i++) {
    let v = bits[i];
    while (v) {
      v &= v - 1;
      n++;
    }
  }
  return n;
}
