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
import { crc32cImplementation } from '../native/fastmem.js';
import { type SnapshotMeta } from '../format/image/types.js';
import { PAGE_BYTES, PAGES_PER_CHUNK } from '../format/units.js';
import type { IoBackendName } from '../native/io.js';
import { enlargePipe } from '../native/uring.js';
import { PART_HEAD_BYTES, PART_TAIL_BYTES, RECORD_HEAD_BYTES_MAX, type StreamEncoder } from '../format/stream/encoder.js';
import { pipeEncoder, type PipeSink } from './pipe.js';
import { dataPagesOf, forEachZeroPage } from './plan.js';
import { MultifdSender, ramSetupWithFlush, syncByMachineType, type SyncBy } from './multifd.js';
import { RAM_MULTIFD_FLUSH } from '../format/stream/constants.js';
import { LOAD_QUEUE_DEPTH_MAX, LoadSource } from './source.js';
import type { OpenTarget } from './connect.js';

/** Bound on ZERO records per PART section (9 bytes each with CONTINUE: ~300 KiB). */
const ZERO_RECORDS_PER_SECTION = 32768;
/** A zero section's most bytes: every record CONTINUE, but up to 256 of them naming a block. */
const ZERO_SECTION_BYTES_MAX = PART_HEAD_BYTES + ZERO_RECORDS_PER_SECTION * (8 + 1) + 256 * (RECORD_HEAD_BYTES_MAX - 8) + PART_TAIL_BYTES;
const CRC_STOPS_BEFORE = 'this chunk and the device state, so the destination fails the migration';

export interface LoadProgress {
  bytesOut: number;
  dataPagesOut: number;
  dataPagesTotal: number;
}

export interface LoadOptions {
  path: string;
  /** Where the stream goes (stdout under QEMU's exec:, or --connect's sockets), opened once the image is checked. */
  target: OpenTarget;
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
  /** ms from the start until the stream's target was open: the image checked, and with --connect QEMU connected. */
  openMs: number;
  /** From then to the end. */
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
  /** With multifd channels: how many, the sync records used, and what went on the channels. */
  multifd?: { channels: number; syncBy: SyncBy; syncs: number; packets: number; bytesOut: number; writeMs: number };
}

/** What the data phase counts. */
interface Sent {
  dataPagesOut: number;
  readMs: number;
}

/** A load over multifd channels: the channels' sender and the destination's sync records. */
interface Multifd {
  sender: MultifdSender;
  syncBy: SyncBy;
  syncs: number;
}

export async function runLoad(opts: LoadOptions): Promise<LoadReport> {
  const t0 = performance.now();
  assert(Number.isInteger(opts.queueDepth) && opts.queueDepth >= 1 && opts.queueDepth <= LOAD_QUEUE_DEPTH_MAX, 'runLoad: queueDepth');
  const source = LoadSource.check(opts.path, opts.direct);
  try {
    // One slot more than reads in flight: the cluster being sent keeps its slot while `depth` reads go on.
    source.openReads({ io: opts.io, queueDepth: opts.queueDepth, extraSlots: 1, backendDepth: 'depth', onNote: opts.onNote });
    // With --multifd-channels, `out` is the main channel, and the data pages go on the channels (load/multifd.ts).
    const { out: fd, multifdFds } = await opts.target();
    const tOpen = performance.now();
    // A 64 KiB pipe makes QEMU and us take turns in small pieces; grow it to the limit (postcopy takes a middle
    // size: requested pages must not queue behind much of the background stream).
    enlargePipe(fd);
    const sent: Sent = { dataPagesOut: 0, readMs: 0 };
    const { out, sink } = pipeEncoder(fd, () =>
      opts.onProgress?.({ bytesOut: sink.bytesOut, dataPagesOut: sent.dataPagesOut, dataPagesTotal: source.plan.dataPages }),
    );
    const mfd = multifdFds ? { sender: new MultifdSender(multifdFds, source.meta), syncBy: syncByMachineType(source.meta.machineType), syncs: 0 } : undefined;
    // Nothing has been written so far: every refusal above left `out` untouched.
    try {
      if (mfd) sendMultifdStream(source, out, opts.verify, sent, mfd);
      else sendStream(source, out, opts.verify, sent);
    } catch (err) {
      // Send the sections already complete (all verified) before failing: QEMU 7.2 only starts an exec: incoming
      // migration when the pipe becomes readable, and a pipe closed with nothing in it is never readable (HUP
      // only), so with no bytes at all QEMU would wait forever instead of failing the migration.
      out.flushAfterFailure();
      throw err;
    }
    const r = report(opts, tOpen - t0, (performance.now() - tOpen) / 1000, source, out, sink, sent);
    if (mfd) {
      const { sender } = mfd;
      r.multifd = { channels: multifdFds!.length, syncBy: mfd.syncBy, syncs: mfd.syncs, packets: sender.packets, bytesOut: sender.bytesOut, writeMs: sender.writeMs };
    }
    return r;
  } finally {
    source.close();
  }
}

/** The whole stream, in the order at the top of this file. */
function sendStream(source: LoadSource, out: StreamEncoder, verify: boolean, sent: Sent): void {
  const { meta } = source;
  out.verbatim(meta.head);
  out.verbatim(meta.ramSetup);
  sendZeroPages(out, meta);
  sendDataClusters(source, out, verify, sent);
  assert.equal(sent.dataPagesOut, source.plan.dataPages, 'every data page sent once');
  // After the RAM and before the device state, where QEMU sends them (migration.c migration_completion_precopy).
  out.verbatim(meta.switchoverCommands);
  out.verbatim(meta.deviceState);
  out.flush();
}

/**
 * The stream over multifd channels (load/multifd.ts): the main channel as sendStream writes it, less the data pages,
 * which go to the channels; a last sync point follows them. Each main-channel sync record goes out right after
 * the channels' SYNC packets, and the main channel is flushed there: a destination's channel thread reads nothing
 * after a SYNC until its main thread has reached the matching record (multifd.c multifd_recv_thread), so a record
 * left in our buffer while we write to a channel would stall both sides.
 */
function sendMultifdStream(source: LoadSource, out: StreamEncoder, verify: boolean, sent: Sent, mfd: Multifd): void {
  const { meta } = source;
  const syncPoint = () => {
    mfd.sender.sync();
    mfd.syncs++;
  };
  mfd.sender.open();
  out.verbatim(meta.head);
  syncPoint(); // ram START's: its MULTIFD_FLUSH, or its EOS
  if (mfd.syncBy === 'flush') ramSetupWithFlush(out, meta.ramSetup);
  else out.verbatim(meta.ramSetup);
  out.flush();
  sendZeroPages(out, meta, mfd.syncBy === 'eos' ? syncPoint : undefined);
  out.flush();
  sendDataClusters(source, out, verify, sent, mfd.sender);
  assert.equal(sent.dataPagesOut, source.plan.dataPages, 'every data page sent once');
  // One more PART, empty but for the sync point that closes the data pages (as sendStream, no ram END: the device
  // state follows the RAM sections).
  syncPoint();
  out.ramPart(meta.ramSectionId, 'name-first');
  if (mfd.syncBy === 'flush') out.be64(RAM_MULTIFD_FLUSH);
  out.ramEos(meta.ramSectionId);
  out.verbatim(meta.switchoverCommands);
  out.verbatim(meta.deviceState);
  out.flush();
}

/**
 * ZERO records for every page whose last version was zero, in block order, in PART sections of bounded size.
 * `syncPoint`: each section's EOS is a multifd sync point (called before the section; the section is flushed).
 */
function sendZeroPages(out: StreamEncoder, meta: SnapshotMeta, syncPoint?: () => void): void {
  const id = meta.ramSectionId;
  let inSection = 0;
  const end = () => {
    out.ramEos(id);
    if (syncPoint) out.flush();
  };
  forEachZeroPage(meta, (block, page) => {
    if (inSection === 0) {
      syncPoint?.();
      out.room(ZERO_SECTION_BYTES_MAX).ramPart(id, 'name-first');
    }
    out.zero(meta.blocks[block].id, page * PAGE_BYTES);
    if (++inSection === ZERO_RECORDS_PER_SECTION) {
      end();
      inSection = 0;
    }
  });
  if (inSection > 0) end();
}

/**
 * Every data cluster in plan order, checked, its data pages as one PART section written from the cluster's memory,
 * or with `channels` as multifd packets on them.
 */
function sendDataClusters(source: LoadSource, out: StreamEncoder, verify: boolean, sent: Sent, channels?: MultifdSender): void {
  const { meta, plan } = source;
  const reads = new InOrderReads(source);
  const pageList = new Int32Array(PAGES_PER_CHUNK);
  for (let next = 0; next < plan.chunks.length; next++) {
    const t1 = performance.now();
    const slot = reads.take(next);
    sent.readMs += performance.now() - t1;
    const cluster = source.arrived(next, slot, verify, CRC_STOPS_BEFORE);
    const ch = plan.chunks[next];
    const n = dataPagesOf(meta, ch, pageList);
    if (channels) channels.pages(ch.block, cluster, ch.chunk * PAGES_PER_CHUNK, pageList, n);
    else out.pagesSection(meta.ramSectionId, meta.blocks[ch.block].id, cluster, ch.chunk * PAGES_PER_CHUNK, pageList, n);
    sent.dataPagesOut += n;
  }
}

/**
 * Cluster reads consumed in submission order: plan chunk i goes to slot i % slotCount, and up to `depth` reads are in
 * flight while the cluster being sent keeps its slot.
 */
class InOrderReads {
  private submitted = 0;
  private readonly done: Uint8Array;

  constructor(private readonly source: LoadSource) {
    this.done = new Uint8Array(source.slotCount);
  }

  /** Queues reads up to the depth, then waits for chunk `next`'s; returns its slot. */
  take(next: number): number {
    const { source } = this;
    const { slotCount, depth } = source;
    const chunks = source.plan.chunks.length;
    let queued = 0;
    while (this.submitted < chunks && this.submitted - next < slotCount && source.inFlight < depth) {
      source.read(this.submitted, this.submitted % slotCount);
      this.submitted++;
      queued++;
    }
    // Hand new reads to the kernel now, not at the next wait: when the cluster we want is already here, no wait
    // comes for a while and the disk would run with fewer reads than `depth`.
    if (queued > 0) this.harvest(0);
    const slot = next % slotCount;
    // Bounded: each reap returns at least one of the reads in flight, and the one we want is among them.
    while (this.done[slot] === 0) {
      assert(source.inFlight > 0, 'waiting for a read that was never queued');
      this.harvest(1);
    }
    this.done[slot] = 0;
    return slot;
  }

  private harvest(min: number): void {
    for (const slot of this.source.reap(min)) this.done[slot] = 1;
  }
}

function report(opts: LoadOptions, openMs: number, seconds: number, source: LoadSource, out: StreamEncoder, sink: PipeSink, sent: Sent): LoadReport {
  const { meta, plan } = source;
  return {
    path: opts.path,
    openMs,
    seconds,
    bytesOut: sink.bytesOut,
    outMBps: sink.bytesOut / 1e6 / seconds,
    dataPages: plan.dataPages,
    zeroPages: plan.zeroPages,
    unsentPages: plan.unsentPages,
    dataClusters: plan.chunks.length,
    bytesRead: source.bytesRead,
    readMs: sent.readMs,
    verifyMs: source.verifyMs,
    writeMs: sink.writeMs,
    writeCalls: sink.writeCalls,
    ramSections: out.sections,
    deviceStateBytes: meta.deviceState.length,
    blocks: meta.blocks.length,
    direct: opts.direct,
    verified: opts.verify,
    queueDepth: source.depth,
    readBackend: source.readBackend,
    checksum: crc32cImplementation,
  };
}
