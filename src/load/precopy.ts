// `snap-pipe load IMG` (precopy): image -> migration stream on `out` (QEMU's exec: pipe), for a destination started
// with `-incoming defer`. Everything is validated before the first byte goes out; then, in this order:
//   header + configuration (verbatim), ram START (verbatim),
//   ZERO records for every page whose last version was zero (no disk reads; ROM-like blocks are pre-filled on the
//   destination, so a zero page must be cleared explicitly),
//   PAGE records for every data page, one PART section per 1 MiB cluster, clusters read in host-file order,
//   the device state (FULL sections, EOF, VM description; verbatim).
// Pages never sent are not sent. A cluster whose CRC-32C does not match stops the stream before its pages and before
// the device state, so the destination fails the migration instead of running on bad memory.
//
// Runs on the main thread. Cluster reads go through the I/O backend (io_uring by default): the loop keeps up to
// queueDepth reads outstanding and consumes them in submission order, so the kernel reads ahead while this thread
// verifies a cluster and writes its pages to the pipe.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import { crc32c, crc32cImplementation } from '../native/fastmem.js';
import { SnapPipeError, ioError } from '../errors.js';
import { pagesOf } from '../format/image/metadata.js';
import { openImageFile } from '../image/open.js';
import { ImageReader } from '../image/reader.js';
import { CLUSTER_BYTES, PAGE_BYTES, PAGES_PER_CHUNK, type SnapshotMeta } from '../format/image/types.js';
import { openIoBackend, reapNamed, type IoBackend, type IoBackendName } from '../native/io.js';
import { enlargePipe } from '../native/uring.js';
import { alignedShared } from '../native/memory.js';
import { PART_HEAD_BYTES, PART_TAIL_BYTES, type StreamEncoder } from '../format/stream/encoder.js';
import { pipeEncoder } from './pipe.js';
import { checkImage, validMask, type DataChunk } from '../image/checks.js';

export const DEFAULT_LOAD_QUEUE_DEPTH = 16;
export const LOAD_QUEUE_DEPTH_MAX = 256;
/** Bound on ZERO records per PART section (9 bytes each with CONTINUE: ~300 KiB). */
const ZERO_RECORDS_PER_SECTION = 32768;
const IDSTR_BYTES_MAX = 255;
const ZERO_SECTION_BYTES_MAX = PART_HEAD_BYTES + ZERO_RECORDS_PER_SECTION * (8 + 1) + 256 * (1 + IDSTR_BYTES_MAX) + PART_TAIL_BYTES;

export interface LoadProgress {
  bytesOut: number;
  dataPagesOut: number;
  dataPagesTotal: number;
}

export interface LoadOptions {
  path: string;
  /** File descriptor the stream goes to; 1 under QEMU. */
  out: number;
  direct: boolean;
  verify: boolean;
  queueDepth: number;
  io: IoBackendName | 'auto';
  /** One line for the user (e.g. why io_uring is not used). */
  onNote?: (line: string) => void;
  /** Called after each flush of the output buffer. */
  onProgress?: (p: LoadProgress) => void;
}

export interface LoadReport {
  path: string;
  seconds: number;
  /** Stream bytes written to `out`. */
  bytesOut: number;
  outMBps: number;
  dataPages: number;
  zeroPages: number;
  /** Pages never sent by the source: not sent now either. */
  unsentPages: number;
  dataClusters: number;
  bytesRead: number;
  /** Time spent in cluster reads (submitting and waiting), in CRC checks, and in writes to `out` (a full pipe). */
  readMs: number;
  verifyMs: number;
  writeMs: number;
  writeCalls: number;
  ramSections: number;
  deviceStateBytes: number;
  blocks: number;
  direct: boolean;
  verified: boolean;
  queueDepth: number;
  readBackend: string;
  /** How cluster checksums were computed (see SaveReport.checksum). */
  checksum: typeof crc32cImplementation;
}

// ---------------------------------------------------------------------------------------------------------------
// Validation (before any output)

/**
 * Throws CHECKSUM, naming block, offset and chunk, when a cluster's CRC-32C differs from the one recorded at save;
 * `stoppedBefore` says what the stream stops short of.
 */
export function checkClusterCrc(path: string, meta: SnapshotMeta, ch: DataChunk, cluster: Uint8Array, stoppedBefore: string): void {
  const got = crc32c(cluster) >>> 0;
  const want = meta.chunkCrc32c[ch.block][ch.chunk] >>> 0;
  if (got === want) return;
  throw new SnapPipeError(
    'CHECKSUM',
    `${path}: block ${meta.blocks[ch.block].id} offset 0x${(ch.chunk * CLUSTER_BYTES).toString(16)} (1 MiB chunk ${ch.chunk}): ` +
      `checksum mismatch (stored 0x${want.toString(16).padStart(8, '0')}, read 0x${got.toString(16).padStart(8, '0')}, ` +
      `cluster at byte ${ch.hostOffsetBytes}); stream stopped before ${stoppedBefore} (--no-verify sends it anyway)`,
  );
}

// ---------------------------------------------------------------------------------------------------------------
// The load

export async function runLoad(opts: LoadOptions): Promise<LoadReport> {
  const t0 = performance.now();
  const { path } = opts;
  assert(Number.isInteger(opts.queueDepth) && opts.queueDepth >= 1 && opts.queueDepth <= LOAD_QUEUE_DEPTH_MAX, 'runLoad: queueDepth');
  const reader = ImageReader.open(path, { direct: opts.direct });
  let fd = -1;
  let reads: IoBackend | undefined;
  try {
    const { meta, plan } = checkImage(reader);
    // A 64 KiB pipe makes QEMU and us take turns in small pieces; grow it (postcopy does not: a deep pipe would
    // queue background pages ahead of the pages the guest is waiting for).
    enlargePipe(opts.out);
    fd = openImageFile(path, { direct: opts.direct });
    const depth = Math.max(1, Math.min(opts.queueDepth, plan.chunks.length));
    // One slot more than reads in flight: the cluster being sent keeps its slot while `depth` reads go on.
    const slotCount = depth + 1;
    const slots = new Uint8Array(alignedShared(slotCount * CLUSTER_BYTES), 0, slotCount * CLUSTER_BYTES);
    const opened = openIoBackend({ io: opts.io, queueDepth: depth });
    reads = opened.backend;
    if (opened.note) opts.onNote?.(opened.note);

    let dataPagesOut = 0;
    const { out, sink } = pipeEncoder(opts.out, () =>
      opts.onProgress?.({ bytesOut: sink.bytesOut, dataPagesOut, dataPagesTotal: plan.dataPages }),
    );

    // Data clusters: up to `depth` reads outstanding, consumed in submission order (chunk i uses slot i % slotCount).
    const chunks = plan.chunks;
    const doneSlot = new Uint8Array(slotCount);
    const gotBytes = new Float64Array(slotCount);
    const harvest = (min: number) => {
      for (const c of reapNamed(reads!, path, min)) {
        doneSlot[c.tag] = 1;
        gotBytes[c.tag] = c.bytes;
      }
    };
    let submitted = 0;
    const pageList = new Int32Array(PAGES_PER_CHUNK);
    let bytesRead = 0;
    let readMs = 0;
    let verifyMs = 0;
    // Nothing has been written so far: every refusal above left `out` untouched.
    try {
      out.verbatim(meta.head);
      out.verbatim(meta.ramSetup);
      emitZeroPages(out, meta);

      for (let next = 0; next < chunks.length; ) {
        const t1 = performance.now();
        let queued = 0;
        while (submitted < chunks.length && submitted - next < slotCount && reads.inFlight < depth) {
          const slot = submitted % slotCount;
          reads.read(fd, slots, slot * CLUSTER_BYTES, CLUSTER_BYTES, chunks[submitted].hostOffsetBytes, slot);
          submitted++;
          queued++;
        }
        // Hand new reads to the kernel now, not at the next wait: when the cluster we want is already here, no wait
        // comes for a while and the disk would run with fewer reads than `depth`.
        if (queued > 0) harvest(0);
        const slot = next % slotCount;
        // Bounded: each reap returns at least one of the reads in flight, and the one we want is among them.
        while (doneSlot[slot] === 0) {
          assert(reads.inFlight > 0, 'waiting for a read that was never queued');
          harvest(1);
        }
        readMs += performance.now() - t1;
        doneSlot[slot] = 0;
        const ch = chunks[next];
        if (gotBytes[slot] !== CLUSTER_BYTES) {
          throw new SnapPipeError('TRUNCATED', `${path}: the file ends inside the cluster at byte ${ch.hostOffsetBytes} (truncated image)`);
        }
        bytesRead += CLUSTER_BYTES;
        const cluster = slots.subarray(slot * CLUSTER_BYTES, (slot + 1) * CLUSTER_BYTES);
        if (opts.verify) {
          const t2 = performance.now();
          checkClusterCrc(path, meta, ch, cluster, 'this chunk and the device state, so the destination fails the migration');
          verifyMs += performance.now() - t2;
        }
        dataPagesOut += emitChunkPages(out, meta, ch, cluster, pageList);
        next++;
      }
      assert.equal(dataPagesOut, plan.dataPages, 'every data page sent once');

      // After the RAM and before the device state, where QEMU sends them (migration.c migration_completion_precopy).
      out.verbatim(meta.switchoverCommands);
      out.verbatim(meta.deviceState);
      out.flush();
    } catch (err) {
      // Send the sections already complete (all verified) before failing: QEMU 7.2 only starts an exec: incoming
      // migration when the pipe becomes readable, and a pipe closed with nothing in it is never readable (HUP
      // only), so with no bytes at all QEMU would wait forever instead of failing the migration.
      out.flushAfterFailure();
      throw err;
    }
    const seconds = (performance.now() - t0) / 1000;
    return {
      path,
      seconds,
      bytesOut: sink.bytesOut,
      outMBps: sink.bytesOut / 1e6 / seconds,
      dataPages: plan.dataPages,
      zeroPages: plan.zeroPages,
      unsentPages: plan.unsentPages,
      dataClusters: chunks.length,
      bytesRead,
      readMs,
      verifyMs,
      writeMs: sink.writeMs,
      writeCalls: sink.writeCalls,
      ramSections: out.sections,
      deviceStateBytes: meta.deviceState.length,
      blocks: meta.blocks.length,
      direct: opts.direct,
      verified: opts.verify,
      queueDepth: depth,
      readBackend: reads.name,
      checksum: crc32cImplementation,
    };
  } finally {
    reads?.close();
    if (fd >= 0) fs.closeSync(fd);
    reader.close();
  }
}

/** ZERO records for every page whose last version was zero, in block order, in PART sections of bounded size. */
function emitZeroPages(out: StreamEncoder, meta: SnapshotMeta): void {
  const id = meta.ramSectionId;
  let inSection = 0;
  meta.blocks.forEach((b, bi) => {
    const pages = pagesOf(b);
    const { sent, data } = meta.pages[bi];
    const bytes = Math.ceil(pages / 8);
    for (let i = 0; i < bytes; i++) {
      let z = sent[i] & ~data[i] & validMask(i, pages);
      // Bounded by the 8 bits of z.
      while (z !== 0) {
        const bit = 31 - Math.clz32(z & -z);
        z &= z - 1;
        if (inSection === 0) {
          out.room(ZERO_SECTION_BYTES_MAX);
          out.ramPart(id, 'name-first');
        }
        out.zero(b.id, (i * 8 + bit) * PAGE_BYTES);
        if (++inSection === ZERO_RECORDS_PER_SECTION) {
          out.ramEos(id);
          inSection = 0;
        }
      }
    }
  });
  if (inSection > 0) out.ramEos(meta.ramSectionId);
}

/** PAGE records for the chunk's data pages, from the cluster just read; returns how many. */
/** The data pages of one cluster, as one PART section written from the cluster's memory. */
function emitChunkPages(out: StreamEncoder, meta: SnapshotMeta, ch: DataChunk, cluster: Uint8Array, list: Int32Array): number {
  const b = meta.blocks[ch.block];
  const pages = pagesOf(b);
  const { sent, data } = meta.pages[ch.block];
  const firstPage = ch.chunk * PAGES_PER_CHUNK;
  const lastByte = Math.ceil(Math.min(firstPage + PAGES_PER_CHUNK, pages) / 8);
  let n = 0;
  for (let i = firstPage / 8; i < lastByte; i++) {
    let d = sent[i] & data[i] & validMask(i, pages);
    while (d !== 0) {
      const bit = 31 - Math.clz32(d & -d);
      d &= d - 1;
      list[n++] = i * 8 + bit;
    }
  }
  out.pagesSection(meta.ramSectionId, b.id, cluster, firstPage, list, n);
  return n;
}
