// The image side of a load, owned in one place: the image (opened and checked before anything is written), its
// file opened again for cluster reads, the I/O backend, and the cluster slots the reads land in (allocated once).
// close() releases all of it, whatever was opened. Precopy and postcopy decide which cluster goes in which slot and
// when; a cluster that arrives is checked here (whole, and its CRC-32C) before any of its pages may go out.
import { SnapPipeError } from '../errors.js';
import { CLUSTER_BYTES, type SnapshotMeta } from '../format/image/types.js';
import { checkImage, type DataChunk, type Plan } from '../image/checks.js';
import { openImageFile } from '../image/open.js';
import { ImageReader } from '../image/reader.js';
import { crc32c } from '../native/fastmem.js';
import { openIoBackend, reapNamed, type IoBackend, type IoBackendName, type IoCompletion } from '../native/io.js';
import { alignedShared } from '../native/memory.js';
import fs from 'node:fs';

export const DEFAULT_LOAD_QUEUE_DEPTH = 16;
export const LOAD_QUEUE_DEPTH_MAX = 256;

export interface ReadOptions {
  direct: boolean;
  io: IoBackendName | 'auto';
  /** Cluster reads the caller keeps in flight (capped at the clusters there are), and extra slots beyond them. */
  queueDepth: number;
  extraSlots: number;
  /** The backend's own depth: the reads in flight ('depth') or every slot ('slots'). */
  backendDepth: 'depth' | 'slots';
  onNote?: (line: string) => void;
}

export class LoadSource {
  private fd = -1;
  private backend: IoBackend | undefined;
  /** Cluster slots: slot s is bytes [s MiB, (s+1) MiB). */
  slots: Uint8Array = new Uint8Array(0);
  slotCount = 0;
  depth = 0;
  bytesRead = 0;
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

  get reads(): IoBackend {
    if (!this.backend) throw new Error('LoadSource: openReads() first');
    return this.backend;
  }

  /** Opens the file for cluster reads, allocates the slots, opens the I/O backend (its note goes to onNote). */
  openReads(o: ReadOptions): void {
    this.fd = openImageFile(this.path, { direct: o.direct });
    this.depth = Math.max(1, Math.min(o.queueDepth, this.plan.chunks.length));
    this.slotCount = this.depth + o.extraSlots;
    const bytes = this.slotCount * CLUSTER_BYTES;
    this.slots = new Uint8Array(alignedShared(bytes), 0, bytes);
    const opened = openIoBackend({ io: o.io, queueDepth: o.backendDepth === 'depth' ? this.depth : this.slotCount });
    this.backend = opened.backend;
    if (opened.note) o.onNote?.(opened.note);
  }

  /** Queues the read of plan chunk `ci`'s cluster into `slot` (tagged with the slot). */
  read(ci: number, slot: number): void {
    this.reads.read(this.fd, this.slots, slot * CLUSTER_BYTES, CLUSTER_BYTES, this.plan.chunks[ci].hostOffsetBytes, slot);
  }

  /** Submits what is queued and takes at least `min` completions (see IoBackend.reap). */
  reap(min = 1): IoCompletion[] {
    return reapNamed(this.reads, this.path, min);
  }

  slotView(slot: number): Uint8Array {
    return this.slots.subarray(slot * CLUSTER_BYTES, (slot + 1) * CLUSTER_BYTES);
  }

  /**
   * A read of chunk `ci` into `slot` completed with `bytes`: the whole cluster must be there and, with `verify`,
   * match its CRC-32C (`stoppedBefore` says what the stream stops short of when it does not). Returns the cluster.
   */
  arrived(ci: number, slot: number, bytes: number, verify: boolean, stoppedBefore: string): Uint8Array {
    const ch = this.plan.chunks[ci];
    if (bytes !== CLUSTER_BYTES) {
      throw new SnapPipeError('TRUNCATED', `${this.path}: the file ends inside the cluster at byte ${ch.hostOffsetBytes} (truncated image)`);
    }
    this.bytesRead += CLUSTER_BYTES;
    const cluster = this.slotView(slot);
    if (verify) {
      const t0 = performance.now();
      checkClusterCrc(this.path, this.meta, ch, cluster, stoppedBefore);
      this.verifyMs += performance.now() - t0;
    }
    return cluster;
  }

  close(): void {
    this.backend?.close();
    if (this.fd >= 0) fs.closeSync(this.fd);
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
