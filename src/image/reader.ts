// Opens a snap-pipe QCOW2 image: validates the header, the snap-pipe extension and every offset read from the file,
// loads the L1/L2 mapping into one typed array, and decodes the metadata (CRC-checked twice: whole and per section).

import assert from 'node:assert/strict';
import fs from 'node:fs';
import { crc32 } from 'node:zlib';
import { SnapPipeError, ioError } from '../errors.js';
import { alignedShared } from '../ring/memory.js';
import { decodeMeta } from './metadata.js';
import { openImageFile } from './open.js';
import {
  ENTRIES_PER_TABLE_CLUSTER,
  HEADER_AREA_BYTES,
  OFFSET_MASK,
  QCOW2_VERSION,
  QCOW_OFLAG_COMPRESSED,
  QCOW_OFLAG_ZERO,
  REFCOUNT_ORDER,
  SNAP_FLAG_COMPLETE,
  TABLE_ENTRY_BYTES,
  decodeHeader,
  readEntry,
  type Qcow2Header,
  type SnapExtension,
} from './qcow2.js';
import { CLUSTER_BITS, CLUSTER_BYTES, FORMAT_VERSION, type SnapshotMeta } from './types.js';

const VIRT_CLUSTER_MAX = 0x7fff_ffff;
/** Metadata is small (bitmaps, CRCs, device state); refuse absurd lengths before allocating. */
const META_BYTES_MAX = 2 ** 31;

/** Why an image is incomplete, for one line: the failure its save recorded, or that it never finished. */
export function incompleteWhy(failure: string | undefined): string {
  return failure === undefined
    ? 'the save that wrote this image never finished (it was stopped, or is still running)'
    : `the save that wrote this image failed: ${failure}`;
}

export class ImageReader {
  readonly path: string;
  readonly direct: boolean;
  readonly complete: boolean;
  /** Why the save that wrote an incomplete image failed, when it could say (printable; see qcow2.ts). */
  readonly failure: string | undefined;
  readonly meta: SnapshotMeta | undefined;
  readonly fileBytes: number;
  readonly formatVersion: number;
  /** 0 for an incomplete image. */
  readonly virtualBytes: number;
  readonly metaVirtOffsetBytes: number;
  readonly metaBytes: number;
  /** Mapped clusters below the metadata region (RAM data clusters). */
  readonly dataClusters: number;
  private fd: number;
  private readonly scratch: Uint8Array;
  /** Host cluster index per virtual cluster; 0 = unallocated. */
  private readonly hostClusterOfVirt: Int32Array;

  private constructor(p: {
    path: string;
    fd: number;
    direct: boolean;
    fileBytes: number;
    scratch: Uint8Array;
    header: Qcow2Header;
    snap: SnapExtension;
    failure: string | undefined;
    allowIncomplete: boolean;
  }) {
    this.path = p.path;
    this.fd = p.fd;
    this.direct = p.direct;
    this.fileBytes = p.fileBytes;
    this.scratch = p.scratch;
    this.formatVersion = p.snap.formatVersion;
    this.complete = (p.snap.flags & SNAP_FLAG_COMPLETE) !== 0;
    this.failure = this.complete ? undefined : p.failure;
    if (!this.complete) {
      if (!p.allowIncomplete) {
        throw new SnapPipeError('INCOMPLETE', `${p.path}: ${incompleteWhy(this.failure)}`);
      }
      this.virtualBytes = 0;
      this.metaVirtOffsetBytes = 0;
      this.metaBytes = 0;
      this.dataClusters = 0;
      this.hostClusterOfVirt = new Int32Array(0);
      this.meta = undefined;
      return;
    }
    const h = p.header;
    this.checkLayout(h, p.snap);
    this.virtualBytes = h.virtualBytes;
    this.metaVirtOffsetBytes = p.snap.metaVirtOffsetBytes;
    this.metaBytes = p.snap.metaBytes;
    this.hostClusterOfVirt = new Int32Array(h.virtualBytes / CLUSTER_BYTES);
    this.loadMapping(h);
    const metaVirtCluster = this.metaVirtOffsetBytes / CLUSTER_BYTES;
    let data = 0;
    for (let v = 0; v < metaVirtCluster; v++) if (this.hostClusterOfVirt[v] !== 0) data++;
    this.dataClusters = data;
    this.meta = this.loadMeta(p.snap);
  }

  static open(path: string, opts: { direct?: boolean; allowIncomplete?: boolean } = {}): ImageReader {
    const direct = opts.direct ?? false;
    const fd = openImageFile(path, { direct });
    try {
      let fileBytes: number;
      try {
        fileBytes = fs.fstatSync(fd).size;
      } catch (err) {
        throw ioError(`stat ${path}`, err);
      }
      const scratch = new Uint8Array(alignedShared(CLUSTER_BYTES), 0, CLUSTER_BYTES);
      const got = readAt(path, fd, scratch, HEADER_AREA_BYTES, 0, direct);
      const decoded = decodeHeader(scratch.subarray(0, got));
      if (decoded.kind === 'not-qcow2') throw new SnapPipeError('BAD_IMAGE', `${path}: not a QCOW2 image`);
      if (decoded.kind === 'short') throw new SnapPipeError('TRUNCATED', `${path}: the file ends inside the QCOW2 header`);
      const snap = decoded.snap;
      if (snap === undefined) throw new SnapPipeError('BAD_IMAGE', `${path}: QCOW2 but not a snap-pipe image`);
      if (snap.formatVersion === 1) {
        throw new SnapPipeError(
          'BAD_IMAGE',
          `${path}: written by an older snap-pipe (format version 1, CRC-32 cluster checksums); this snap-pipe reads version ${FORMAT_VERSION}`,
        );
      }
      if (snap.formatVersion !== FORMAT_VERSION) {
        throw new SnapPipeError(
          'BAD_IMAGE',
          `${path}: snap-pipe format version ${snap.formatVersion} is unknown (this snap-pipe reads version ${FORMAT_VERSION})`,
        );
      }
      return new ImageReader({
        path,
        fd,
        direct,
        fileBytes,
        scratch,
        header: decoded.header,
        snap,
        failure: decoded.failure,
        allowIncomplete: opts.allowIncomplete ?? false,
      });
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
  }

  hostOffsetOf(virtCluster: number): number | undefined {
    if (!Number.isInteger(virtCluster) || virtCluster < 0 || virtCluster >= this.hostClusterOfVirt.length) {
      return undefined;
    }
    const host = this.hostClusterOfVirt[virtCluster];
    return host === 0 ? undefined : host * CLUSTER_BYTES;
  }

  /** Reads one whole cluster (virtual index) into `dst` (1 MiB; page aligned when direct); unallocated reads as zeros. */
  readCluster(virtCluster: number, dst: Uint8Array): void {
    assert(this.fd >= 0, 'readCluster after close');
    assert(dst.byteLength >= CLUSTER_BYTES, 'readCluster: dst smaller than a cluster');
    assert(
      Number.isInteger(virtCluster) && virtCluster >= 0 && virtCluster < this.hostClusterOfVirt.length,
      `readCluster: virtual cluster ${virtCluster} outside the image`,
    );
    const host = this.hostClusterOfVirt[virtCluster];
    if (host === 0) {
      dst.fill(0, 0, CLUSTER_BYTES);
      return;
    }
    const got = readAt(this.path, this.fd, dst, CLUSTER_BYTES, host * CLUSTER_BYTES, this.direct);
    if (got !== CLUSTER_BYTES) throw truncated(this.path, `cluster at byte ${host * CLUSTER_BYTES}`);
  }

  close(): void {
    if (this.fd < 0) return;
    const fd = this.fd;
    this.fd = -1;
    try {
      fs.closeSync(fd);
    } catch (err) {
      throw ioError(`close ${this.path}`, err);
    }
  }

  private bad(what: string): SnapPipeError {
    return new SnapPipeError('BAD_IMAGE', `${this.path}: ${what}`);
  }

  /** Every field and offset the reader will use, checked before use. */
  private checkLayout(h: Qcow2Header, snap: SnapExtension): void {
    const C = CLUSTER_BYTES;
    if (h.version !== QCOW2_VERSION || h.clusterBits !== CLUSTER_BITS || h.refcountOrder !== REFCOUNT_ORDER) {
      throw this.bad(
        `unsupported QCOW2 layout (version ${h.version}, cluster_bits ${h.clusterBits}, refcount_order ${h.refcountOrder})`,
      );
    }
    if (h.cryptMethod !== 0 || h.backingFileOffsetBytes !== 0 || h.snapshotCount !== 0) {
      throw this.bad('QCOW2 image uses encryption, a backing file or internal snapshots');
    }
    if (h.incompatibleFeatures !== 0n) throw this.bad(`QCOW2 incompatible features 0x${h.incompatibleFeatures.toString(16)}`);
    if (h.virtualBytes % C !== 0 || h.virtualBytes / C > VIRT_CLUSTER_MAX) {
      throw this.bad(`virtual size ${h.virtualBytes} is not whole clusters`);
    }
    if (h.l1OffsetBytes === 0 || h.l1OffsetBytes % C !== 0) throw this.bad(`L1 table offset ${h.l1OffsetBytes}`);
    if (h.refcountTableOffsetBytes === 0 || h.refcountTableOffsetBytes % C !== 0 || h.refcountTableClusters === 0) {
      throw this.bad(`refcount table offset ${h.refcountTableOffsetBytes}`);
    }
    // The refcount table is written last: a truncated file shows here first.
    if (h.refcountTableOffsetBytes + h.refcountTableClusters * C > this.fileBytes) {
      throw truncated(this.path, 'refcount table');
    }
    const virtualClusters = h.virtualBytes / C;
    const l1Needed = Math.ceil(virtualClusters / ENTRIES_PER_TABLE_CLUSTER);
    if (h.l1Entries < l1Needed) throw this.bad(`L1 table has ${h.l1Entries} entries, the virtual size needs ${l1Needed}`);
    if (h.l1OffsetBytes + h.l1Entries * TABLE_ENTRY_BYTES > this.fileBytes) throw truncated(this.path, 'L1 table');
    const metaVirt = snap.metaVirtOffsetBytes;
    if (metaVirt % C !== 0) throw this.bad(`metadata offset ${metaVirt} not cluster aligned`);
    if (snap.metaBytes === 0 || snap.metaBytes > META_BYTES_MAX || snap.metaBytes > h.virtualBytes - metaVirt) {
      throw this.bad(`metadata region (${snap.metaBytes} bytes at ${metaVirt}) outside the virtual disk`);
    }
    if (snap.metaBytes > this.fileBytes) throw truncated(this.path, 'metadata');
  }

  private loadMapping(h: Qcow2Header): void {
    const C = CLUSTER_BYTES;
    const s = this.scratch;
    const virtualClusters = this.hostClusterOfVirt.length;
    const l1Used = Math.ceil(virtualClusters / ENTRIES_PER_TABLE_CLUSTER);
    const l2Offsets: number[] = [];
    const l1Clusters = Math.ceil((l1Used * TABLE_ENTRY_BYTES) / C);
    for (let i = 0; i < l1Clusters; i++) {
      const pos = h.l1OffsetBytes + i * C;
      const want = Math.min(C, this.fileBytes - pos);
      const got = readAt(this.path, this.fd, s, this.direct ? roundUp4k(want) : want, pos, this.direct);
      const entries = Math.min(ENTRIES_PER_TABLE_CLUSTER, l1Used - i * ENTRIES_PER_TABLE_CLUSTER);
      if (got < entries * TABLE_ENTRY_BYTES) throw truncated(this.path, 'L1 table');
      for (let k = 0; k < entries; k++) l2Offsets.push(this.checkedOffset(readEntry(s, k), 'L2 table'));
    }
    l2Offsets.forEach((l2Offset, l1Index) => {
      if (l2Offset === 0) return;
      const got = readAt(this.path, this.fd, s, C, l2Offset, this.direct);
      if (got !== C) throw truncated(this.path, `L2 table at byte ${l2Offset}`);
      const first = l1Index * ENTRIES_PER_TABLE_CLUSTER;
      const count = Math.min(ENTRIES_PER_TABLE_CLUSTER, virtualClusters - first);
      for (let k = 0; k < count; k++) {
        const entry = readEntry(s, k);
        if (entry === 0n) continue;
        if ((entry & QCOW_OFLAG_COMPRESSED) !== 0n) throw this.bad(`compressed cluster at virtual cluster ${first + k}`);
        if ((entry & QCOW_OFLAG_ZERO) !== 0n) continue; // reads as zeros
        const host = this.checkedOffset(entry, 'data cluster');
        if (host !== 0) this.hostClusterOfVirt[first + k] = host / C;
      }
    });
  }

  /** Host offset from an L1/L2 entry (0 = none), checked for alignment and against the file size. */
  private checkedOffset(entry: bigint, what: string): number {
    const C = CLUSTER_BYTES;
    const off = Number(entry & OFFSET_MASK);
    if (off === 0) return 0;
    if (off % C !== 0) throw this.bad(`${what} offset ${off} not cluster aligned`);
    if (off / C > VIRT_CLUSTER_MAX) throw this.bad(`${what} offset ${off} out of range`);
    if (off + C > this.fileBytes) throw truncated(this.path, `${what} at byte ${off}`);
    return off;
  }

  private loadMeta(snap: SnapExtension): SnapshotMeta {
    const C = CLUSTER_BYTES;
    const bytes = new Uint8Array(snap.metaBytes);
    const first = snap.metaVirtOffsetBytes / C;
    for (let i = 0; i * C < snap.metaBytes; i++) {
      this.readCluster(first + i, this.scratch);
      bytes.set(this.scratch.subarray(0, Math.min(C, snap.metaBytes - i * C)), i * C);
    }
    if ((crc32(bytes) >>> 0) !== snap.metaCrc32) throw this.bad('metadata damaged (checksum mismatch)');
    let meta: SnapshotMeta;
    try {
      meta = decodeMeta(bytes);
    } catch (err) {
      if (err instanceof SnapPipeError) throw new SnapPipeError(err.code, `${this.path}: ${err.message}`);
      throw err;
    }
    if (meta.formatVersion !== snap.formatVersion) throw this.bad('metadata damaged (format version differs from header)');
    for (const b of meta.blocks) {
      if (b.virtOffsetBytes + b.lengthBytes > snap.metaVirtOffsetBytes) {
        throw this.bad(`metadata damaged (block ${b.id} overlaps the metadata region)`);
      }
    }
    return meta;
  }
}

function roundUp4k(n: number): number {
  return Math.ceil(n / 4096) * 4096;
}

function truncated(path: string, what: string): SnapPipeError {
  return new SnapPipeError('TRUNCATED', `${path}: the file is shorter than its ${what} (truncated image)`);
}

/**
 * Reads up to `lengthBytes` at `positionBytes` into the start of `dst`; returns bytes read (short only at EOF).
 * `what` names the structure being read in I/O error messages.
 */
export function readAt(
  path: string,
  fd: number,
  dst: Uint8Array,
  lengthBytes: number,
  positionBytes: number,
  direct: boolean,
  what?: string,
): number {
  if (direct) assert(lengthBytes % 4096 === 0 && positionBytes % 4096 === 0, 'readAt: unaligned O_DIRECT read');
  let done = 0;
  // Bounded: each round reads at least one byte or stops at EOF.
  while (done < lengthBytes) {
    let n: number;
    try {
      n = fs.readSync(fd, dst, done, lengthBytes - done, positionBytes + done);
    } catch (err) {
      if (direct && (err as NodeJS.ErrnoException).code === 'EINVAL') {
        throw new SnapPipeError('NO_DIRECT', `${path}: the file system refuses O_DIRECT; use --no-direct`);
      }
      throw ioError(`read ${path} at byte ${positionBytes + done}${what ? ` (${what})` : ''}`, err);
    }
    if (n === 0) break;
    done += n;
    // With O_DIRECT a short read is EOF; continuing would be an unaligned read.
    if (direct && done % 4096 !== 0) break;
  }
  return done;
}
