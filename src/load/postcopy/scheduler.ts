// Which page of a postcopy load goes out next, and the sections that carry it. Shaped like QEMU's own source side
// (migration/ram.c ram_find_and_save_block: get_queued_page first, then find_dirty_block), it asks its sources in
// priority order: pending page requests, warm chunks, the background cursor over the plan's clusters (with its
// read-ahead), and the zero-page cursor spread among the background's clusters. It keeps the "sent once" bitmaps
// and writes to the two encoders it is given; the cluster slots are the ClusterCache's, and it owns no fds.
import assert from 'node:assert/strict';
import { chunksOf, pagesOf } from '../../format/image/metadata.js';
import type { SnapshotMeta } from '../../format/image/types.js';
import { PAGE_BYTES, PAGES_PER_CHUNK } from '../../format/units.js';
import { PART_HEAD_BYTES, PART_TAIL_BYTES, RECORD_HEAD_BYTES_MAX, type StreamEncoder } from '../../format/stream/encoder.js';
import type { Plan } from '../../image/checks.js';
import type { ClusterCache } from './cache.js';
import { LatencyHistogram } from './latency.js';
import { isDataPage } from '../plan.js';

/** Pages per PART section after LISTEN: small, so a request never waits behind much of our own buffer. */
const SECTION_PAGES = 16;
/** ZERO records per PART section. */
const ZERO_SECTION_RECORDS = 256;
/** Background output is written once this much is buffered (requests are flushed at once). */
const FLUSH_BYTES = 128 << 10;
/**
 * Background cluster reads in flight once the guest runs: a request's read queues behind them in the device, so
 * they are few (sequential 1 MiB reads at this depth still outrun what QEMU places).
 */
const BG_READS_IN_FLIGHT = 2;

/** The most bytes a PART section of `pages` PAGE records of one block takes (the first record names the block). */
function pageSectionBytesMax(pages: number): number {
  return PART_HEAD_BYTES + RECORD_HEAD_BYTES_MAX - 8 + pages * (8 + PAGE_BYTES) + PART_TAIL_BYTES;
}

/** The most bytes a PART section of `records` ZERO records takes (each may name its block). */
function zeroSectionBytesMax(records: number): number {
  return PART_HEAD_BYTES + records * (RECORD_HEAD_BYTES_MAX + 1) + PART_TAIL_BYTES;
}

interface PendingRequest {
  block: number;
  firstPage: number;
  pages: number;
  /** Next page of the request to look at. */
  next: number;
  t0: number;
  /** Some page of it was put into the output buffer by this request. */
  wrotePage: boolean;
}

/**
 * Per block, per page: whether the image has data for it (saved, and its last version not zero), and whether it was
 * written to the stream (never twice).
 */
class PageBits {
  /** Pages of each block, and of all of them. */
  readonly pagesIn: number[];
  readonly total: number;
  /** Pages written to the stream. */
  sent = 0;
  private readonly sentOut: Uint8Array[];

  constructor(private readonly meta: SnapshotMeta) {
    this.pagesIn = meta.blocks.map((b) => pagesOf(b));
    this.total = this.pagesIn.reduce((a, n) => a + n, 0);
    this.sentOut = this.pagesIn.map((n) => new Uint8Array(Math.ceil(n / 8)));
  }

  isData(block: number, page: number): boolean {
    return isDataPage(this.meta, block, page);
  }

  isSent(block: number, page: number): boolean {
    return (this.sentOut[block][page >>> 3] & (1 << (page & 7))) !== 0;
  }

  markSent(block: number, page: number): void {
    const b = this.sentOut[block];
    const bit = 1 << (page & 7);
    assert((b[page >>> 3] & bit) === 0, `page ${page} of block ${this.meta.blocks[block].id} sent twice`);
    b[page >>> 3] |= bit;
    this.sent++;
  }

  /** Data pages not yet written among pages [8i, 8i+8) of `block`, one bit each. */
  unsentData(block: number, i: number): number {
    const { sent, data } = this.meta.pages[block];
    return sent[i] & data[i] & ~this.sentOut[block][i] & 0xff;
  }
}

/** Non-data pages (zero or never saved) not yet written; a cursor walks them in block order. */
class ZeroCursor {
  left: number;
  /** Block of the page next() returned. */
  block = 0;
  private page = 0;
  /** After LISTEN: ZERO records due before the next cluster's section, and how many each cluster sent adds. */
  allowance = 0;
  perCluster = 0;

  constructor(private readonly pages: PageBits, dataPages: number) {
    this.left = pages.total - dataPages;
  }

  /** The next non-data page not yet written (its block in `block`), or -1 when none is left. */
  next(): number {
    while (this.left > 0 && this.block < this.pages.pagesIn.length) {
      if (this.page >= this.pages.pagesIn[this.block]) {
        this.block++;
        this.page = 0;
        continue;
      }
      const p = this.page++;
      if (!this.pages.isData(this.block, p) && !this.pages.isSent(this.block, p)) return p;
    }
    return -1;
  }
}

/**
 * Page requests (REQ_PAGES / REQ_PAGES_ID) are served ahead of the background stream: a data page's whole 1 MiB
 * cluster is read (random O_DIRECT read through the I/O backend, alongside the background read-ahead), its CRC-32C
 * checked, the requested page written and flushed at once, and the rest of that cluster sent right after the
 * pending requests (the guest tends to touch neighbours). A request for a zero page (or a page never saved) is
 * answered with a ZERO record; a request for a page already sent is ignored (it is in the pipe). Answers go through
 * their own small output (`urgent`), written ahead of background sections still buffered in `out`; once the guest
 * runs, the background keeps only BG_READS_IN_FLIGHT cluster reads in the device queue, so a request's read waits
 * behind few. Fault latency (reading a request off stdin -> the write holding its page returned) goes into
 * `latency`.
 */
export class PageScheduler {
  readonly pages: PageBits;
  readonly latency = new LatencyHistogram();
  /** What became of requested pages, clusters dropped before all their pages went out, time waiting for them. */
  readonly counts = { requestedDataPages: 0, requestedZeroPages: 0, requestedAlreadySent: 0, evictions: 0, requestReadWaitMs: 0 };
  /** Per block, per chunk: index into plan.chunks, or -1 (no data pages). */
  private readonly chunkIndex: Int32Array[];
  /** Data pages of each plan chunk not yet written. */
  private readonly chunkLeft: Int32Array;
  private readonly zeros: ZeroCursor;
  private readonly requests: PendingRequest[] = [];
  /** Requests whose page is in the output buffer: their latency ends when it is written. */
  private awaitingFlush: PendingRequest[] = [];
  /** Chunks read for a request whose other pages go out before the background continues (oldest first). */
  private warm: number[] = [];
  /** The background cursor over plan chunks, and how far its reads were queued. */
  private bgNext = 0;
  private readAhead = 0;
  private isListening = false;

  constructor(
    private readonly meta: SnapshotMeta,
    private readonly plan: Plan,
    private readonly cache: ClusterCache,
    /** Everything but answers to requests: buffered up to FLUSH_BYTES. */
    private readonly out: StreamEncoder,
    /**
     * Answers to requests, written at once, ahead of background sections still in `out`'s buffer (whole sections in
     * either order are fine for QEMU: each page goes out once and every section names its block).
     */
    private readonly urgent: StreamEncoder,
  ) {
    this.pages = new PageBits(meta);
    this.chunkIndex = meta.blocks.map((b) => new Int32Array(chunksOf(b)).fill(-1));
    plan.chunks.forEach((c, i) => (this.chunkIndex[c.block][c.chunk] = i));
    this.chunkLeft = Int32Array.from(plan.chunks, (c) => c.pages);
    this.zeros = new ZeroCursor(this.pages, plan.dataPages);
  }

  get listening(): boolean {
    return this.isListening;
  }

  // -------------------------------------------------------------------------------------------------------------
  // Before LISTEN: the precopy share

  /** One section of ZERO records (every non-data page goes in the share); false when none is left. */
  precopyZeros(): boolean {
    if (this.zeros.left === 0) return false;
    this.emitZeroSection(ZERO_SECTION_RECORDS * 32);
    return true;
  }

  /** One step of the background over plan chunks [0, limit), whole clusters; false when they all went out. */
  precopyData(limit: number): boolean {
    return this.backgroundStep(limit, false);
  }

  // -------------------------------------------------------------------------------------------------------------
  // After LISTEN

  /**
   * LISTEN went out (after `shareChunks` plan chunks): from now on requests come, background reads are few and
   * sections small, and the non-data pages left are spread over the data clusters left.
   */
  listen(shareChunks: number): void {
    this.isListening = true;
    const dataChunksLeft = this.plan.chunks.length - shareChunks;
    this.zeros.perCluster = dataChunksLeft > 0 ? Math.ceil(this.zeros.left / dataChunksLeft) : 0;
    this.zeros.allowance = this.zeros.perCluster;
  }

  /** A page request read off the return path (validated by the session). */
  request(block: number, firstPage: number, pages: number, t: number): void {
    this.requests.push({ block, firstPage, pages, next: 0, t0: t, wrotePage: false });
  }

  /** After EOF every page went out: requests name pages already sent and are dropped. */
  dropRequests(): void {
    this.requests.length = 0;
  }

  /**
   * One step of the page stream, the sources asked in priority order: pending requests, then warm chunks, then the
   * background. Returns false once there is nothing left to send.
   */
  step(): boolean {
    if (this.requests.length > 0) this.answerRequests();
    else if (this.warm.length > 0) this.warmStep();
    else {
      if (!this.backgroundStep(this.plan.chunks.length, true)) return false;
      this.flushIfFull();
    }
    return true;
  }

  /** Every page went out once: the answers still buffered are written. */
  finish(): void {
    assert.equal(this.pages.sent, this.pages.total, 'every page sent once');
    this.urgent.flush();
    assert.equal(this.zeros.left, 0);
  }

  /** Background output is written once FLUSH_BYTES are buffered. */
  flushIfFull(): void {
    if (this.out.buffered >= FLUSH_BYTES) this.out.flush();
  }

  /** The answers buffered were written: the requests they answered end their fault latency now. */
  answersWritten(): void {
    if (this.awaitingFlush.length === 0) return;
    const t = performance.now();
    for (const q of this.awaitingFlush) this.latency.add(t - q.t0);
    this.awaitingFlush = [];
  }

  // -------------------------------------------------------------------------------------------------------------
  // Requests

  /** Writes the answers that need no wait; if the head request waits for a cluster, waits for a read. */
  private answerRequests(): void {
    if (this.serveRequests()) {
      this.urgent.flush();
      return;
    }
    this.urgent.flush(); // what was served so far
    const t1 = performance.now();
    this.cache.reap();
    this.counts.requestReadWaitMs += performance.now() - t1;
  }

  /**
   * Serves pending requests in order as far as possible without waiting; returns false if the head one waits for
   * a cluster read (which is then queued, along with those of the requests behind it).
   */
  private serveRequests(): boolean {
    while (this.requests.length > 0) {
      const q = this.requests[0];
      for (; q.next < q.pages; q.next++) {
        const answer = this.answerPage(q.block, q.firstPage + q.next);
        if (answer === 'wait') {
          this.queueReadsBehind();
          return false;
        }
        if (answer === 'wrote') q.wrotePage = true;
      }
      this.requests.shift();
      if (q.wrotePage) this.awaitingFlush.push(q);
    }
    return true;
  }

  /** One requested page: already sent, written to `urgent` now, or waiting for its cluster (whose read is queued). */
  private answerPage(block: number, page: number): 'sent' | 'wrote' | 'wait' {
    const id = this.meta.ramSectionId;
    if (this.pages.isSent(block, page)) {
      this.counts.requestedAlreadySent++;
      return 'sent';
    }
    if (!this.pages.isData(block, page)) {
      this.urgent.room(zeroSectionBytesMax(1));
      this.urgent.ramPart(id, 'name-first');
      this.emitZeroPage(this.urgent, block, page);
      this.urgent.ramEos(id);
      this.counts.requestedZeroPages++;
      return 'wrote';
    }
    const ci = this.chunkOf(block, page);
    assert(ci >= 0, 'a data page has a cluster');
    if (!this.cache.has(ci)) {
      this.takeUrgentSlot(ci);
      this.addWarm(ci);
    }
    if (!this.cache.loaded(ci)) return 'wait';
    this.urgent.room(pageSectionBytesMax(1));
    this.urgent.ramPart(id, 'name-first');
    this.emitDataPage(this.urgent, ci, block, page);
    this.urgent.ramEos(id);
    this.counts.requestedDataPages++;
    return 'wrote';
  }

  /** While the head request waits for its cluster, start the reads the requests behind it will need. */
  private queueReadsBehind(): void {
    for (let k = 1; k < this.requests.length; k++) {
      const q = this.requests[k];
      const page = q.firstPage + q.next;
      if (this.pages.isSent(q.block, page) || !this.pages.isData(q.block, page)) continue;
      const ci = this.chunkOf(q.block, page);
      if (this.cache.has(ci)) continue;
      if (!this.cache.hasFreeSlot()) return;
      this.cache.take(ci, true);
      this.addWarm(ci);
    }
  }

  /** A slot for a request's chunk: a free one, else drop the oldest warm chunk not being waited for. */
  private takeUrgentSlot(ci: number): void {
    if (!this.cache.hasFreeSlot() && !this.evictWarm()) this.evictBackground();
    this.cache.take(ci, true);
  }

  private evictWarm(): boolean {
    for (let k = 0; k < this.warm.length; k++) {
      const w = this.warm[k];
      if (this.cache.loaded(w) && !this.requests.some((q) => this.chunkOf(q.block, q.firstPage + q.next) === w)) {
        this.warm.splice(k, 1);
        this.cache.drop(w);
        this.counts.evictions++;
        return true;
      }
    }
    return false;
  }

  /**
   * Everything is in flight or loaded for the background: wait for a read, then drop a loaded background chunk (the
   * read-ahead steps back to read it again).
   */
  private evictBackground(): void {
    for (;;) {
      const other = this.cache.loadedBackgroundChunk();
      if (other >= 0) {
        this.cache.drop(other);
        this.counts.evictions++;
        this.readAhead = Math.min(this.readAhead, other);
        return;
      }
      this.cache.reap();
    }
  }

  // -------------------------------------------------------------------------------------------------------------
  // Warm chunks and the background

  private addWarm(ci: number): void {
    if (!this.warm.includes(ci)) this.warm.push(ci);
  }

  /** A section of the oldest warm chunk once its cluster is loaded (else a wait for a read); one without a slot goes. */
  private warmStep(): void {
    const ci = this.warm[0];
    if (this.cache.loaded(ci)) {
      this.emitChunkSection(ci, SECTION_PAGES);
      this.flushIfFull();
    } else if (this.cache.has(ci)) {
      this.cache.reap();
    } else {
      this.warm.shift();
    }
  }

  /** Keeps up to `depth` background reads ahead of the cursor. */
  private fillReadAhead(limit: number): void {
    if (this.readAhead < this.bgNext) this.readAhead = this.bgNext;
    const { cache } = this;
    while (this.readAhead < limit && cache.backgroundSlots < cache.depth && (!this.isListening || cache.backgroundReading < BG_READS_IN_FLIGHT)) {
      const ci = this.readAhead;
      if (this.chunkLeft[ci] > 0 && !cache.has(ci)) {
        if (!cache.hasFreeSlot()) return;
        cache.take(ci, false);
      }
      this.readAhead++;
    }
  }

  /**
   * One step of the background stream over plan chunks [bgNext, limit): a section of ZERO records when they are
   * due, else a section of the next chunk (waiting for its read if needed). Returns false when there is nothing left.
   */
  private backgroundStep(limit: number, withZeros: boolean): boolean {
    while (this.bgNext < limit && this.chunkLeft[this.bgNext] === 0) this.bgNext++;
    const dataLeft = this.bgNext < limit;
    const zeros = this.zeros;
    if (withZeros && zeros.left > 0 && (!dataLeft || zeros.allowance > 0)) {
      const n = this.emitZeroSection(dataLeft ? Math.min(ZERO_SECTION_RECORDS, zeros.allowance) : ZERO_SECTION_RECORDS);
      zeros.allowance -= n;
      return true;
    }
    if (!dataLeft) return false;
    this.fillReadAhead(limit);
    const ci = this.bgNext;
    if (!this.cache.has(ci)) this.cache.take(ci, false);
    if (!this.cache.loaded(ci)) {
      this.cache.reap();
      return true;
    }
    this.emitChunkSection(ci, this.isListening ? SECTION_PAGES : PAGES_PER_CHUNK);
    if (this.chunkLeft[ci] === 0) {
      this.bgNext++;
      zeros.allowance += zeros.perCluster;
    }
    return true;
  }

  // -------------------------------------------------------------------------------------------------------------
  // Emitting pages

  private chunkOf(block: number, page: number): number {
    return this.chunkIndex[block][Math.floor(page / PAGES_PER_CHUNK)];
  }

  /** Writes data page `page` of plan chunk ci from its loaded cluster; the chunk's slot is freed after its last page. */
  private emitDataPage(o: StreamEncoder, ci: number, block: number, page: number): void {
    const cluster = this.cache.cluster(ci);
    this.pages.markSent(block, page);
    const first = this.plan.chunks[ci].chunk * PAGES_PER_CHUNK;
    o.page(this.meta.blocks[block].id, page * PAGE_BYTES, cluster, (page - first) * PAGE_BYTES);
    if (--this.chunkLeft[ci] === 0) this.chunkDone(ci);
  }

  private chunkDone(ci: number): void {
    this.cache.drop(ci);
    const k = this.warm.indexOf(ci);
    if (k >= 0) this.warm.splice(k, 1);
  }

  private emitZeroPage(o: StreamEncoder, block: number, page: number): void {
    this.pages.markSent(block, page);
    o.zero(this.meta.blocks[block].id, page * PAGE_BYTES);
    this.zeros.left--;
  }

  /** One PART section with up to `max` unsent data pages of loaded chunk ci; returns how many. */
  private emitChunkSection(ci: number, max: number): number {
    const ch = this.plan.chunks[ci];
    const first = ch.chunk * PAGES_PER_CHUNK;
    const last = Math.min(first + PAGES_PER_CHUNK, this.pages.pagesIn[ch.block]);
    let n = 0;
    this.out.room(pageSectionBytesMax(max));
    this.out.ramPart(this.meta.ramSectionId, 'name-first');
    for (let i = first >>> 3; i < Math.ceil(last / 8) && n < max && this.chunkLeft[ci] > 0; i++) {
      let d = this.pages.unsentData(ch.block, i);
      while (d !== 0 && n < max) {
        const bit = 31 - Math.clz32(d & -d);
        d &= d - 1;
        const page = i * 8 + bit;
        if (page >= last) break;
        this.emitDataPage(this.out, ci, ch.block, page);
        n++;
      }
    }
    this.out.ramEos(this.meta.ramSectionId);
    return n;
  }

  /** One PART section with up to `max` ZERO records for non-data pages not yet written, in block order. */
  private emitZeroSection(max: number): number {
    let n = 0;
    this.out.room(zeroSectionBytesMax(max));
    this.out.ramPart(this.meta.ramSectionId, 'name-first');
    for (; n < max; n++) {
      const p = this.zeros.next();
      if (p < 0) break;
      this.emitZeroPage(this.out, this.zeros.block, p);
    }
    this.out.ramEos(this.meta.ramSectionId);
    return n;
  }
}
