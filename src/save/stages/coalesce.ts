// Coalescing: pages, in whatever order the stream brings them, are copied into 1 MiB chunk slots (one per
// RAM-block chunk, which becomes one image cluster). A chunk is handed to the writer when the last of its pages
// arrives for the first time (zero records count, even those that came before the chunk was opened), or when it is
// the least recently touched of too many open chunks, or at the end of the stream. Pages re-sent by plain
// migration never complete a chunk: they wait in it for eviction, so nearby re-sent pages go out together. Background snapshots pull pages
// the guest writes forward; keeping a bounded set of chunks open lets the rest of each chunk catch up, so writes
// stay 1 MiB instead of degrading to 4 KiB pieces.
//
// Pages far ahead of the walk (a background snapshot sends pages the guest writes first) would each hold a whole
// slot open; when such a nearly empty chunk is evicted and its cluster was never written, its few pages are parked
// in a bounded pool of 4 KiB entries instead of being written as a mostly-zero cluster that the walk would rewrite
// later. They rejoin their chunk when it opens again; at the end (or if the pool is full) they go out as they are.
//
// Invariant kept on disk: a page whose last record was data holds that data; every other page of an allocated
// cluster holds zeros. Fresh clusters are written whole (absent pages zero-filled), or, when they carry few pages,
// only those pages (the rest is a hole in the file, read as zeros); clusters written before get only the pages this
// publication carries (data, or zeros for pages re-sent as ZERO after data).
import { PAGE_BYTES, PAGES_PER_CHUNK } from '../../format/units.js';
import { crc32c, crc32cOfPages, RangeCopier, zeroFill } from '../../native/fastmem.js';
import {
  BLOCK_F64S,
  BLOCK_PAGES,
  BLOCK_VIRT_CLUSTER,
  SLOT_BLOCK,
  SLOT_BYTES,
  SLOT_CHUNK,
  SLOT_CRC,
  SLOT_CRC_UPDATE,
  SLOT_FIRST,
  SLOT_INTS,
  SLOT_PAGES_IN_CHUNK,
  SLOT_SEEN_BITS,
  SLOT_SEEN_COUNT,
  SLOT_VIRT_CLUSTER,
  SLOT_WHOLE,
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
  /** Pages parked out of evicted, nearly empty chunks (each later rejoined its chunk). */
  parkedPages: number;
}

/**
 * A first publication carrying fewer pages (data or zero) than this is written as runs of those pages, not whole.
 * Background snapshots evict nearly empty chunks of pages pulled far ahead when the park pool is full; written whole,
 * each cost 1 MiB then and the walk's pages were written into it again later (a 4 GiB background stream wrote
 * 4.61 GB for 3.31 GB; 3.51 GB with this).
 */
export const SPARSE_FIRST_PAGES_MAX = PAGES_PER_CHUNK / 4;

/** A chunk evicted with at most this many pages, whose cluster was never written, is parked instead of written. */
export const PARK_PAGES_MAX = 64;

interface Parked {
  block: number;
  chunk: number;
  /** Park entry of each page of the chunk, -1 for none. */
  entries: Int32Array;
  count: number;
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
  /** Page copies within the buffer behind `slots`, batched into one native call (see copy()). */
  private readonly copier: RangeCopier;
  readonly counters: CoalesceCounters = {
    dataRecords: 0,
    zeroRecords: 0,
    resentPages: 0,
    chunksPublished: 0,
    partialChunks: 0,
    parkedPages: 0,
  };
  /** Per block, per chunk: the chunk's cluster has been published (written) at least once. */
  private written: Uint8Array[] = [];
  /** Per block: the page holds data on disk (its last publication carried it as data). LSB-first bit order. */
  private onDisk: Uint8Array[] = [];
  private readonly parkBytes: Uint8Array;
  private readonly parkFree: Int32Array;
  private parkFreeTop: number;
  private readonly parked = new Map<number, Parked>();

  constructor(
    private readonly slots: Uint8Array,
    private readonly headers: Int32Array,
    private readonly pool: SlotPool,
    private readonly maxOpen: number,
    /** Park pool capacity in pages (0: never park). */
    parkPages = 0,
    /** Memory for the park pool (parkPages x 4 KiB); in the slots' buffer, its copies are batched native memmoves. */
    parkMemory?: Uint8Array,
  ) {
    const slotCount = headers.length / SLOT_INTS;
    if (slots.length < slotCount * SLOT_BYTES) throw new RangeError('slot memory smaller than the slot count');
    if (maxOpen < 1 || maxOpen >= slotCount) throw new RangeError(`maxOpen ${maxOpen} must be in [1, ${slotCount - 1}]`);
    this.present = new Uint32Array(slotCount * 8);
    this.copier = new RangeCopier(new Uint8Array(slots.buffer));
    this.presentCount = new Int32Array(slotCount);
    if (parkMemory && parkMemory.length < parkPages * PAGE_BYTES) throw new RangeError('park memory smaller than parkPages');
    this.parkBytes = parkMemory ?? new Uint8Array(parkPages * PAGE_BYTES);
    this.parkFree = new Int32Array(parkPages);
    for (let i = 0; i < parkPages; i++) this.parkFree[i] = parkPages - 1 - i;
    this.parkFreeTop = parkPages;
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
      this.written.push(new Uint8Array(Math.ceil(pages / PAGES_PER_CHUNK)));
      this.onDisk.push(new Uint8Array(Math.ceil(pages / 8)));
    }
  }

  /** A data page whose bytes are at src[pos & mask ...] (a ring: they may wrap). */
  page(block: number, page: number, src: Uint8Array, pos: number, mask: number): void {
    this.counters.dataRecords++;
    const byte = page >>> 3;
    const bit = 1 << (page & 7);
    const chunk = Math.floor(page / PAGES_PER_CHUNK);
    const completes = this.countSent(block, chunk, byte, bit);
    this.data[block][byte] |= bit;

    const vc = this.blockVirtCluster[block] + chunk;
    const slot = this.openChunk(block, chunk, vc);
    const inChunk = page % PAGES_PER_CHUNK;
    const dst = slot * SLOT_BYTES + inChunk * PAGE_BYTES;
    // A page that wraps around the end of the input ring is copied in two pieces, by the same call site: a second
    // call written for the rare wrap would have no type feedback when V8 optimized this function, and reaching it
    // (every 16 MiB of stream) threw the optimized code of page(), copy(), move() and the copier's add() away.
    for (let done = 0, at = pos & mask; done < PAGE_BYTES; at = 0) {
      const n = Math.min(PAGE_BYTES - done, src.length - at);
      this.copy(src, at, dst + done, n);
      done += n;
    }

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
    const completes = this.countSent(block, chunk, byte, bit);
    const wasData = (this.data[block][byte] & bit) !== 0;
    this.data[block][byte] &= ~bit;

    const vc = this.blockVirtCluster[block] + chunk;
    const inChunk = page % PAGES_PER_CHUNK;
    let slot = this.open.get(vc);
    if (slot === undefined) {
      const pk = this.parked.get(vc);
      if (pk !== undefined) {
        // Never written: dropping the parked copy is all a zero page needs.
        this.unpark(vc, pk, inChunk);
        if (completes && pk.count > 0) this.publishSlot(this.openChunk(block, chunk, vc));
        return;
      }
      if (!wasData) return; // nothing on disk to clear, and no open chunk to complete
      slot = this.openChunk(block, chunk, vc);
    } else {
      this.touch(vc, slot);
    }
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
  private countSent(block: number, chunk: number, byte: number, bit: number): boolean {
    if (this.sent[block][byte] & bit) {
      this.counters.resentPages++;
      return false;
    }
    this.sent[block][byte] |= bit;
    const pagesInChunk = Math.min(PAGES_PER_CHUNK, this.blockPages[block] - chunk * PAGES_PER_CHUNK);
    return ++this.chunkSent[block][chunk] === pagesInChunk;
  }

  /** Copies n bytes from src[from] to slots[to] (see move()). */
  private copy(src: Uint8Array, from: number, to: number, n: number): void {
    this.move(this.slots, to, src, from, n);
  }

  /**
   * Copies n bytes from src[srcAt] to dst[dstAt]. When both live in the slots' shared buffer (the pipeline's one data
   * allocation: input ring, slots, park pool), the copy is queued and done with the others of the batch in one
   * native memmove call: V8 copies shared memory word by word (2.3 GB/s here for 4 KiB pages, against 6.2 GB/s
   * through the addon). Queued copies run in the order queued, so a page parked out of a slot is read before the
   * slot's next chunk is copied over it; they are flushed before a slot's bytes are read (publish, park) and before
   * the caller releases input (flushCopies).
   */
  private move(dst: Uint8Array, dstAt: number, src: Uint8Array, srcAt: number, n: number): void {
    if (src.buffer === this.slots.buffer && dst.buffer === this.slots.buffer) {
      this.copier.add(dst.byteOffset + dstAt, src.byteOffset + srcAt, n);
    } else {
      this.copier.flush();
      dst.set(src.subarray(srcAt, srcAt + n), dstAt);
    }
  }

  /** Completes every queued page copy: call before the input the pages came from may be overwritten. */
  flushCopies(): void {
    this.copier.flush();
  }

  /** Publishes every chunk still open (end of stream). */
  finish(): void {
    for (const slot of [...this.open.values()]) {
      this.counters.partialChunks++;
      this.publishSlot(slot);
    }
    for (const [vc, pk] of [...this.parked]) {
      this.counters.partialChunks++;
      this.publishSlot(this.openChunk(pk.block, pk.chunk, vc));
    }
  }

  get parkedNow(): number {
    return this.parkFree.length - this.parkFreeTop;
  }

  private unpark(vc: number, pk: Parked, inChunk: number): void {
    const e = pk.entries[inChunk];
    if (e < 0) return;
    pk.entries[inChunk] = -1;
    this.parkFree[this.parkFreeTop++] = e;
    if (--pk.count === 0) this.parked.delete(vc);
  }

  /** Moves the pages of an evicted chunk into the park pool; the slot is free again afterwards. */
  private park(slot: number, vc: number): void {
    // No flush needed: the copies out of the slot queue behind any copies still pending into it.
    const h = slot * SLOT_INTS;
    const pk: Parked = { block: this.headers[h + SLOT_BLOCK], chunk: this.headers[h + SLOT_CHUNK], entries: new Int32Array(PAGES_PER_CHUNK).fill(-1), count: 0 };
    const base = slot * SLOT_BYTES;
    for (let p = 0; p < PAGES_PER_CHUNK; p++) {
      if (!(this.present[slot * 8 + (p >>> 5)] & (1 << (p & 31)))) continue;
      const e = this.parkFree[--this.parkFreeTop];
      this.move(this.parkBytes, e * PAGE_BYTES, this.slots, base + p * PAGE_BYTES, PAGE_BYTES);
      pk.entries[p] = e;
      pk.count++;
    }
    this.counters.parkedPages += pk.count;
    this.open.delete(vc);
    if (this.lastTouched === vc) this.lastTouched = -1;
    if (pk.count > 0) this.parked.set(vc, pk);
  }

  /** Evicts the least recently touched open chunk: parks it if it is nearly empty and never written (its slot is
   * returned for reuse), else publishes it. */
  private evict(): number | undefined {
    const slot = this.open.values().next().value as number;
    const h = slot * SLOT_INTS;
    const vc = this.headers[h + SLOT_VIRT_CLUSTER];
    const n = this.presentCount[slot];
    if (n <= PARK_PAGES_MAX && n <= this.parkFreeTop && !this.written[this.headers[h + SLOT_BLOCK]][this.headers[h + SLOT_CHUNK]]) {
      this.park(slot, vc);
      return slot;
    }
    this.counters.partialChunks++;
    this.publishSlot(slot);
    return undefined;
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
    let reuse: number | undefined;
    if (this.open.size >= this.maxOpen) reuse = this.evict();
    const slot = reuse ?? this.pool.acquire();
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
    const pk = this.parked.get(vc);
    if (pk !== undefined) {
      // Parked pages rejoin their chunk before anything newer is copied over them.
      const base = slot * SLOT_BYTES;
      for (let p = 0; p < PAGES_PER_CHUNK; p++) {
        const e = pk.entries[p];
        if (e < 0) continue;
        this.move(this.slots, base + p * PAGE_BYTES, this.parkBytes, e * PAGE_BYTES, PAGE_BYTES);
        this.present[slot * 8 + (p >>> 5)] |= 1 << (p & 31);
        this.presentCount[slot]++;
        this.markSeen(slot, p);
        this.parkFree[this.parkFreeTop++] = e;
      }
      this.parked.delete(vc);
    }
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
    this.copier.flush();
    const h = slot * SLOT_INTS;
    const vc = this.headers[h + SLOT_VIRT_CLUSTER];
    this.open.delete(vc);
    if (this.lastTouched === vc) this.lastTouched = -1;
    const block = this.headers[h + SLOT_BLOCK];
    const chunk = this.headers[h + SLOT_CHUNK];
    const first = this.written[block][chunk] === 0;
    // A new cluster carrying few pages is written page run by page run: the rest of it stays a hole in the file and
    // reads as zeros. Anything else new is written whole, every page without data zero-filled (the cluster's tail
    // beyond the block too). A cluster written before gets only the runs of pages this publication carries.
    const whole = first && this.headers[h + SLOT_SEEN_COUNT] >= SPARSE_FIRST_PAGES_MAX;
    this.headers[h + SLOT_FIRST] = first ? 1 : 0;
    this.headers[h + SLOT_WHOLE] = whole ? 1 : 0;
    this.zeroFillUnwritten(slot, whole);
    this.checksum(slot, first, whole); // before markOnDisk: it looks at what is on disk before this write
    this.markOnDisk(slot, whole);
    this.written[block][chunk] = 1;
    this.counters.chunksPublished++;
    this.pool.publish(slot);
  }

  /**
   * Zero-fills the pages that are written but hold no data: all of them for a whole write, else those carried as
   * zero pages. (Filling 1 MiB per nearly empty chunk cost a background snapshot more than its page copies.)
   */
  private zeroFillUnwritten(slot: number, whole: boolean): void {
    if (this.presentCount[slot] >= PAGES_PER_CHUNK) return;
    const h = slot * SLOT_INTS;
    const base = slot * SLOT_BYTES;
    let runStart = -1;
    for (let p = 0; p <= PAGES_PER_CHUNK; p++) {
      const fill = p < PAGES_PER_CHUNK && !this.isPresent(slot, p) && (whole || this.isSeen(h, p));
      if (fill) {
        if (runStart < 0) runStart = p;
      } else if (runStart >= 0) {
        zeroFill(this.slots, base + runStart * PAGE_BYTES, base + p * PAGE_BYTES);
        runStart = -1;
      }
    }
  }

  /**
   * Sets SLOT_CRC and SLOT_CRC_UPDATE. A first publication's CRC is the chunk's checksum. Computing it here, on the
   * thread that just filled the slot, reads it from this core's cache; the writer would read it cold. Pages a sparse
   * write leaves as holes count as zeros without being read.
   *
   * A later publication changes the cluster only where it writes. CRC-32C is affine over equal-length messages:
   * crc(A ^ B) = crc(A) ^ crc(B) ^ crc(Z), Z all zeros, and so crc(A ^ B ^ C) = crc(A) ^ crc(B) ^ crc(C). With
   * N = the carried pages as written (data; zero pages are zeros) and O = their old content on disk, zeros elsewhere
   * in both, the new cluster is old ^ O ^ N: new CRC = old CRC ^ crc(O) ^ crc(N). The coalescer gives crc(N). If
   * every page it writes reads as zeros on disk before (never written, or last written as zeros: a background
   * snapshot's walk reaching a chunk it parked or wrote sparse), O is Z and the writer needs nothing more
   * (SLOT_CRC_UPDATE); otherwise (a page re-sent over data on disk) it reads O before writing.
   */
  private checksum(slot: number, first: boolean, whole: boolean): void {
    const h = slot * SLOT_INTS;
    const base = slot * SLOT_BYTES;
    if (first) {
      this.headers[h + SLOT_CRC] = (whole ? crc32c(this.slots.subarray(base, base + SLOT_BYTES)) : this.presentCrc(slot, base)) | 0;
      this.headers[h + SLOT_CRC_UPDATE] = 0;
      return;
    }
    this.headers[h + SLOT_CRC] = this.presentCrc(slot, base) | 0;
    this.headers[h + SLOT_CRC_UPDATE] = this.overwritesOnlyZeros(h) ? 1 : 0;
  }

  /** Whether every page the publication carries reads as zeros on disk before it is written. */
  private overwritesOnlyZeros(h: number): boolean {
    const onDisk = this.onDisk[this.headers[h + SLOT_BLOCK]];
    const firstPage = this.headers[h + SLOT_CHUNK] * PAGES_PER_CHUNK;
    for (let p = 0; p < PAGES_PER_CHUNK; p++) {
      const q = firstPage + p;
      if (this.isSeen(h, p) && (onDisk[q >>> 3] & (1 << (q & 7))) !== 0) return false;
    }
    return true;
  }

  /**
   * Records what is on disk after this write: data where it carries data, zeros where it carries zeros (a whole
   * write carries every page of the cluster).
   */
  private markOnDisk(slot: number, whole: boolean): void {
    const h = slot * SLOT_INTS;
    const onDisk = this.onDisk[this.headers[h + SLOT_BLOCK]];
    const firstPage = this.headers[h + SLOT_CHUNK] * PAGES_PER_CHUNK;
    const pagesInChunk = this.headers[h + SLOT_PAGES_IN_CHUNK];
    for (let p = 0; p < pagesInChunk; p++) {
      if (!whole && !this.isSeen(h, p)) continue;
      const q = firstPage + p;
      if (this.isPresent(slot, p)) onDisk[q >>> 3] |= 1 << (q & 7);
      else onDisk[q >>> 3] &= ~(1 << (q & 7));
    }
  }

  /** CRC-32C of the slot's cluster with only the pages holding data in this publication, zeros elsewhere. */
  private presentCrc(slot: number, base: number): number {
    return crc32cOfPages(this.slots, base, PAGE_BYTES, PAGES_PER_CHUNK, (p) => this.isPresent(slot, p));
  }

  private isPresent(slot: number, p: number): boolean {
    return (this.present[slot * 8 + (p >>> 5)] & (1 << (p & 31))) !== 0;
  }

  private isSeen(h: number, p: number): boolean {
    return (this.headers[h + SLOT_SEEN_BITS + (p >>> 5)] & (1 << (p & 31))) !== 0;
  }

}

