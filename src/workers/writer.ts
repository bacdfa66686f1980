// Writer stage: takes filled chunk slots from the coalescer and writes them to the image with O_DIRECT through an
// I/O backend (io_uring, or synchronous writes): 1 MiB per fresh cluster, only the carried pages for a cluster
// written before or for a fresh cluster that carries few pages (the rest of a fresh cluster is a hole in the file,
// which reads as zeros). Each new cluster's CRC-32C comes from the coalescer (computed while the slot was in its
// cache). At the end it writes the metadata and marks the image complete (ImageWriter.finish).
import assert from 'node:assert/strict';
import { crc32c, crc32cZeros } from '../native/fastmem.js';
import { ioError } from '../errors.js';
import { ImageWriter } from '../image/writer.js';
import { CLUSTER_BYTES, PAGE_BYTES, PAGES_PER_CHUNK, type SnapshotMeta } from '../image/types.js';
import { openIoBackend, reapNamed, type IoBackend, type IoBackendName } from '../native/io.js';
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
import { exposeStage, outcome, type Outcome } from './rpc.js';
import { saveViews, type SaveViews } from './stage-memory.js';

export interface WriterResult {
  bytesWritten: number;
  writeCalls: number;
  clustersWritten: number;
  /** Clusters written more than once. */
  rewrittenClusters: number;
  /** Of those, the ones whose CRC is read back at the end (the rest had theirs updated on the way). */
  readBackClusters: number;
  io: IoBackendName;
  queueDepth: number;
  /** Waiting for filled chunks (the coalescer is behind). */
  upstreamWaitMs: number;
  /** Time waiting for write completions (the disk). */
  ioMs: number;
  busyMs: number;
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
/** Clusters written more than once whose CRC must be read back at the end. */
const rewritten = new Set<number>();
/** Clusters written more than once whose CRC was updated from the coalescer's instead. */
const updatedClusters = new Set<number>();
/** CRC-32C of a cluster of zeros. */
const ZERO_CLUSTER_CRC = crc32cZeros(0, CLUSTER_BYTES);

/**
 * Writes chunks as they come, keeping up to the backend's queue depth of writes in flight. A slot goes back to the
 * coalescer only when all its writes have completed (the kernel reads from it until then), and a cluster never has
 * two writes in flight at once, so a re-sent page cannot race the earlier write of its chunk.
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
  const clusterBusy = new Set<number>();
  let bytesWritten = 0;
  let writeCalls = 0;
  let ioMs = 0;

  const complete = (min: number) => {
    const t1 = performance.now();
    const done = reapNamed(backend, img.path, min);
    ioMs += performance.now() - t1;
    for (let i = 0; i < done.length; i++) {
      const slot = done[i].tag;
      bytesWritten += done[i].bytes;
      unref(slot);
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
  const submit = (slot: number, off: number, len: number, pos: number) => {
    while (backend.inFlight >= backend.queueDepth) complete(1);
    backend.write(img.fd, v.slots, off, len, pos, slot);
    pendingWrites[slot]++;
    writeCalls++;
  };

  // Writes the runs of pages this publication carries (set bits of the slot's seen mask).
  const submitRuns = (slot: number, base: number, hdr: number, hostOffsetBytes: number) => {
    let run0 = -1;
    for (let p = 0; p <= PAGES_PER_CHUNK; p++) {
      const seen = p < PAGES_PER_CHUNK && (h[hdr + SLOT_SEEN_BITS + (p >>> 5)] & (1 << (p & 31))) !== 0;
      if (seen) {
        if (run0 < 0) run0 = p;
      } else if (run0 >= 0) {
        submit(slot, base + run0 * PAGE_BYTES, (p - run0) * PAGE_BYTES, hostOffsetBytes + run0 * PAGE_BYTES);
        run0 = -1;
      }
    }
  };

  for (;;) {
    // Never block on the coalescer while writes are in flight: their slots may be what it is waiting for.
    while (backend.inFlight > 0 && filled.available() === 0) complete(1);
    const slot = filled.pop();
    if (slot === END_OF_CHUNKS) break;
    const base = slot * SLOT_BYTES;
    const hdr = slot * SLOT_INTS;
    const vc = h[hdr + SLOT_VIRT_CLUSTER];
    while (clusterBusy.has(vc)) complete(1);
    const { hostOffsetBytes, fresh } = img.allocate(vc);
    slotCluster[slot] = vc;
    clusterBusy.add(vc);
    pendingWrites[slot] = 1;
    // The coalescer and this writer agree on which publication of a chunk is its first (the cluster is new).
    assert.equal(fresh, h[hdr + SLOT_FIRST] === 1, `cluster ${vc}: coalescer and writer disagree on its first write`);
    assert(fresh || h[hdr + SLOT_WHOLE] === 0, `cluster ${vc}: only a new cluster is written whole`);
    if (fresh) {
      crcByVirtCluster.set(vc, h[hdr + SLOT_CRC] >>> 0);
      // A fresh cluster lies past everything written so far, in the part of the file sized ahead (a hole): pages
      // not written read as zeros, which is what the coalescer checksummed them as.
      if (h[hdr + SLOT_WHOLE] === 1) submit(slot, base, CLUSTER_BYTES, hostOffsetBytes);
      else submitRuns(slot, base, hdr, hostOffsetBytes);
    } else {
      // Its CRC follows from the coalescer's (see SLOT_CRC_UPDATE), or the cluster is read back at the end.
      if (h[hdr + SLOT_CRC_UPDATE] === 1 && !rewritten.has(vc)) {
        crcByVirtCluster.set(vc, (crcByVirtCluster.get(vc)! ^ ZERO_CLUSTER_CRC ^ (h[hdr + SLOT_CRC] >>> 0)) >>> 0);
        updatedClusters.add(vc);
      } else {
        rewritten.add(vc);
        updatedClusters.delete(vc);
      }
      submitRuns(slot, base, hdr, hostOffsetBytes);
    }
    unref(slot);
    complete(0);
  }
  while (backend.inFlight > 0) complete(1);
  return {
    bytesWritten,
    writeCalls,
    clustersWritten: img.dataClusters,
    rewrittenClusters: rewritten.size + updatedClusters.size,
    readBackClusters: rewritten.size,
    io: backend.name,
    queueDepth: backend.queueDepth,
    upstreamWaitMs: filled.waits.ms,
    ioMs,
    busyMs: performance.now() - t0 - filled.waits.ms - free.waits.ms - ioMs,
  };
}

/**
 * A cluster written more than once got its pages from several publications: its CRC comes from reading it back,
 * through the I/O backend with up to its queue depth of reads in flight (one at a time, 1078 clusters of a 4 GiB
 * background snapshot took about a second), into the slots, which are all free by now.
 */
function readBackRewritten(img: ImageWriter, v: SaveViews, backend: IoBackend): void {
  const order = [...rewritten];
  const depth = Math.max(1, Math.min(backend.queueDepth, v.sizes.slotCount));
  const slotVc = new Int32Array(depth);
  const freeSlots = Array.from({ length: depth }, (_, i) => i);
  let next = 0;
  let done = 0;
  while (done < order.length) {
    while (next < order.length && freeSlots.length > 0) {
      const vc = order[next++];
      const host = img.hostOffsetOf(vc);
      if (host === undefined) throw new Error(`rewritten cluster ${vc} has no host cluster`);
      const slot = freeSlots.pop()!;
      slotVc[slot] = vc;
      backend.read(img.fd, v.slots, slot * SLOT_BYTES, CLUSTER_BYTES, host, slot);
    }
    for (const c of reapNamed(backend, img.path)) {
      const base = c.tag * SLOT_BYTES;
      if (c.bytes !== CLUSTER_BYTES) {
        throw ioError(`reading back cluster ${slotVc[c.tag]} of ${img.path}`, new Error(`short read: ${c.bytes} bytes`));
      }
      crcByVirtCluster.set(slotVc[c.tag], crc32c(v.slots.subarray(base, base + CLUSTER_BYTES)));
      freeSlots.push(c.tag);
      done++;
    }
  }
}

/** CRCs of clusters written more than once come from reading them back; the rest were computed on the way. */
function finish(meta: Omit<SnapshotMeta, 'chunkCrc32c'>): void {
  if (!image || !views || !io) throw new Error('writer.finish before writer.run');
  readBackRewritten(image, views, io);
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
  close(): void {
    io?.close();
    image?.close();
  },
};
export type WriterApi = typeof api;
exposeStage(api);
