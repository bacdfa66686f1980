// `snap-pipe load --postcopy[=PERCENT] IMG`: the image -> a postcopy migration stream on `out` (QEMU's exec: pipe),
// for a destination with the postcopy-ram capability. snap-pipe plays QEMU's migration source:
//   header + configuration, ram START (verbatim from the image),
//   POSTCOPY_ADVISE(0x1000, 0x1000)   after the setup (the saved setup has no per-block page-size fields; the
//                                       destination wipes all of RAM here, so nothing may precede it),
//   OPEN_RETURN_PATH, PING 1          from here on QEMU writes to our stdin (its return path),
//   [precopy share]                   with PERCENT > 0: ZERO records for every non-data page, then whole data
//                                       clusters (host-file order) until PERCENT% of the data pages went out,
//   POSTCOPY_RAM_DISCARD ...           every page not sent yet, per block, 12 ranges a command (as QEMU's
//                                       postcopy_discard_send_range does); needed even with no precopy share,
//                                       see run(),
//   PACKAGED{ LISTEN, device sections (the saved device state without its trailing EOF + VMDESCRIPTION), PING 3,
//             RUN }                   QEMU loads the devices and starts the guest (unless started with -S),
//   PART sections                     requested pages first, else the rest in host-file order (ZERO records for
//                                       the non-data pages spread among them); every page goes out exactly once,
//   ram END (EOS), EOF                then snap-pipe waits for SHUT (or the pipe closing) and exits.
//
// Page requests (REQ_PAGES / REQ_PAGES_ID on stdin) are served ahead of the background stream: a data page's whole
// 1 MiB cluster is read (random O_DIRECT read through the I/O backend, alongside the background read-ahead), its
// CRC-32C checked, the requested page written and flushed at once, and the rest of that cluster sent right after the
// pending requests (the guest tends to touch neighbours). A request for a zero page (or a page never saved) is
// answered with a ZERO record; a request for a page already sent is ignored (it is in the pipe). Answers go
// through their own small output, written ahead of background sections still buffered; once the guest runs, the
// background keeps only BG_READS_IN_FLIGHT cluster reads in the device queue, so a request's read waits behind few.
// Fault latency (reading a request off stdin -> the write holding its page returned) goes into a histogram.
//
// Every page goes out before EOF (never-saved pages as ZERO): after EOF the destination unregisters userfaultfd,
// and a fault it could still send us then would find us gone.

import assert from 'node:assert/strict';
import { SnapPipeError } from '../errors.js';
import { chunksOf, pagesOf } from '../format/image/metadata.js';
import { PAGE_BYTES, PAGES_PER_CHUNK, type SnapshotMeta } from '../format/image/types.js';
import { crc32cImplementation } from '../native/fastmem.js';
import type { IoBackendName } from '../native/io.js';
import { StreamBuilder, type StreamEncoder } from '../format/stream/encoder.js';
import { SEC_EOF } from '../format/stream/constants.js';
import {
  DISCARDS_PER_COMMAND,
  PACKAGED_BYTES_MAX,
  adviseCommand,
  deviceSectionsEnd,
  discardCommand,
  openReturnPathCommand,
  pingCommand,
  packagedCommand,
  postcopyPackage,
} from '../format/stream/commands.js';
import type { RpMessage } from '../format/stream/returnpath.js';
import type { Plan } from '../image/checks.js';
import type { LoadReport } from './precopy.js';
import { LOAD_QUEUE_DEPTH_MAX, LoadSource } from './source.js';
import { pipeEncoder, type PipeSink } from './pipe.js';
import { ClusterCache } from './postcopy/cache.js';
import { LatencyHistogram, type LatencySummary } from './postcopy/latency.js';
import { ReturnPathIn } from './postcopy/return-path.js';

export const PING_AFTER_OPEN = 1;
export const PING_IN_PACKAGE = 3;

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
/** Cluster slots kept for requests beyond the background read-ahead. */
const URGENT_SLOTS = 16;
/**
 * After EOF, how long QEMU may take to say SHUT. It says it once its listen thread has loaded everything and torn
 * down postcopy (userfaultfd unregistered): well under a second for the guests measured, seconds at worst.
 */
export const SHUT_WAIT_MS_MAX = 60_000;

// ---------------------------------------------------------------------------------------------------------------
// Options and report

export interface PostcopyOptions {
  path: string;
  /** File descriptor the stream goes to; 1 under QEMU. */
  out: number;
  /** File descriptor of the return path (QEMU writes to it); 0 under QEMU. Read through a non-blocking reopen. */
  rpIn: number;
  direct: boolean;
  verify: boolean;
  queueDepth: number;
  io: IoBackendName | 'auto';
  /** Share of the data pages sent before the device state, 0..100. */
  precopyPercent: number;
  onNote?: (line: string) => void;
  /** Called after each write to `out` with the stream bytes written so far. */
  onProgress?: (p: { bytesOut: number }) => void;
}

/** What a postcopy load did: the precopy report's figures (same meanings) plus the postcopy phases and requests. */
export interface PostcopyReport extends LoadReport {
  mode: 'postcopy';
  /** unsentPages (see LoadReport) are sent as ZERO here: the destination wiped all RAM at ADVISE. */
  precopyPercent: number;
  /** Pages sent before LISTEN (data, and ZERO records). */
  precopyDataPages: number;
  precopyZeroPages: number;
  precopyClusters: number;
  discardCommands: number;
  discardRanges: number;
  packageBytes: number;
  /** Times from the start, ms: package written, PONG to the PING in the package (devices loaded), EOF written. */
  packageSentMs: number;
  devicesLoadedMs: number | null;
  eofSentMs: number;
  shutMs: number | null;
  shutStatus: number | null;
  pongs: number[];
  /** SWITCHOVER_ACK messages received (a QEMU 8.1+ destination with switchover-ack sends one). */
  switchoverAcks: number;
  /** Page requests read from the return path, the pages they named, and what became of those pages. */
  requests: number;
  requestedPages: number;
  requestedDataPages: number;
  requestedZeroPages: number;
  /** Pages requested after they had been sent (they were already in the pipe). */
  requestedAlreadySent: number;
  /** Cluster reads done for requests, and for the background stream. */
  requestReads: number;
  backgroundReads: number;
  /** Clusters read for a request and dropped before all their pages went out (read again later). */
  evictions: number;
  /** For each request that sent a page: from reading it off the return path to the end of the write with its page. */
  faultLatency: LatencySummary;
  /** Time spent waiting for clusters that requests needed, and writing answers to requests (a full pipe ahead). */
  requestReadWaitMs: number;
  requestWriteMs: number;
}

// ---------------------------------------------------------------------------------------------------------------
// The load

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

export async function runPostcopyLoad(opts: PostcopyOptions): Promise<PostcopyReport> {
  const t0 = performance.now();
  const { path } = opts;
  assert(Number.isInteger(opts.queueDepth) && opts.queueDepth >= 1 && opts.queueDepth <= LOAD_QUEUE_DEPTH_MAX, 'runPostcopyLoad: queueDepth');
  assert(Number.isInteger(opts.precopyPercent) && opts.precopyPercent >= 0 && opts.precopyPercent <= 100, 'runPostcopyLoad: precopyPercent');
  const source = LoadSource.check(path, opts.direct);
  let rp: ReturnPathIn | undefined;
  try {
    const { meta } = source;
    const devEnd = deviceSectionsEnd(meta.deviceState);
    const deviceSections = meta.deviceState.subarray(0, devEnd);
    const pkg = postcopyPackage(deviceSections, PING_IN_PACKAGE);
    if (pkg.length > PACKAGED_BYTES_MAX) throw new SnapPipeError('UNSUPPORTED', `${path}: device state of ${pkg.length} bytes is too large for a postcopy package`);
    rp = new ReturnPathIn(opts.rpIn);
    // The reads in flight and URGENT_SLOTS more for requests; the backend can hold a read for every slot.
    source.openReads({ direct: opts.direct, io: opts.io, queueDepth: opts.queueDepth, extraSlots: URGENT_SLOTS, backendDepth: 'slots', onNote: opts.onNote });

    const s = new PostcopySession(opts, source, new ClusterCache(source, opts.verify), rp, pkg, t0);
    return await s.run(); // awaited here: the finally below must not close rp while the session waits on it
  } finally {
    rp?.close();
    source.close();
  }
}

class PostcopySession {
  /** Everything but answers to requests: buffered up to FLUSH_BYTES. */
  private readonly out: StreamEncoder;
  private readonly outSink: PipeSink;
  /**
   * Answers to requests, written at once, ahead of background sections still in `out`'s buffer (whole sections in
   * either order are fine for QEMU: each page goes out once and every section names its block).
   */
  private readonly urgent: StreamEncoder;
  private readonly urgentSink: PipeSink;
  private readonly blockByName = new Map<string, number>();
  private readonly pagesIn: number[];
  /** Per block: pages written to the stream (never twice). */
  private readonly sentOut: Uint8Array[];
  /** Per block, per chunk: index into plan.chunks, or -1 (no data pages). */
  private readonly chunkIndex: Int32Array[];
  /** Data pages of each plan chunk not yet written. */
  private readonly chunkLeft: Int32Array;
  /** Chunks read for a request whose other pages go out before the background continues (oldest first). */
  private warm: number[] = [];
  private bgNext = 0;
  private readAhead = 0;
  /** Non-data pages (zero or never saved) not yet written; a cursor walks them in block order. */
  private zeroLeft: number;
  private zeroBlock = 0;
  private zeroPage = 0;
  private zeroAllowance = 0;
  private zeroPerCluster = 0;
  private readonly requests: PendingRequest[] = [];
  /** Requests whose page is in the output buffer: their latency ends when it is written. */
  private awaitingFlush: PendingRequest[] = [];
  private lastReqBlock = -1;
  private listening = false;
  private eofWritten = false;
  private shutStatus: number | null = null;
  private shutAt: number | null = null;
  private pongs: number[] = [];
  private switchoverAcks = 0;
  private devicesLoadedAt: number | null = null;
  private readonly latency = new LatencyHistogram();
  private readonly r = {
    requests: 0,
    requestedPages: 0,
    requestedDataPages: 0,
    requestedZeroPages: 0,
    requestedAlreadySent: 0,
    evictions: 0,
    requestReadWaitMs: 0,
    precopyDataPages: 0,
    precopyZeroPages: 0,
    precopyClusters: 0,
    discardCommands: 0,
    discardRanges: 0,
    packageSentMs: 0,
    eofSentMs: 0,
    pagesOut: 0,
  };
  private readonly totalPages: number;
  private readonly meta: SnapshotMeta;
  private readonly plan: Plan;

  constructor(
    private readonly opts: PostcopyOptions,
    private readonly source: LoadSource,
    private readonly cache: ClusterCache,
    private readonly rp: ReturnPathIn,
    private readonly pkg: Uint8Array,
    private readonly t0: number,
  ) {
    const { meta, plan } = source;
    this.meta = meta;
    this.plan = plan;
    meta.blocks.forEach((b, i) => this.blockByName.set(b.id, i));
    this.pagesIn = meta.blocks.map((b) => pagesOf(b));
    this.totalPages = this.pagesIn.reduce((a, n) => a + n, 0);
    this.sentOut = this.pagesIn.map((n) => new Uint8Array(Math.ceil(n / 8)));
    this.chunkIndex = meta.blocks.map((b) => new Int32Array(chunksOf(b)).fill(-1));
    plan.chunks.forEach((c, i) => (this.chunkIndex[c.block][c.chunk] = i));
    this.chunkLeft = Int32Array.from(plan.chunks, (c) => c.pages);
    this.zeroLeft = this.totalPages - plan.dataPages;
    const progress = () => opts.onProgress?.({ bytesOut: this.outSink.bytesOut + this.urgentSink.bytesOut });
    ({ out: this.out, sink: this.outSink } = pipeEncoder(opts.out, progress));
    ({ out: this.urgent, sink: this.urgentSink } = pipeEncoder(opts.out, () => {
      this.onFlushed();
      progress();
    }));
  }

  private now(): number {
    return performance.now() - this.t0;
  }

  private isData(block: number, page: number): boolean {
    const { sent, data } = this.meta.pages[block];
    const i = page >>> 3;
    const bit = 1 << (page & 7);
    return (sent[i] & data[i] & bit) !== 0;
  }

  private isSent(block: number, page: number): boolean {
    return (this.sentOut[block][page >>> 3] & (1 << (page & 7))) !== 0;
  }

  private markSent(block: number, page: number): void {
    const b = this.sentOut[block];
    const bit = 1 << (page & 7);
    assert((b[page >>> 3] & bit) === 0, `page ${page} of block ${this.meta.blocks[block].id} sent twice`);
    b[page >>> 3] |= bit;
    this.r.pagesOut++;
  }

  private onFlushed(): void {
    if (this.awaitingFlush.length === 0) return;
    const t = performance.now();
    for (const q of this.awaitingFlush) this.latency.add(t - q.t0);
    this.awaitingFlush = [];
  }

  // -------------------------------------------------------------------------------------------------------------
  // Return path

  private pollRp(): void {
    this.rp.poll((m, t) => this.onMessage(m, t));
  }

  private onMessage(m: RpMessage, t: number): void {
    switch (m.type) {
      case 'pong':
        this.pongs.push(m.value);
        if (m.value === PING_IN_PACKAGE && this.devicesLoadedAt === null) this.devicesLoadedAt = t - this.t0;
        return;
      case 'shut':
        if (this.shutStatus === null) {
          this.shutStatus = m.status;
          this.shutAt = t - this.t0;
        }
        return;
      case 'req':
        this.onRequest(m.block, m.startBytes, m.lengthBytes, t);
        return;
      case 'switchover-ack':
        // A destination with switchover-ack approves the switch-over as the return path opens; snap-pipe, acting
        // as the source, has nothing to wait for (the device state goes in the package regardless).
        this.switchoverAcks++;
        return;
      default:
        throw new SnapPipeError('BAD_STREAM', `return path from QEMU: unexpected ${m.type} message (snap-pipe never asks for postcopy recovery)`);
    }
  }

  private onRequest(name: string | undefined, startBytes: number, lengthBytes: number, t: number): void {
    let block: number;
    if (name === undefined) {
      if (this.lastReqBlock < 0) throw new SnapPipeError('BAD_STREAM', 'return path from QEMU: REQ_PAGES before any request naming its block');
      block = this.lastReqBlock;
    } else {
      const b = this.blockByName.get(name);
      if (b === undefined) {
        throw new SnapPipeError('BAD_STREAM', `QEMU requested a page of RAM block '${name}', which ${this.opts.path} does not have; stopping the load`);
      }
      block = b;
      this.lastReqBlock = b;
    }
    const blockBytes = this.meta.blocks[block].lengthBytes;
    const id = this.meta.blocks[block].id;
    if (startBytes % PAGE_BYTES !== 0 || lengthBytes % PAGE_BYTES !== 0 || lengthBytes === 0 || startBytes + lengthBytes > blockBytes) {
      throw new SnapPipeError(
        'BAD_STREAM',
        `QEMU requested ${lengthBytes} bytes at offset 0x${startBytes.toString(16)} of RAM block ${id} (${blockBytes} bytes): ` +
          `${startBytes + lengthBytes > blockBytes ? 'outside the block' : 'not whole pages'}; stopping the load`,
      );
    }
    if (!this.listening) throw new SnapPipeError('BAD_STREAM', `return path from QEMU: a page request before LISTEN (block ${id})`);
    this.r.requests++;
    this.r.requestedPages += lengthBytes / PAGE_BYTES;
    this.requests.push({ block, firstPage: startBytes / PAGE_BYTES, pages: lengthBytes / PAGE_BYTES, next: 0, t0: t, wrotePage: false });
  }

  // -------------------------------------------------------------------------------------------------------------
  // A slot for a request

  /** A slot for a request's chunk: a free one, else drop the oldest warm chunk not being waited for. */
  private urgentSlot(ci: number): void {
    if (this.cache.hasFreeSlot()) return this.cache.take(ci, true);
    for (let k = 0; k < this.warm.length; k++) {
      const w = this.warm[k];
      if (this.cache.loaded(w) && !this.requests.some((q) => this.chunkIndex[q.block][Math.floor((q.firstPage + q.next) / PAGES_PER_CHUNK)] === w)) {
        this.warm.splice(k, 1);
        this.cache.drop(w);
        this.r.evictions++;
        return this.cache.take(ci, true);
      }
    }
    // Everything is in flight or loaded for the background: wait for a read, then drop a loaded background chunk.
    for (;;) {
      const other = this.cache.loadedBackgroundChunk();
      if (other >= 0) {
        this.cache.drop(other);
        this.r.evictions++;
        if (other < this.readAhead) this.readAhead = Math.min(this.readAhead, other);
        return this.cache.take(ci, true);
      }
      this.cache.reap();
    }
  }

  // -------------------------------------------------------------------------------------------------------------
  // Emitting pages

  /** Writes data page `page` of plan chunk ci from its loaded slot. */
  private emitDataPage(o: StreamEncoder, ci: number, block: number, page: number): void {
    const cluster = this.cache.cluster(ci);
    this.markSent(block, page);
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
    this.markSent(block, page);
    o.zero(this.meta.blocks[block].id, page * PAGE_BYTES);
    this.zeroLeft--;
  }

  /** One PART section with up to `max` unsent data pages of loaded chunk ci; returns how many. */
  private emitChunkSection(ci: number, max: number): number {
    const ch = this.plan.chunks[ci];
    const { sent, data } = this.meta.pages[ch.block];
    const pages = this.pagesIn[ch.block];
    const first = ch.chunk * PAGES_PER_CHUNK;
    const last = Math.min(first + PAGES_PER_CHUNK, pages);
    const sentOut = this.sentOut[ch.block];
    let n = 0;
    this.out.room(6 + 255 + max * (8 + PAGE_BYTES) + 13);
    this.out.ramPart(this.meta.ramSectionId, 'name-first');
    for (let i = first >>> 3; i < Math.ceil(last / 8) && n < max && this.chunkLeft[ci] > 0; i++) {
      let d = sent[i] & data[i] & ~sentOut[i] & 0xff;
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
    this.out.room(6 + 255 + max * (9 + 256) + 13);
    this.out.ramPart(this.meta.ramSectionId, 'name-first');
    while (n < max && this.zeroLeft > 0) {
      const b = this.zeroBlock;
      if (b >= this.meta.blocks.length) break;
      const pages = this.pagesIn[b];
      if (this.zeroPage >= pages) {
        this.zeroBlock++;
        this.zeroPage = 0;
        continue;
      }
      const p = this.zeroPage++;
      if (!this.isData(b, p) && !this.isSent(b, p)) {
        this.emitZeroPage(this.out, b, p);
        n++;
      }
    }
    this.out.ramEos(this.meta.ramSectionId);
    return n;
  }

  private maybeFlush(): void {
    if (this.out.buffered >= FLUSH_BYTES) this.out.flush();
  }

  // -------------------------------------------------------------------------------------------------------------
  // Requests

  /**
   * Serves pending requests in order as far as possible without waiting; returns false if the head one waits for
   * a cluster read (which is then queued, along with those of the requests behind it).
   */
  private serveRequests(): boolean {
    while (this.requests.length > 0) {
      const q = this.requests[0];
      while (q.next < q.pages) {
        const page = q.firstPage + q.next;
        if (this.isSent(q.block, page)) {
          this.r.requestedAlreadySent++;
          q.next++;
          continue;
        }
        if (!this.isData(q.block, page)) {
          this.urgent.room(6 + 255 + 9 + 13);
          this.urgent.ramPart(this.meta.ramSectionId, 'name-first');
          this.emitZeroPage(this.urgent, q.block, page);
          this.urgent.ramEos(this.meta.ramSectionId);
          this.r.requestedZeroPages++;
          q.wrotePage = true;
          q.next++;
          continue;
        }
        const ci = this.chunkIndex[q.block][Math.floor(page / PAGES_PER_CHUNK)];
        assert(ci >= 0, 'a data page has a cluster');
        if (!this.cache.has(ci)) {
          this.urgentSlot(ci);
          if (!this.warm.includes(ci)) this.warm.push(ci);
        }
        if (!this.cache.loaded(ci)) {
          this.queueReadsBehind();
          return false;
        }
        this.urgent.room(6 + 255 + 8 + PAGE_BYTES + 13);
        this.urgent.ramPart(this.meta.ramSectionId, 'name-first');
        this.emitDataPage(this.urgent, ci, q.block, page);
        this.urgent.ramEos(this.meta.ramSectionId);
        this.r.requestedDataPages++;
        q.wrotePage = true;
        q.next++;
      }
      this.requests.shift();
      if (q.wrotePage) this.awaitingFlush.push(q);
    }
    return true;
  }

  /** While the head request waits for its cluster, start the reads the requests behind it will need. */
  private queueReadsBehind(): void {
    for (let k = 1; k < this.requests.length; k++) {
      const q = this.requests[k];
      const page = q.firstPage + q.next;
      if (this.isSent(q.block, page) || !this.isData(q.block, page)) continue;
      const ci = this.chunkIndex[q.block][Math.floor(page / PAGES_PER_CHUNK)];
      if (this.cache.has(ci)) continue;
      if (!this.cache.hasFreeSlot()) return;
      this.cache.take(ci, true);
      if (!this.warm.includes(ci)) this.warm.push(ci);
    }
  }

  // -------------------------------------------------------------------------------------------------------------
  // Background

  /** Keeps up to `depth` background reads ahead of the cursor. */
  private fillReadAhead(limit: number): void {
    if (this.readAhead < this.bgNext) this.readAhead = this.bgNext;
    const { cache } = this;
    while (this.readAhead < limit && cache.backgroundSlots < cache.depth && (!this.listening || cache.backgroundReading < BG_READS_IN_FLIGHT)) {
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
    if (withZeros && this.zeroLeft > 0 && (!dataLeft || this.zeroAllowance > 0)) {
      const n = this.emitZeroSection(dataLeft ? Math.min(ZERO_SECTION_RECORDS, this.zeroAllowance) : ZERO_SECTION_RECORDS);
      this.zeroAllowance -= n;
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
    this.emitChunkSection(ci, this.listening ? SECTION_PAGES : PAGES_PER_CHUNK);
    if (this.chunkLeft[ci] === 0) {
      this.bgNext++;
      this.zeroAllowance += this.zeroPerCluster;
    }
    return true;
  }

  // -------------------------------------------------------------------------------------------------------------

  async run(): Promise<PostcopyReport> {
    const out = this.out;
    const meta = this.meta;
    const plan = this.plan;
    try {
      // 1-3: header, configuration, RAM setup, ADVISE, return path, PING.
      out.verbatim(meta.head);
      out.verbatim(meta.ramSetup);
      out.verbatim(adviseCommand());
      out.verbatim(openReturnPathCommand());
      out.verbatim(pingCommand(PING_AFTER_OPEN));
      out.flush();

      // 4: the precopy share.
      let shareChunks = 0;
      if (this.opts.precopyPercent > 0) {
        const want = Math.ceil((plan.dataPages * this.opts.precopyPercent) / 100);
        let pages = 0;
        while (shareChunks < plan.chunks.length && pages < want) pages += plan.chunks[shareChunks++].pages;
        while (this.zeroLeft > 0) {
          this.emitZeroSection(ZERO_SECTION_RECORDS * 32);
          this.maybeFlush();
          this.pollRp();
        }
        this.r.precopyZeroPages = this.r.pagesOut;
        while (this.backgroundStep(shareChunks, false)) {
          this.maybeFlush();
          this.pollRp();
        }
        this.r.precopyClusters = shareChunks;
        this.r.precopyDataPages = this.r.pagesOut - this.r.precopyZeroPages;
      }
      // 4b: the switch-over commands of the save (QEMU 10's SWITCHOVER_START), where QEMU's postcopy_start sends
      // them: after the precopy share and before the discards (migration.c migration_switchover_start).
      out.verbatim(meta.switchoverCommands);
      // 5: discard every page not sent yet — also with no precopy share. QEMU 7.2's loadvm_postcopy_handle_listen,
      // when LISTEN comes straight after ADVISE, sets LISTENING and then calls postcopy_ram_prepare_discard, which
      // sets the state back to DISCARD: until RUN, ram_load would then take the precopy path and write pages
      // straight into userfault-registered RAM (the listen thread faults on a page it is loading, and hangs).
      // One DISCARD first makes that call happen here instead. (Nothing to discard: every page is already in.)
      if (this.r.pagesOut < this.totalPages) this.sendDiscards();

      // 6: the package; from LISTEN on, QEMU may ask for pages.
      out.verbatim(packagedCommand(this.pkg.length));
      out.verbatim(this.pkg);
      this.listening = true;
      out.flush();
      this.r.packageSentMs = this.now();

      // 7: pages, requested ones first.
      const dataChunksLeft = plan.chunks.length - shareChunks;
      this.zeroPerCluster = dataChunksLeft > 0 ? Math.ceil(this.zeroLeft / dataChunksLeft) : 0;
      this.zeroAllowance = this.zeroPerCluster;
      for (;;) {
        this.pollRp();
        this.checkShut();
        if (this.requests.length > 0) {
          if (!this.serveRequests()) {
            this.urgent.flush(); // what was served so far
            const t1 = performance.now();
            this.cache.reap();
            this.r.requestReadWaitMs += performance.now() - t1;
            continue;
          }
          this.urgent.flush();
          continue;
        }
        if (this.warm.length > 0) {
          const ci = this.warm[0];
          if (this.cache.loaded(ci)) {
            this.emitChunkSection(ci, SECTION_PAGES);
            this.maybeFlush();
            continue;
          }
          if (this.cache.has(ci)) {
            this.cache.reap();
            continue;
          }
          this.warm.shift();
          continue;
        }
        if (!this.backgroundStep(plan.chunks.length, true)) break;
        this.maybeFlush();
      }
      assert.equal(this.r.pagesOut, this.totalPages, 'every page sent once');
      this.urgent.flush();
      assert.equal(this.zeroLeft, 0);

      // 8: end of the RAM section, EOF.
      out.verbatim(new StreamBuilder(256).ramEnd(meta.ramSectionId).ramEos(meta.ramSectionId).u8(SEC_EOF).build());
      out.flush();
      this.eofWritten = true;
      this.r.eofSentMs = this.now();

      // Wait for SHUT or the pipe closing, blocking, bounded; requests now only name pages already sent.
      const waitMsMax = SHUT_WAIT_MS_MAX;
      const answered = await this.rp.waitUntil(
        (m, t) => {
          this.onMessage(m, t);
          this.requests.length = 0;
        },
        () => this.shutStatus !== null,
        waitMsMax,
      );
      if (!answered) {
        throw new SnapPipeError(
          'IO',
          `QEMU never sent SHUT in the ${waitMsMax / 1000} s after the whole stream was sent: the destination is stuck or failed at the end (see its log)`,
        );
      }
      this.checkShut();
      if (this.shutStatus === null) {
        throw new SnapPipeError('IO', 'QEMU closed the return path without SHUT after the whole stream was sent: the destination failed at the end (see its log)');
      }
    } catch (err) {
      this.urgent.flushAfterFailure();
      out.flushAfterFailure();
      throw this.explain(err);
    }
    return this.report();
  }

  /** SHUT from QEMU: an error status ends the load; a clean one before EOF cannot be a finished migration. */
  private checkShut(): void {
    if (this.shutStatus !== null) {
      if (this.shutStatus !== 0) {
        throw new SnapPipeError('IO', `QEMU reported the incoming migration failed (SHUT ${this.shutStatus}); see its log`);
      }
      if (!this.eofWritten) throw new SnapPipeError('IO', 'QEMU ended the return path (SHUT) before the stream was complete');
    } else if (this.rp.eof && !this.eofWritten) {
      throw new SnapPipeError('IO', 'QEMU closed the return path (stdin) before the stream was complete; the incoming migration failed on its side');
    }
  }

  private explain(err: unknown): unknown {
    if (err instanceof SnapPipeError && err.code === 'IO' && /EPIPE|closed the (stream|return path)/.test(err.message) && !this.pongs.includes(PING_AFTER_OPEN)) {
      return new SnapPipeError(
        'IO',
        `${err.message} (QEMU never answered the first PING: does the destination have the postcopy-ram capability, set before migrate_incoming?)`,
      );
    }
    return err;
  }

  /** POSTCOPY_RAM_DISCARD for every page not sent in the precopy share, per block, as byte ranges. */
  private sendDiscards(): void {
    this.meta.blocks.forEach((_, b) => {
      const pages = this.pagesIn[b];
      let ranges: [number, number][] = [];
      const flushRanges = () => {
        if (ranges.length === 0) return;
        this.out.verbatim(discardCommand(this.meta.blocks[b].id, ranges));
        this.r.discardCommands++;
        this.r.discardRanges += ranges.length;
        ranges = [];
      };
      let p = 0;
      while (p < pages) {
        if (this.isSent(b, p)) {
          p++;
          continue;
        }
        const start = p;
        while (p < pages && !this.isSent(b, p)) p++;
        ranges.push([start * PAGE_BYTES, (p - start) * PAGE_BYTES]);
        if (ranges.length === DISCARDS_PER_COMMAND) flushRanges();
      }
      flushRanges();
    });
  }

  private report(): PostcopyReport {
    const seconds = (performance.now() - this.t0) / 1000;
    const r = this.r;
    const [o, u] = [this.outSink, this.urgentSink];
    const out = { bytesOut: o.bytesOut + u.bytesOut, writeMs: o.writeMs + u.writeMs, writeCalls: o.writeCalls + u.writeCalls, sections: this.out.sections + this.urgent.sections };
    return {
      path: this.opts.path,
      mode: 'postcopy',
      checksum: crc32cImplementation,
      seconds,
      bytesOut: out.bytesOut,
      outMBps: out.bytesOut / 1e6 / seconds,
      blocks: this.meta.blocks.length,
      dataPages: this.plan.dataPages,
      zeroPages: this.plan.zeroPages,
      unsentPages: this.plan.unsentPages,
      dataClusters: this.plan.chunks.length,
      precopyPercent: this.opts.precopyPercent,
      precopyDataPages: r.precopyDataPages,
      precopyZeroPages: r.precopyZeroPages,
      precopyClusters: r.precopyClusters,
      discardCommands: r.discardCommands,
      discardRanges: r.discardRanges,
      deviceStateBytes: this.meta.deviceState.length,
      packageBytes: this.pkg.length,
      packageSentMs: r.packageSentMs,
      devicesLoadedMs: this.devicesLoadedAt,
      eofSentMs: r.eofSentMs,
      shutMs: this.shutAt,
      shutStatus: this.shutStatus,
      pongs: this.pongs,
      switchoverAcks: this.switchoverAcks,
      requests: r.requests,
      requestedPages: r.requestedPages,
      requestedDataPages: r.requestedDataPages,
      requestedZeroPages: r.requestedZeroPages,
      requestedAlreadySent: r.requestedAlreadySent,
      requestReads: this.cache.requestReads,
      backgroundReads: this.cache.backgroundReads,
      evictions: r.evictions,
      faultLatency: this.latency.summary(),
      requestReadWaitMs: r.requestReadWaitMs,
      requestWriteMs: this.urgentSink.writeMs,
      bytesRead: this.source.bytesRead,
      readMs: this.cache.readMs,
      verifyMs: this.source.verifyMs,
      writeMs: out.writeMs,
      writeCalls: out.writeCalls,
      ramSections: out.sections,
      direct: this.opts.direct,
      verified: this.opts.verify,
      queueDepth: this.source.depth,
      readBackend: this.source.reads.name,
    };
  }
}
