// Writer stage: takes filled chunk slots from the coalescer and writes them to the image with O_DIRECT through an
// I/O backend (io_uring, or synchronous writes): 1 MiB per fresh cluster, only the carried pages for a cluster
// written before or for a fresh cluster that carries few pages (the rest of a fresh cluster reads as zeros: blocks
// allocated ahead but never written, or a hole). Each new cluster's CRC-32C comes from the coalescer (computed while
// the slot was in its cache); a later write updates it, after reading the old content of the pages it overwrites
// when those hold data.
// At the end it writes the metadata and marks the image complete (ImageWriter.finish).
import assert from 'node:assert/strict';
import { crc32cOfPages, crc32cZeros } from '../../native/fastmem.js';
import { ImageWriter } from '../../image/writer.js';
import { type SnapshotMeta } from '../../format/image/types.js';
import { CLUSTER_BYTES, PAGE_BYTES, PAGES_PER_CHUNK } from '../../format/units.js';
import { openIoBackend, reapNamed, type IoBackend, type IoBackendName } from '../../native/io.js';
import { IntQueueConsumer, IntQueueProducer } from '../ring/queue.js';
import {
  CTRL,
  END_OF_CHUNKS,
  SLOT_BYTES,
  SLOT_CRC,
  SLOT_CRC_UPDATE,
  SLOT_FIRST,
  SLOT_INTS,
  SLOT_SEEN_BITS,
  SLOT_VIRT_CLUSTER,
  SLOT_WHOLE,
  type SaveShared,
} from '../ring/layout.js';
import { epochMs, exposeStage, outcome, stageReadyAtMs, type Outcome } from './rpc.js';
import { saveViews, type SaveViews } from './memory.js';

export interface WriterResult {
  bytesWritten: number;
  writeCalls: number;
  clustersWritten: number;
  /** Clusters written more than once. */
  rewrittenClusters: number;
  /** Reads of the old content of pages about to be overwritten (for the cluster's CRC), and their bytes. */
  oldContentReads: number;
  oldContentBytes: number;
  io: IoBackendName;
  queueDepth: number;
  /** Waiting for filled chunks (the coalescer is behind). */
  upstreamWaitMs: number;
  /** Time waiting for write completions (the disk). */
  ioMs: number;
  busyMs: number;
  /** When the stage's modules had loaded, and when the first write was submitted (epochMs(); 0: none). */
  readyAtMs: number;
  firstWriteAtMs: number;
}

export interface WriterOpenOptions {
  path: string;
  direct: boolean;
  force: boolean;
  io: IoBackendName | 'auto';
  queueDepth: number;
}

let image: ImageWriter | undefined;
let io: IoBackend | undefined;
/** run() has written every chunk: finish() may write the metadata. */
let ran = false;
const crcByVirtCluster = new Map<number, number>();
/** Clusters written more than once. */
const rewritten = new Set<number>();
/**
 * Runs of an overwrite at most this many pages apart are read, and then written, as one span (the pages between
 * get their old content back). A 3.8 GB plain-migration stream: 85k reads and 106k writes, 5.1-5.5 s, one per run;
 * 8.6k reads and 29k writes, 4.0-4.6 s, with 16 (4: 4.3 s; 64: 4.7 s, more bytes than requests saved).
 */
const OLD_CONTENT_GAP_PAGES = 16;
/** How long the writer, with few requests in flight, waits for the next chunk before looking at completions. */
const FILL_POLL_MS = 0.3;
/** CRC-32C of a cluster of zeros. */
const ZERO_CLUSTER_CRC = crc32cZeros(0, CLUSTER_BYTES);

/** Whether the publication in the slot whose header starts at `hdr` carries page p (a set bit of its seen mask). */
function isCarried(h: Int32Array, hdr: number, p: number): boolean {
  return (h[hdr + SLOT_SEEN_BITS + (p >>> 5)] & (1 << (p & 31))) !== 0;
}

/** A rewritten cluster's CRC moves by the CRC of what its pages held before and of what they hold now. */
function updateCrc(vc: number, oldContentCrc: number, newContentCrc: number): void {
  crcByVirtCluster.set(vc, (crcByVirtCluster.get(vc)! ^ oldContentCrc ^ newContentCrc) >>> 0);
}

/**
 * The writer's requests and what they hold: a slot until all its writes have completed, a cluster until its
 * publication is written, an old-content unit until its reads have completed and its writes are submitted.
 * Everything is allocated here, before the first chunk.
 */
class ChunkWriter {
  bytesWritten = 0;
  writeCalls = 0;
  oldContentReads = 0;
  oldContentBytes = 0;
  /** Time waiting for completions (the disk). */
  ioMs = 0;
  firstWriteAtMs = 0;
  private readonly h: Int32Array;
  private readonly slotCount: number;
  /**
   * References per slot: one per write in flight, and one while its writes are being submitted, so completions
   * reaped in between (the queue was full) cannot hand it back early; the last one returns it to the coalescer.
   */
  private readonly pendingWrites: Int32Array;
  private readonly slotCluster: Int32Array;
  /** Clusters with a publication in flight. */
  private readonly clusterBusy = new Set<number>();
  // Old-content units: completion tags slotCount + unit. A unit holds one reference while its reads are being
  // submitted (like pendingWrites), and is ready once its count drops to 0.
  private readonly unitSlot: Int32Array;
  private readonly unitPending: Int32Array;
  private readonly freeUnits: number[];
  /** Units whose old content is in: their writes go out before anything else. */
  private readonly ready: number[] = [];
  /** One past the last page of the span nextSpan found. */
  private spanEnd = 0;

  constructor(
    private readonly img: ImageWriter,
    private readonly backend: IoBackend,
    private readonly v: SaveViews,
    private readonly free: IntQueueProducer,
  ) {
    this.h = v.slotHeaders;
    this.slotCount = v.sizes.slotCount;
    this.pendingWrites = new Int32Array(this.slotCount);
    this.slotCluster = new Int32Array(this.slotCount);
    const units = v.sizes.oldContentUnits;
    this.unitSlot = new Int32Array(units).fill(-1);
    this.unitPending = new Int32Array(units);
    this.freeUnits = Array.from({ length: units }, (_, i) => units - 1 - i);
  }

  /** Requests in flight, or writes waiting to be submitted. */
  busy(): boolean {
    return this.backend.inFlight > 0 || this.ready.length > 0;
  }

  writesReady(): boolean {
    return this.ready.length > 0;
  }

  /** Takes a filled slot: its cluster's CRC recorded or updated, its writes (or the reads of its old content) submitted. */
  write(slot: number): void {
    const h = this.h;
    const hdr = slot * SLOT_INTS;
    const vc = h[hdr + SLOT_VIRT_CLUSTER];
    while (this.clusterBusy.has(vc)) this.progress();
    const { fresh } = this.img.allocate(vc);
    this.slotCluster[slot] = vc;
    this.clusterBusy.add(vc);
    this.pendingWrites[slot] = 1;
    // The coalescer and this writer agree on which publication of a chunk is its first (the cluster is new).
    assert.equal(fresh, h[hdr + SLOT_FIRST] === 1, `cluster ${vc}: coalescer and writer disagree on its first write`);
    assert(fresh || h[hdr + SLOT_WHOLE] === 0, `cluster ${vc}: only a new cluster is written whole`);
    if (fresh) {
      crcByVirtCluster.set(vc, h[hdr + SLOT_CRC] >>> 0);
      // A fresh cluster lies past everything written so far, in the part of the file allocated ahead (unwritten
      // extents) or sized ahead (a hole): either way pages not written read as zeros, which is what the coalescer
      // checksummed them as.
      if (h[hdr + SLOT_WHOLE] === 1) this.submitWrite(slot, slot * SLOT_BYTES, CLUSTER_BYTES, 0);
      else this.writeRuns(slot);
      this.unref(slot);
    } else if (h[hdr + SLOT_CRC_UPDATE] === 1) {
      // Every carried page reads as zeros on disk: the old content is the zero cluster.
      rewritten.add(vc);
      updateCrc(vc, ZERO_CLUSTER_CRC, h[hdr + SLOT_CRC] >>> 0);
      this.writeRuns(slot);
      this.unref(slot);
    } else {
      rewritten.add(vc);
      this.readOldContent(slot); // the slot's reference is released once its writes are submitted
    }
    this.complete(0);
  }

  /** Waits for something to happen: writes whose old content is in go out first, else one completion. */
  progress(): void {
    if (this.ready.length > 0) this.writeAfterOldContent(this.ready.shift()!);
    else this.complete(1);
  }

  /** Submits what is queued and takes what has completed, waiting for at least `min` completions. */
  complete(min: number): void {
    const t1 = performance.now();
    const done = reapNamed(this.backend, this.img.path, min);
    this.ioMs += performance.now() - t1;
    for (let i = 0; i < done.length; i++) {
      const tag = done[i].tag;
      if (tag >= this.slotCount) {
        this.oldContentBytes += done[i].bytes;
        this.unitDone(tag - this.slotCount);
      } else {
        this.bytesWritten += done[i].bytes;
        this.unref(tag);
      }
    }
  }

  private unref(slot: number): void {
    if (--this.pendingWrites[slot] === 0) {
      this.clusterBusy.delete(this.slotCluster[slot]);
      this.free.push(slot);
    }
  }

  private unitDone(unit: number): void {
    if (--this.unitPending[unit] === 0) this.ready.push(unit);
  }

  /** Writes slot bytes [off, off + len) at byte `at` of the slot's cluster. */
  private submitWrite(slot: number, off: number, len: number, at: number): void {
    if (this.firstWriteAtMs === 0) this.firstWriteAtMs = epochMs();
    while (this.backend.inFlight >= this.backend.queueDepth) this.complete(1);
    this.img.queueWrite(this.backend, this.v.slots, off, len, this.slotCluster[slot], at, slot);
    this.pendingWrites[slot]++;
    this.writeCalls++;
  }

  /** Reads byte `at` of `slot`'s cluster, as on disk, into old-content bytes [off, off + len) of `unit`. */
  private submitRead(unit: number, slot: number, off: number, len: number, at: number): void {
    while (this.backend.inFlight >= this.backend.queueDepth) this.complete(1);
    this.img.queueRead(this.backend, this.v.oldContent, off, len, this.slotCluster[slot], at, this.slotCount + unit);
    this.unitPending[unit]++;
    this.oldContentReads++;
  }

  /** One write per run of pages the publication carries. */
  private writeRuns(slot: number): void {
    const hdr = slot * SLOT_INTS;
    const base = slot * SLOT_BYTES;
    let run0 = this.nextSpan(hdr, 0, 0);
    while (run0 >= 0) {
      const end = this.spanEnd;
      this.submitWrite(slot, base + run0 * PAGE_BYTES, (end - run0) * PAGE_BYTES, run0 * PAGE_BYTES);
      run0 = this.nextSpan(hdr, end, 0);
    }
  }

  /** Reads the old content of the carried spans into a free unit; writeAfterOldContent follows once it is in. */
  private readOldContent(slot: number): void {
    while (this.freeUnits.length === 0) this.progress();
    const unit = this.freeUnits.pop()!;
    this.unitSlot[unit] = slot;
    this.unitPending[unit] = 1;
    const hdr = slot * SLOT_INTS;
    const ub = unit * CLUSTER_BYTES;
    let run0 = this.nextSpan(hdr, 0, OLD_CONTENT_GAP_PAGES);
    while (run0 >= 0) {
      const end = this.spanEnd;
      this.submitRead(unit, slot, ub + run0 * PAGE_BYTES, (end - run0) * PAGE_BYTES, run0 * PAGE_BYTES);
      run0 = this.nextSpan(hdr, end, OLD_CONTENT_GAP_PAGES);
    }
    this.unitDone(unit);
  }

  /** The old content of a unit's spans has been read: update the cluster's CRC, then write the new pages. */
  private writeAfterOldContent(unit: number): void {
    const { slots, oldContent } = this.v;
    const h = this.h;
    const slot = this.unitSlot[unit];
    const hdr = slot * SLOT_INTS;
    const ub = unit * CLUSTER_BYTES;
    const oldCrc = crc32cOfPages(oldContent, ub, PAGE_BYTES, PAGES_PER_CHUNK, (p) => isCarried(h, hdr, p));
    updateCrc(this.slotCluster[slot], oldCrc, h[hdr + SLOT_CRC] >>> 0);
    // One write per span read: the pages between its runs get their old content back (unchanged on disk).
    const sb = slot * SLOT_BYTES;
    let run0 = this.nextSpan(hdr, 0, OLD_CONTENT_GAP_PAGES);
    while (run0 >= 0) {
      const end = this.spanEnd;
      for (let p = run0; p < end; p++) {
        if (!isCarried(h, hdr, p)) slots.set(oldContent.subarray(ub + p * PAGE_BYTES, ub + (p + 1) * PAGE_BYTES), sb + p * PAGE_BYTES);
      }
      this.submitWrite(slot, sb + run0 * PAGE_BYTES, (end - run0) * PAGE_BYTES, run0 * PAGE_BYTES);
      run0 = this.nextSpan(hdr, end, OLD_CONTENT_GAP_PAGES);
    }
    this.unitSlot[unit] = -1;
    this.freeUnits.push(unit);
    this.unref(slot);
  }

  /**
   * The first page, at or after `from`, of the next span of pages the publication carries, or -1 when there is none;
   * the span ends at spanEnd. Carried pages at most maxGap pages apart share a span (0: each run is its own span).
   */
  private nextSpan(hdr: number, from: number, maxGap: number): number {
    const h = this.h;
    let run0 = from;
    while (run0 < PAGES_PER_CHUNK && !isCarried(h, hdr, run0)) run0++;
    if (run0 === PAGES_PER_CHUNK) return -1;
    let end = run0 + 1;
    for (let p = end; p < PAGES_PER_CHUNK && p - end <= maxGap; p++) {
      if (isCarried(h, hdr, p)) end = p + 1;
    }
    this.spanEnd = end;
    return run0;
  }
}

/**
 * Writes chunks as they come, keeping up to the backend's queue depth of requests in flight. A slot goes back to the
 * coalescer only when all its writes have completed (the kernel reads from it until then), and a cluster never has
 * two publications in flight at once, so a re-sent page cannot race the earlier write of its chunk.
 *
 * A publication that overwrites pages holding data on disk (plain migration re-sending pages) is written in two
 * steps: first the carried runs are read into an old-content unit (their old bytes, at the same offsets; runs close
 * together as one span), and only when those reads have completed are they written (a span whole, the pages between
 * its runs restored from the unit); the cluster's CRC then moves by crc(old) ^ crc(new) (see SLOT_CRC_UPDATE).
 * Other publications go on meanwhile. Before, such clusters were read back whole at the end: a 3.8 GB
 * plain-migration stream read 3.4 GB back in 1.5 s of its 5.8 s, while QEMU waited for snap-pipe to exit.
 */
function run(shared: SaveShared): WriterResult {
  const t0 = performance.now();
  if (!image || !io) throw new Error('writer.run before writer.open');
  const backend = io;
  const v = saveViews(shared);
  const filled = new IntQueueConsumer(v.ctrl, CTRL.FILL_HEAD, CTRL.FILL_TAIL, v.fillQueue);
  const free = new IntQueueProducer(v.ctrl, CTRL.FREE_HEAD, CTRL.FREE_TAIL, v.freeQueue);
  const w = new ChunkWriter(image, backend, v, free);
  for (;;) {
    // Never block on the coalescer while requests are in flight: their slots may be what it is waiting for. With few
    // in flight, the disk is about to run dry: a chunk published meanwhile goes out at once (the wait for it is
    // short, so completions are still reaped within FILL_POLL_MS); with many, waiting on the disk is right.
    while (w.busy() && filled.available() === 0) {
      if (w.writesReady() || backend.inFlight * 2 >= backend.queueDepth) w.progress();
      else if (!filled.waitAvailable(FILL_POLL_MS)) w.complete(0);
    }
    const slot = filled.pop();
    if (slot === END_OF_CHUNKS) break;
    w.write(slot);
  }
  while (w.busy()) w.progress();
  ran = true;
  return {
    bytesWritten: w.bytesWritten,
    writeCalls: w.writeCalls,
    clustersWritten: image.dataClusters,
    rewrittenClusters: rewritten.size,
    oldContentReads: w.oldContentReads,
    oldContentBytes: w.oldContentBytes,
    io: backend.name,
    queueDepth: backend.queueDepth,
    upstreamWaitMs: filled.waits.ms,
    ioMs: w.ioMs,
    busyMs: performance.now() - t0 - filled.waits.ms - free.waits.ms - w.ioMs,
    readyAtMs: stageReadyAtMs,
    firstWriteAtMs: w.firstWriteAtMs,
  };
}

/** Every cluster's CRC was computed on the way (see run); writes the metadata and marks the image complete. */
function finish(meta: Omit<SnapshotMeta, 'chunkCrc32c'>): void {
  if (!image || !ran || !io) throw new Error('writer.finish before writer.run');
  const chunkCrc32c = meta.blocks.map((b) => {
    const first = b.virtOffsetBytes / CLUSTER_BYTES;
    const out = new Uint32Array(Math.ceil(b.lengthBytes / CLUSTER_BYTES));
    for (let c = 0; c < out.length; c++) out[c] = crcByVirtCluster.get(first + c) ?? 0;
    return out;
  });
  image.finish({ ...meta, chunkCrc32c });
  image.close();
  io.close();
}

const api = {
  open(opts: WriterOpenOptions): Outcome<{ direct: boolean; io: IoBackendName; note?: string }> {
    return outcome(() => {
      const opened = openIoBackend({ io: opts.io, queueDepth: opts.queueDepth });
      io = opened.backend;
      image = ImageWriter.create(opts.path, { direct: opts.direct, force: opts.force });
      return { direct: image.direct, io: io.name, note: opened.note };
    });
  },
  run(shared: SaveShared): Outcome<WriterResult> {
    return outcome(() => run(shared));
  },
  finish(meta: Omit<SnapshotMeta, 'chunkCrc32c'>): Outcome<void> {
    return outcome(() => finish(meta));
  },
  /** The save failed: say why in the image's header (it stays incomplete). */
  fail(line: string): Outcome<void> {
    return outcome(() => image?.recordFailure(line));
  },
};
export type WriterApi = typeof api;
exposeStage(api);
