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
import { CLUSTER_BYTES, PAGE_BYTES, PAGES_PER_CHUNK, type SnapshotMeta } from '../../format/image/types.js';
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
let views: SaveViews | undefined;
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
  const img = image;
  const backend = io;
  const v = (views = saveViews(shared));
  const filled = new IntQueueConsumer(v.ctrl, CTRL.FILL_HEAD, CTRL.FILL_TAIL, v.fillQueue);
  const free = new IntQueueProducer(v.ctrl, CTRL.FREE_HEAD, CTRL.FREE_TAIL, v.freeQueue);
  const h = v.slotHeaders;
  const slotCount = v.sizes.slotCount;
  const pendingWrites = new Int32Array(slotCount);
  const slotCluster = new Int32Array(slotCount);
  const slotHost = new Float64Array(slotCount);
  const clusterBusy = new Set<number>();
  // Old-content units: completion tags slotCount + unit. A unit holds one reference while its reads are being
  // submitted (like pendingWrites), and is ready once its count drops to 0.
  const units = v.sizes.oldContentUnits;
  const unitSlot = new Int32Array(units).fill(-1);
  const unitPending = new Int32Array(units);
  const freeUnits = Array.from({ length: units }, (_, i) => units - 1 - i);
  const ready: number[] = [];
  let bytesWritten = 0;
  let writeCalls = 0;
  let oldContentReads = 0;
  let oldContentBytes = 0;
  let ioMs = 0;

  const complete = (min: number) => {
    const t1 = performance.now();
    const done = reapNamed(backend, img.path, min);
    ioMs += performance.now() - t1;
    for (let i = 0; i < done.length; i++) {
      const tag = done[i].tag;
      if (tag >= slotCount) {
        oldContentBytes += done[i].bytes;
        unitDone(tag - slotCount);
        continue;
      }
      bytesWritten += done[i].bytes;
      unref(tag);
    }
  };
  // A slot's count holds one reference while its writes are being submitted, so completions reaped in between
  // (the queue was full) cannot hand it back early; the last reference returns it to the coalescer.
  const unref = (slot: number) => {
    if (--pendingWrites[slot] === 0) {
      clusterBusy.delete(slotCluster[slot]);
      free.push(slot);
    }
  };
  const unitDone = (unit: number) => {
    if (--unitPending[unit] === 0) ready.push(unit);
  };
  let firstWriteAtMs = 0;
  const submit = (slot: number, off: number, len: number, pos: number) => {
    if (firstWriteAtMs === 0) firstWriteAtMs = epochMs();
    while (backend.inFlight >= backend.queueDepth) complete(1);
    backend.write(img.fd, v.slots, off, len, pos, slot);
    pendingWrites[slot]++;
    writeCalls++;
  };
  const submitRead = (unit: number, off: number, len: number, pos: number) => {
    while (backend.inFlight >= backend.queueDepth) complete(1);
    backend.read(img.fd, v.oldContent, off, len, pos, slotCount + unit);
    unitPending[unit]++;
    oldContentReads++;
  };

  const carried = (hdr: number, p: number) => (h[hdr + SLOT_SEEN_BITS + (p >>> 5)] & (1 << (p & 31))) !== 0;
  // Calls each(run0, pages) for the runs of pages this publication carries (set bits of the slot's seen mask);
  // runs at most maxGap pages apart are reported as one span.
  const forRuns = (hdr: number, maxGap: number, each: (run0: number, pages: number) => void) => {
    let run0 = -1;
    let end = -1; // one past the last carried page of the open span
    for (let p = 0; p < PAGES_PER_CHUNK; p++) {
      if (!carried(hdr, p)) continue;
      if (run0 >= 0 && p - end > maxGap) {
        each(run0, end - run0);
        run0 = -1;
      }
      if (run0 < 0) run0 = p;
      end = p + 1;
    }
    if (run0 >= 0) each(run0, end - run0);
  };
  const submitRuns = (slot: number, hdr: number) => {
    const base = slot * SLOT_BYTES;
    forRuns(hdr, 0, (run0, pages) => submit(slot, base + run0 * PAGE_BYTES, pages * PAGE_BYTES, slotHost[slot] + run0 * PAGE_BYTES));
  };
  const updateCrc = (vc: number, oldContentCrc: number, newContentCrc: number) => {
    crcByVirtCluster.set(vc, (crcByVirtCluster.get(vc)! ^ oldContentCrc ^ newContentCrc) >>> 0);
  };

  // The old content of a unit's runs has been read: update the cluster's CRC, then write the new pages.
  const writeAfterOldContent = (unit: number) => {
    const slot = unitSlot[unit];
    const hdr = slot * SLOT_INTS;
    const base = unit * CLUSTER_BYTES;
    const oldCrc = crc32cOfPages(v.oldContent, base, PAGE_BYTES, PAGES_PER_CHUNK, (p) => carried(hdr, p));
    updateCrc(slotCluster[slot], oldCrc, h[hdr + SLOT_CRC] >>> 0);
    // One write per span read: the pages between its runs get their old content back (unchanged on disk).
    const sb = slot * SLOT_BYTES;
    forRuns(hdr, OLD_CONTENT_GAP_PAGES, (run0, pages) => {
      for (let p = run0; p < run0 + pages; p++) {
        if (!carried(hdr, p)) v.slots.set(v.oldContent.subarray(base + p * PAGE_BYTES, base + (p + 1) * PAGE_BYTES), sb + p * PAGE_BYTES);
      }
      submit(slot, sb + run0 * PAGE_BYTES, pages * PAGE_BYTES, slotHost[slot] + run0 * PAGE_BYTES);
    });
    unitSlot[unit] = -1;
    freeUnits.push(unit);
    unref(slot);
  };
  // Waits for something to happen: writes whose old content is in go out first, else one completion.
  const progress = () => {
    if (ready.length > 0) writeAfterOldContent(ready.shift()!);
    else complete(1);
  };
  const busy = () => backend.inFlight > 0 || ready.length > 0;

  for (;;) {
    // Never block on the coalescer while requests are in flight: their slots may be what it is waiting for. With few
    // in flight, the disk is about to run dry: a chunk published meanwhile goes out at once (the wait for it is
    // short, so completions are still reaped within FILL_POLL_MS); with many, waiting on the disk is right.
    while (busy() && filled.available() === 0) {
      if (ready.length > 0 || backend.inFlight * 2 >= backend.queueDepth) progress();
      else if (!filled.waitAvailable(FILL_POLL_MS)) complete(0);
    }
    const slot = filled.pop();
    if (slot === END_OF_CHUNKS) break;
    const base = slot * SLOT_BYTES;
    const hdr = slot * SLOT_INTS;
    const vc = h[hdr + SLOT_VIRT_CLUSTER];
    while (clusterBusy.has(vc)) progress();
    const { hostOffsetBytes, fresh } = img.allocate(vc);
    slotCluster[slot] = vc;
    slotHost[slot] = hostOffsetBytes;
    clusterBusy.add(vc);
    pendingWrites[slot] = 1;
    // The coalescer and this writer agree on which publication of a chunk is its first (the cluster is new).
    assert.equal(fresh, h[hdr + SLOT_FIRST] === 1, `cluster ${vc}: coalescer and writer disagree on its first write`);
    assert(fresh || h[hdr + SLOT_WHOLE] === 0, `cluster ${vc}: only a new cluster is written whole`);
    if (fresh) {
      crcByVirtCluster.set(vc, h[hdr + SLOT_CRC] >>> 0);
      // A fresh cluster lies past everything written so far, in the part of the file allocated ahead (unwritten
      // extents) or sized ahead (a hole): either way pages not written read as zeros, which is what the coalescer
      // checksummed them as.
      if (h[hdr + SLOT_WHOLE] === 1) submit(slot, base, CLUSTER_BYTES, hostOffsetBytes);
      else submitRuns(slot, hdr);
    } else if (h[hdr + SLOT_CRC_UPDATE] === 1) {
      // Every carried page reads as zeros on disk: the old content is the zero cluster.
      rewritten.add(vc);
      updateCrc(vc, ZERO_CLUSTER_CRC, h[hdr + SLOT_CRC] >>> 0);
      submitRuns(slot, hdr);
    } else {
      rewritten.add(vc);
      while (freeUnits.length === 0) progress();
      const unit = freeUnits.pop()!;
      unitSlot[unit] = slot;
      unitPending[unit] = 1;
      const ub = unit * CLUSTER_BYTES;
      forRuns(hdr, OLD_CONTENT_GAP_PAGES, (run0, pages) => submitRead(unit, ub + run0 * PAGE_BYTES, pages * PAGE_BYTES, hostOffsetBytes + run0 * PAGE_BYTES));
      unitDone(unit);
      complete(0);
      continue; // the slot's reference is released once its writes are submitted (writeAfterOldContent)
    }
    unref(slot);
    complete(0);
  }
  while (busy()) progress();
  return {
    bytesWritten,
    writeCalls,
    clustersWritten: img.dataClusters,
    rewrittenClusters: rewritten.size,
    oldContentReads,
    oldContentBytes,
    io: backend.name,
    queueDepth: backend.queueDepth,
    upstreamWaitMs: filled.waits.ms,
    ioMs,
    busyMs: performance.now() - t0 - filled.waits.ms - free.waits.ms - ioMs,
    readyAtMs: stageReadyAtMs,
    firstWriteAtMs,
  };
}

/** Every cluster's CRC was computed on the way (see run); writes the metadata and marks the image complete. */
function finish(meta: Omit<SnapshotMeta, 'chunkCrc32c'>): void {
  if (!image || !views || !io) throw new Error('writer.finish before writer.run');
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
  close(): void {
    io?.close();
    image?.close();
  },
};
export type WriterApi = typeof api;
exposeStage(api);
