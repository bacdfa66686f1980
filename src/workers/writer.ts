// Writer stage: takes filled chunk slots from the coalescer and writes them to the image with O_DIRECT
// (1 MiB per fresh cluster; only the carried pages for a cluster written before), computing each cluster's CRC-32
// on the way. At the end it writes the metadata and marks the image complete (ImageWriter.finish).
import { readSync, writeSync } from 'node:fs';
import { crc32 } from 'node:zlib';
import { ioError } from '../errors.js';
import { ImageWriter } from '../image/writer.js';
import { CLUSTER_BYTES, PAGE_BYTES, PAGES_PER_CHUNK, type SnapshotMeta } from '../image/types.js';
import { IntQueueConsumer, IntQueueProducer } from '../ring/queue.js';
import {
  CTRL,
  END_OF_CHUNKS,
  SLOT_BYTES,
  SLOT_INTS,
  SLOT_SEEN_BITS,
  SLOT_VIRT_CLUSTER,
  type SaveShared,
} from '../ring/layout.js';
import { exposeStage, outcome, type Outcome } from './rpc.js';
import { saveViews, type SaveViews } from './stage-memory.js';

export interface WriterResult {
  bytesWritten: number;
  writeCalls: number;
  clustersWritten: number;
  rewrittenClusters: number;
  /** Waiting for filled chunks (the coalescer is behind). */
  upstreamWaitMs: number;
  /** Time inside write system calls (the disk). */
  ioMs: number;
  busyMs: number;
}

export interface WriterOpenOptions {
  path: string;
  direct: boolean;
  force: boolean;
}

let image: ImageWriter | undefined;
let views: SaveViews | undefined;
const crcByVirtCluster = new Map<number, number>();
const rewritten = new Set<number>();

function writeAll(fd: number, src: Uint8Array, off: number, len: number, pos: number): void {
  let done = 0;
  while (done < len) {
    let n: number;
    try {
      n = writeSync(fd, src, off + done, len - done, pos + done);
    } catch (err) {
      throw ioError(`writing ${len - done} bytes at offset ${pos + done} of ${image?.path}`, err);
    }
    if (n <= 0) throw ioError(`writing at offset ${pos + done} of ${image?.path}`, new Error('no progress'));
    done += n;
  }
}

function run(shared: SaveShared): WriterResult {
  const t0 = performance.now();
  if (!image) throw new Error('writer.run before writer.open');
  const img = image;
  const v = (views = saveViews(shared));
  const filled = new IntQueueConsumer(v.ctrl, CTRL.FILL_HEAD, CTRL.FILL_TAIL, v.fillQueue);
  const free = new IntQueueProducer(v.ctrl, CTRL.FREE_HEAD, CTRL.FREE_TAIL, v.freeQueue);
  const h = v.slotHeaders;
  let bytesWritten = 0;
  let writeCalls = 0;
  let ioMs = 0;
  for (;;) {
    const slot = filled.pop();
    if (slot === END_OF_CHUNKS) break;
    const base = slot * SLOT_BYTES;
    const hdr = slot * SLOT_INTS;
    const vc = h[hdr + SLOT_VIRT_CLUSTER];
    const { hostOffsetBytes, fresh } = img.allocate(vc);
    const t1 = performance.now();
    if (fresh) {
      writeAll(img.fd, v.slots, base, CLUSTER_BYTES, hostOffsetBytes);
      bytesWritten += CLUSTER_BYTES;
      writeCalls++;
    } else {
      // Only the pages this publication carries: runs of set bits in the seen mask.
      let run0 = -1;
      for (let p = 0; p <= PAGES_PER_CHUNK; p++) {
        const seen = p < PAGES_PER_CHUNK && (h[hdr + SLOT_SEEN_BITS + (p >>> 5)] & (1 << (p & 31))) !== 0;
        if (seen) {
          if (run0 < 0) run0 = p;
        } else if (run0 >= 0) {
          const len = (p - run0) * PAGE_BYTES;
          writeAll(img.fd, v.slots, base + run0 * PAGE_BYTES, len, hostOffsetBytes + run0 * PAGE_BYTES);
          bytesWritten += len;
          writeCalls++;
          run0 = -1;
        }
      }
    }
    ioMs += performance.now() - t1;
    if (fresh) crcByVirtCluster.set(vc, crc32(v.slots.subarray(base, base + CLUSTER_BYTES)));
    else rewritten.add(vc);
    free.push(slot);
  }
  return {
    bytesWritten,
    writeCalls,
    clustersWritten: img.dataClusters,
    rewrittenClusters: rewritten.size,
    upstreamWaitMs: filled.waits.ms,
    ioMs,
    busyMs: performance.now() - t0 - filled.waits.ms - free.waits.ms - ioMs,
  };
}

/** CRCs of clusters written more than once come from reading them back; the rest were computed on the way. */
function finish(meta: Omit<SnapshotMeta, 'chunkCrc32'>): void {
  if (!image || !views) throw new Error('writer.finish before writer.run');
  const buf = views.slots.subarray(0, CLUSTER_BYTES);
  for (const vc of rewritten) {
    const host = image.hostOffsetOf(vc);
    if (host === undefined) throw new Error(`rewritten cluster ${vc} has no host cluster`);
    let got = 0;
    try {
      got = readSync(image.fd, buf, 0, CLUSTER_BYTES, host);
    } catch (err) {
      throw ioError(`reading back cluster at offset ${host} of ${image.path}`, err);
    }
    if (got !== CLUSTER_BYTES) throw ioError(`reading back cluster at offset ${host} of ${image.path}`, new Error(`short read: ${got}`));
    crcByVirtCluster.set(vc, crc32(buf));
  }
  const chunkCrc32 = meta.blocks.map((b) => {
    const first = b.virtOffsetBytes / CLUSTER_BYTES;
    const out = new Uint32Array(Math.ceil(b.lengthBytes / CLUSTER_BYTES));
    for (let c = 0; c < out.length; c++) out[c] = crcByVirtCluster.get(first + c) ?? 0;
    return out;
  });
  image.finish({ ...meta, chunkCrc32 });
  image.close();
}

const api = {
  open(opts: WriterOpenOptions): Outcome<{ direct: boolean }> {
    return outcome(() => {
      image = ImageWriter.create(opts.path, { direct: opts.direct, force: opts.force });
      return { direct: image.direct };
    });
  },
  run(shared: SaveShared): Outcome<WriterResult> {
    return outcome(() => run(shared));
  },
  finish(meta: Omit<SnapshotMeta, 'chunkCrc32'>): Outcome<void> {
    return outcome(() => finish(meta));
  },
  close(): void {
    image?.close();
  },
};
export type WriterApi = typeof api;
exposeStage(api);
