// The image side of a load, owned in one place: the image (opened and checked before anything is written) and the
// reads of its data clusters into slots allocated once (image/clusters.ts). close() releases all of it, whatever
// was opened. Precopy and postcopy decide which cluster goes in which slot and when; a cluster that arrives is
// checked here (its CRC-32C) before any of its pages may go out.
import { SnapPipeError } from '../errors.js';
import { type SnapshotMeta } from '../format/image/types.js';
import { CLUSTER_BYTES } from '../format/units.js';
import { checkImage, type DataChunk, type Plan } from '../image/checks.js';
import type { ClusterReader } from '../image/clusters.js';
import { ImageReader } from '../image/reader.js';
import { crc32c } from '../native/fastmem.js';
import type { IoBackendName } from '../native/io.js';

export const DEFAULT_LOAD_QUEUE_DEPTH = 16;
export const LOAD_QUEUE_DEPTH_MAX = 256;

export interface ReadOptions {
  io: IoBackendName | 'auto';
  /** Cluster reads the caller keeps in flight (capped at the clusters there are), and extra slots beyond them. */
  queueDepth: number;
  extraSlots: number;
  /** The backend's own depth: the reads in flight ('depth') or every slot ('slots'). */
  backendDepth: 'depth' | 'slots';
  onNote?: (line: string) => void;
}

export class LoadSource {
  private clusters: ClusterReader | undefined;
  /** Slots and reads in flight the caller keeps (set by openReads). */
  slotCount = 0;
  depth = 0;
  verifyMs = 0;

  private constructor(
    private readonly reader: ImageReader,
    readonly meta: SnapshotMeta,
    readonly plan: Plan,
  ) {}

  /** Opens and checks the image; nothing else is opened yet (a refusal leaves the output untouched). */
  static check(path: string, direct: boolean): LoadSource {
    const reader = ImageReader.open(path, { direct });
    try {
      const { meta, plan } = checkImage(reader);
      return new LoadSource(reader, meta, plan);
    } catch (err) {
      reader.close();
      throw err;
    }
  }

  get path(): string {
    return this.reader.path;
  }

  private get reads(): ClusterReader {
    if (!this.clusters) throw new Error('LoadSource: openReads() first');
    return this.clusters;
  }

  /** Reads in flight, and the I/O backend's name (for the report). */
  get inFlight(): number {
    return this.reads.inFlight;
  }

  get readBackend(): IoBackendName {
    return this.reads.backendName;
  }

  get bytesRead(): number {
    return this.clusters?.bytesRead ?? 0;
  }

  /** Allocates the cluster slots and opens the I/O backend (its note goes to onNote). */
  openReads(o: ReadOptions): void {
    this.depth = Math.max(1, Math.min(o.queueDepth, this.plan.chunks.length));
    this.slotCount = this.depth + o.extraSlots;
    const inFlightMax = o.backendDepth === 'depth' ? this.depth : this.slotCount;
    this.clusters = this.reader.clusterReader({ io: o.io, slots: this.slotCount, inFlightMax, onNote: o.onNote });
  }

  /** Queues the read of plan chunk `ci`'s cluster into `slot`. */
  read(ci: number, slot: number): void {
    this.reads.read(this.plan.chunks[ci].hostOffsetBytes, slot);
  }

  /** Submits what is queued and waits for at least `min` reads; returns the slots whose cluster arrived whole. */
  reap(min = 1): readonly number[] {
    return this.reads.reap(min);
  }

  slotView(slot: number): Uint8Array {
    return this.reads.slotView(slot);
  }

  /**
   * The cluster of chunk `ci`, arrived in `slot`: with `verify`, it must match its CRC-32C (`stoppedBefore` says what
   * the stream stops short of when it does not). Returns the cluster.
   */
  arrived(ci: number, slot: number, verify: boolean, stoppedBefore: string): Uint8Array {
    const cluster = this.slotView(slot);
    if (verify) {
      const t0 = performance.now();
      checkClusterCrc(this.path, this.meta, this.plan.chunks[ci], cluster, stoppedBefore);
      this.verifyMs += performance.now() - t0;
    }
    return cluster;
  }

  close(): void {
    this.clusters?.close();
    this.reader.close();
  }
}

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
