// `snap-pipe verify IMG`: reads the whole image and checks it the way load would use it, without sending anything.
//   structure: everything ImageReader.open checks (the QCOW2 header, features and extensions, every L1, L2 and
//     refcount table entry, each cluster used once, every refcount exactly what its use calls for, the metadata and
//     where it puts the blocks), everything load checks before its first byte (image/checks.ts: the stream parts,
//     a cluster for every chunk with data pages), then the layout snap-pipe writes: data clusters at host clusters
//     1..D, metadata, L2 and L1 tables and refcounts where the writer puts them, the file ending after the refcount
//     table. So an image verify passes is one load sends whole, and one qemu-img check finds clean;
//   content: every data cluster read (O_DIRECT through the I/O backend, queueDepth reads in flight) and its CRC-32C
//     compared with the one recorded at save. CRCs run on this thread (threads 0) or in a piscina pool of `threads`
//     threads, reading the clusters from the shared read slots in place.
// A structural fault throws at once (one line). Checksum mismatches are all counted (the first BAD_LIST_MAX kept)
// and returned in the report: the caller decides (the CLI prints the summary, then fails).

import assert from 'node:assert/strict';
import { crc32c } from '../native/fastmem.js';
import { Piscina } from 'piscina';
import { SnapPipeError } from '../errors.js';
import { summarizeBlocks } from '../image/info.js';
import { chunksOf } from '../format/image/metadata.js';
import {
  ENTRIES_PER_TABLE_CLUSTER,
  HEADER_AREA_BYTES,
  OFFSET_MASK,
  decodeHeader,
  layoutTail,
  readEntry,
  type Qcow2Header,
  type TailLayout,
} from '../format/image/qcow2.js';
import type { ClusterReader } from '../image/clusters.js';
import { ImageReader } from '../image/reader.js';
import { type SnapshotMeta } from '../format/image/types.js';
import { CLUSTER_BYTES } from '../format/units.js';
import type { IoBackendName } from '../native/io.js';
import { alignedShared } from '../native/memory.js';
import type { CrcTask } from './crc-task.js';
import { checkImage } from '../image/checks.js';

export const DEFAULT_VERIFY_QUEUE_DEPTH = 8;
export const VERIFY_QUEUE_DEPTH_MAX = 256;
export const VERIFY_THREADS_MAX = 64;
/** Mismatches listed in the report (all are counted). */
const BAD_LIST_MAX = 100;
/** Bound on waiting for the CRC pool to end. */
const POOL_DESTROY_MS_MAX = 10_000;

export interface VerifyOptions {
  path: string;
  direct: boolean;
  io: IoBackendName | 'auto';
  queueDepth: number;
  /** 0: CRCs on this thread; N: a piscina pool of N threads. */
  threads: number;
  onNote?: (line: string) => void;
}

export interface ChunkMismatch {
  block: string;
  chunk: number;
  /** Offset of the chunk in its RAM block. */
  blockOffsetBytes: number;
  hostOffsetBytes: number;
  /** The cluster's CRC-32C as recorded at save, and as read now (the names are the JSON report's keys). */
  storedCrc32: number;
  readCrc32: number;
}

export interface VerifyReport {
  path: string;
  /** Structure and every checksum good. */
  sound: boolean;
  seconds: number;
  fileBytes: number;
  blocks: number;
  dataPages: number;
  zeroPages: number;
  unsentPages: number;
  deviceStateBytes: number;
  metadataBytes: number;
  /** Data clusters read and checked. */
  dataClusters: number;
  bytesRead: number;
  readMBps: number;
  badClusters: number;
  /** The first BAD_LIST_MAX mismatches, in file order. */
  mismatches: ChunkMismatch[];
  threads: number;
  io: IoBackendName;
  direct: boolean;
  queueDepth: number;
  /** Time this thread spent waiting for reads, computing CRCs (threads 0) and waiting for the pool. */
  readWaitMs: number;
  crcMs: number;
  crcWaitMs: number;
}

interface ClusterCheck {
  hostOffsetBytes: number;
  block: number;
  chunk: number;
}

function damaged(path: string, what: string): SnapPipeError {
  return new SnapPipeError('BAD_IMAGE', `${path}: ${what}`);
}

/** The clusters to check, in file order, after checking that data clusters sit at host clusters 1..D, once each. */
function planChecks(path: string, reader: ImageReader): ClusterCheck[] {
  const meta = reader.meta;
  assert(meta, 'a complete image has metadata');
  const checks: ClusterCheck[] = [];
  meta.blocks.forEach((b, bi) => {
    const chunks = chunksOf(b);
    if (meta.chunkCrc32c[bi].length < chunks) throw damaged(path, `metadata damaged: chunk CRCs of ${b.id}`);
    for (let c = 0; c < chunks; c++) {
      const host = reader.hostOffsetOf(b.virtOffsetBytes / CLUSTER_BYTES + c);
      if (host !== undefined) checks.push({ hostOffsetBytes: host, block: bi, chunk: c });
    }
  });
  if (checks.length !== reader.dataClusters) {
    throw damaged(path, `${reader.dataClusters - checks.length} mapped data clusters belong to no RAM block`);
  }
  if (meta.counters.dataClusters !== checks.length) {
    throw damaged(path, `metadata says ${meta.counters.dataClusters} data clusters, the L2 tables map ${checks.length}`);
  }
  checks.sort((x, y) => x.hostOffsetBytes - y.hostOffsetBytes);
  for (let i = 1; i < checks.length; i++) {
    if (checks[i].hostOffsetBytes === checks[i - 1].hostOffsetBytes) {
      throw damaged(path, `two RAM chunks map to the cluster at byte ${checks[i].hostOffsetBytes} (a damaged L2 table)`);
    }
  }
  checks.forEach((ch, i) => {
    if (ch.hostOffsetBytes !== (1 + i) * CLUSTER_BYTES) {
      throw damaged(path, `data cluster at byte ${ch.hostOffsetBytes} where snap-pipe puts cluster ${1 + i} (a damaged L2 table)`);
    }
  });
  return checks;
}

/** Header, L1 table and refcount table against the layout snap-pipe's writer produces for these data clusters. */
function checkLayout(path: string, reader: ImageReader, checks: ClusterCheck[]): TailLayout {
  const C = CLUSTER_BYTES;
  // Aligned: the image may be open with O_DIRECT.
  const buf = new Uint8Array(alignedShared(C), 0, C);
  reader.readExact(buf, HEADER_AREA_BYTES, 0, 'header');
  const decoded = decodeHeader(buf.subarray(0, HEADER_AREA_BYTES));
  assert(decoded.kind === 'ok' && decoded.snap, 'ImageReader accepted the header');
  const h: Qcow2Header = decoded.header;
  const usedL1 = new Set<number>();
  for (const ch of checks) {
    const virt = reader.meta!.blocks[ch.block].virtOffsetBytes / C + ch.chunk;
    usedL1.add(Math.floor(virt / ENTRIES_PER_TABLE_CLUSTER));
  }
  const layout = layoutTail({
    dataClusters: checks.length,
    metaVirtOffsetBytes: reader.metaVirtOffsetBytes,
    metaBytes: reader.metaBytes,
    isL1IndexUsedByData: (i) => usedL1.has(i),
  });
  const expect = (what: string, got: number, want: number) => {
    if (got !== want) throw damaged(path, `${what} is ${got}, snap-pipe's layout for this image has ${want} (damaged header)`);
  };
  expect('virtual size', h.virtualBytes, layout.virtualBytes);
  expect('L1 entries', h.l1Entries, layout.l1Entries);
  expect('L1 table offset', h.l1OffsetBytes, layout.l1FirstCluster * C);
  expect('refcount table offset', h.refcountTableOffsetBytes, layout.refcountTableFirstCluster * C);
  expect('refcount table clusters', h.refcountTableClusters, layout.refcountTableClusters);
  if (reader.fileBytes !== layout.totalClusters * C) {
    throw damaged(path, `the file is ${reader.fileBytes} bytes, its tables account for ${layout.totalClusters * C} (trailing or missing data)`);
  }
  const metaVirt = reader.metaVirtOffsetBytes / C;
  for (let i = 0; i < layout.metaClusters; i++) {
    if (reader.hostOffsetOf(metaVirt + i) !== (layout.metaFirstCluster + i) * C) {
      throw damaged(path, `metadata cluster ${i} is not mapped where snap-pipe wrote it (a damaged L2 table)`);
    }
  }

  // Where the writer puts the tables. Their entries' flags, reserved bits and every refcount were checked when the
  // image was opened (ImageReader): what is left is that they sit where snap-pipe's layout has them.
  const l2At = new Map<number, number>();
  layout.l2ForL1Index.forEach((l1Index, k) => l2At.set(l1Index, (layout.l2FirstCluster + k) * C));
  reader.readExact(buf, HEADER_AREA_BYTES, layout.l1FirstCluster * C, 'L1 table');
  for (let i = 0; i < layout.l1Entries; i++) {
    const entry = readEntry(buf, i);
    const want = l2At.get(i) ?? 0;
    if (Number(entry & OFFSET_MASK) !== want) {
      throw damaged(path, `L1 entry ${i} is 0x${entry.toString(16)}, where snap-pipe's layout has ${want === 0 ? 'no L2 table' : `its L2 table at byte ${want}`} (damaged L1 table)`);
    }
  }
  reader.readExact(buf, C, layout.refcountTableFirstCluster * C, 'refcount table');
  for (let b = 0; b < layout.refcountBlocks; b++) {
    const entry = readEntry(buf, b);
    const want = (layout.refcountBlockFirstCluster + b) * C;
    if (entry !== BigInt(want)) {
      throw damaged(path, `refcount table entry ${b} is 0x${entry.toString(16)}, where snap-pipe's layout has its refcount block at byte ${want} (damaged refcount table)`);
    }
  }
  return layout;
}

/** CRC-32C of clusters, on this thread or in a piscina pool; results come back through `onDone`. */
interface CrcEngine {
  readonly threads: number;
  start(slot: number, offsetBytes: number): void;
  /** Waits until at least one started CRC has finished (resolves at once if one has). */
  waitOne(): Promise<void>;
  readonly pending: number;
  close(): Promise<void>;
}

class InlineCrc implements CrcEngine {
  readonly threads = 0;
  readonly pending = 0;
  ms = 0;
  constructor(
    private readonly mem: Uint8Array,
    private readonly onDone: (slot: number, crc: number) => void,
  ) {}
  start(slot: number, offsetBytes: number): void {
    const t0 = performance.now();
    const crc = crc32c(this.mem.subarray(offsetBytes, offsetBytes + CLUSTER_BYTES)) >>> 0;
    this.ms += performance.now() - t0;
    this.onDone(slot, crc);
  }
  async waitOne(): Promise<void> {}
  async close(): Promise<void> {}
}

class PoolCrc implements CrcEngine {
  private readonly pool: Piscina<CrcTask, number>;
  private inFlight = 0;
  private finished: { slot: number; crc: number }[] = [];
  private failure: unknown;
  private wake: (() => void) | undefined;
  waitMs = 0;

  constructor(
    readonly threads: number,
    private readonly mem: SharedArrayBuffer,
    private readonly onDone: (slot: number, crc: number) => void,
  ) {
    this.pool = new Piscina<CrcTask, number>({
      filename: new URL('./crc-task.js', import.meta.url).href,
      name: 'default',
      minThreads: threads,
      maxThreads: threads,
      idleTimeout: 60_000,
    });
  }

  get pending(): number {
    return this.inFlight;
  }

  start(slot: number, offsetBytes: number): void {
    this.inFlight++;
    this.pool.run({ mem: this.mem, offsetBytes, lengthBytes: CLUSTER_BYTES }).then(
      (crc) => {
        this.finished.push({ slot, crc });
        this.wake?.();
      },
      (err: unknown) => {
        this.failure ??= err;
        this.wake?.();
      },
    );
  }

  async waitOne(): Promise<void> {
    const t0 = performance.now();
    // Bounded: every started task settles (a crashed pool thread rejects its task).
    while (this.finished.length === 0 && this.failure === undefined) {
      assert(this.inFlight > 0, 'waiting for a CRC that was never started');
      await new Promise<void>((resolve) => (this.wake = resolve));
      this.wake = undefined;
    }
    this.waitMs += performance.now() - t0;
    if (this.failure !== undefined) {
      const e = this.failure as Error;
      throw new SnapPipeError('WORKER', `verify CRC thread failed: ${e?.message ?? String(e)}`);
    }
    const done = this.finished;
    this.finished = [];
    for (const d of done) {
      this.inFlight--;
      this.onDone(d.slot, d.crc);
    }
  }

  async close(): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    const deadline = new Promise<void>((resolve) => (timer = setTimeout(resolve, POOL_DESTROY_MS_MAX)));
    try {
      await Promise.race([this.pool.destroy(), deadline]);
    } finally {
      clearTimeout(timer);
    }
  }
}

/**
 * Reads the clusters to check, up to the backend's queue depth at a time into the read slots, has the engine compute
 * each one's CRC-32C and compares it with the one recorded at save. Mismatches are all counted, the first
 * BAD_LIST_MAX kept. Owns none of what it is given: the caller opens and closes the image, its reads and the engine.
 */
class ClusterChecks {
  readonly mismatches: ChunkMismatch[] = [];
  badClusters = 0;
  /** Time waiting for reads. */
  readWaitMs = 0;
  private checked = 0;
  private submitted = 0;
  /** The check each read slot holds (-1: none), and the free slots. */
  private readonly slotCheck: Int32Array;
  private readonly free: number[] = [];

  constructor(
    private readonly clusters: ClusterReader,
    private readonly meta: SnapshotMeta,
    private readonly checks: ClusterCheck[],
  ) {
    const depth = clusters.slotCount;
    this.slotCheck = new Int32Array(depth).fill(-1);
    for (let s = depth - 1; s >= 0; s--) this.free.push(s);
  }

  /** The CRC engine's onDone: compares a slot's CRC with the recorded one and frees the slot. */
  readonly crcDone = (slot: number, crc: number): void => {
    const ch = this.checks[this.slotCheck[slot]];
    const want = this.meta.chunkCrc32c[ch.block][ch.chunk] >>> 0;
    if (crc !== want) this.mismatch(ch, want, crc);
    this.slotCheck[slot] = -1;
    this.free.push(slot);
    this.checked++;
  };

  async run(engine: CrcEngine): Promise<void> {
    const total = this.checks.length;
    // Bounded: every round completes at least one read or one CRC, and there are `total` of each.
    while (this.checked < total) {
      this.submitReads();
      if (this.clusters.inFlight > 0) {
        // With CRCs running elsewhere, only collect what is ready; otherwise wait for one read.
        const taken = this.takeReads(engine, engine.pending > 0 ? 0 : 1);
        if (taken > 0 && this.free.length > 0 && this.submitted < total) continue;
      }
      if (engine.pending > 0) await engine.waitOne();
    }
  }

  /** Mismatches in file order. */
  sortedMismatches(): ChunkMismatch[] {
    return this.mismatches.sort((x, y) => x.hostOffsetBytes - y.hostOffsetBytes);
  }

  private submitReads(): void {
    while (this.submitted < this.checks.length && this.free.length > 0) {
      const slot = this.free.pop() as number;
      this.slotCheck[slot] = this.submitted;
      this.clusters.read(this.checks[this.submitted].hostOffsetBytes, slot);
      this.submitted++;
    }
  }

  /** Waits for at least `min` reads, and starts the CRC of each one completed; returns how many completed. */
  private takeReads(engine: CrcEngine, min: number): number {
    const t1 = performance.now();
    const slots = this.clusters.reap(min);
    this.readWaitMs += performance.now() - t1;
    for (const slot of slots) engine.start(slot, slot * CLUSTER_BYTES);
    return slots.length;
  }

  private mismatch(ch: ClusterCheck, want: number, crc: number): void {
    this.badClusters++;
    if (this.mismatches.length >= BAD_LIST_MAX) return;
    this.mismatches.push({
      block: this.meta.blocks[ch.block].id,
      chunk: ch.chunk,
      blockOffsetBytes: ch.chunk * CLUSTER_BYTES,
      hostOffsetBytes: ch.hostOffsetBytes,
      storedCrc32: want,
      readCrc32: crc,
    });
  }
}

export async function runVerify(opts: VerifyOptions): Promise<VerifyReport> {
  const t0 = performance.now();
  const { path } = opts;
  assert(Number.isInteger(opts.queueDepth) && opts.queueDepth >= 1 && opts.queueDepth <= VERIFY_QUEUE_DEPTH_MAX, 'runVerify: queueDepth');
  assert(Number.isInteger(opts.threads) && opts.threads >= 0 && opts.threads <= VERIFY_THREADS_MAX, 'runVerify: threads');
  const reader = ImageReader.open(path, { direct: opts.direct });
  let clusters: ClusterReader | undefined;
  let engine: CrcEngine | undefined;
  try {
    // What load checks before it sends anything, so that an image verify passes is one load accepts.
    const { meta } = checkImage(reader);
    const checks = planChecks(path, reader);
    checkLayout(path, reader, checks);

    const depth = Math.max(1, Math.min(opts.queueDepth, checks.length));
    clusters = reader.clusterReader({ io: opts.io, slots: depth, inFlightMax: depth, onNote: opts.onNote });
    const content = new ClusterChecks(clusters, meta, checks);
    engine = opts.threads === 0 ? new InlineCrc(clusters.slots, content.crcDone) : new PoolCrc(opts.threads, clusters.memory, content.crcDone);
    await content.run(engine);
    const seconds = (performance.now() - t0) / 1000;
    return {
      path,
      sound: content.badClusters === 0,
      seconds,
      fileBytes: reader.fileBytes,
      ...pageCounts(meta),
      metadataBytes: reader.metaBytes,
      dataClusters: checks.length,
      bytesRead: checks.length * CLUSTER_BYTES,
      readMBps: (checks.length * CLUSTER_BYTES) / 1e6 / seconds,
      badClusters: content.badClusters,
      mismatches: content.sortedMismatches(),
      threads: engine.threads,
      io: clusters.backendName,
      direct: opts.direct,
      queueDepth: depth,
      readWaitMs: content.readWaitMs,
      crcMs: engine instanceof InlineCrc ? engine.ms : 0,
      crcWaitMs: engine instanceof PoolCrc ? engine.waitMs : 0,
    };
  } finally {
    await engine?.close();
    clusters?.close();
    reader.close();
  }
}

/** The report's block and page figures, from the metadata. */
function pageCounts(meta: SnapshotMeta): Pick<VerifyReport, 'blocks' | 'dataPages' | 'zeroPages' | 'unsentPages' | 'deviceStateBytes'> {
  const summary = summarizeBlocks(meta);
  const sum = (f: (b: (typeof summary)[number]) => number) => summary.reduce((a, b) => a + f(b), 0);
  return {
    blocks: meta.blocks.length,
    dataPages: sum((b) => b.dataPages),
    zeroPages: sum((b) => b.zeroPages),
    unsentPages: sum((b) => b.unsentPages),
    deviceStateBytes: meta.deviceState.length,
  };
}
