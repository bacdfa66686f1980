// Opens a snap-pipe QCOW2 image and checks all of its structure before anything else reads it: the header, its
// feature bits and extensions, the snap-pipe extension, every L1, L2 and refcount table entry (flags, reserved bits,
// offsets inside the file), that no host cluster is used twice, that every cluster's refcount is exactly what its
// use calls for, and the metadata (CRC-checked twice: whole and per section) and where it puts the RAM blocks.
// Every size, count and offset read from the file is bounded (limits.ts and the file's real size) before it is
// used to allocate or to loop. load, verify and info all open images here, so they refuse the same things.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import { crc32 } from 'node:zlib';
import { SnapPipeError, ioError } from '../errors.js';
import { alignedShared } from '../native/memory.js';
import {
  FILE_BYTES_MAX,
  L1_ENTRIES_MAX,
  META_BYTES_MAX,
  REFCOUNT_TABLE_CLUSTERS_MAX,
  VIRTUAL_BYTES_MAX,
} from '../format/image/limits.js';
import { decodeMeta } from '../format/image/metadata.js';
import { openImageFile } from './open.js';
import { ClusterReader, type ClusterReadOptions } from './clusters.js';
import {
  ENTRIES_PER_TABLE_CLUSTER,
  HEADER_AREA_BYTES,
  QCOW2_HEADER_LENGTH_BYTES,
  QCOW2_VERSION,
  REFCOUNT_ORDER,
  REFCOUNTS_PER_BLOCK,
  SNAP_EXT_DATA_BYTES,
  SNAP_EXT_MAGIC,
  SNAP_FLAG_COMPLETE,
  TABLE_ENTRY_BYTES,
  decodeHeader,
  layoutBlocks,
  type HeaderExtensionRef,
  type Qcow2Header,
  type SnapExtension,
} from '../format/image/qcow2.js';
import {
  ClusterUse,
  Use,
  entryFault,
  entryHex,
  entryOffset,
  refcountTableEntryFault,
  refcountTableOffset,
  useName,
  type Entry,
} from '../format/image/tables.js';
import { FORMAT_VERSION, type SnapshotMeta } from '../format/image/types.js';
import { CLUSTER_BITS, CLUSTER_BYTES } from '../format/units.js';

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
  private readonly virtualClusters: number;
  /**
   * Per L1 index, the host cluster of each virtual cluster its L2 table maps (0: unallocated); undefined where the
   * L1 entry names no L2 table. Only the tables the image has take memory (512 KiB each, at most L1_ENTRIES_MAX).
   */
  private readonly l2Maps: (Int32Array | undefined)[];

  private constructor(p: {
    path: string;
    fd: number;
    direct: boolean;
    fileBytes: number;
    scratch: Uint8Array;
    header: Qcow2Header;
    extensions: HeaderExtensionRef[];
    extensionsEnded: boolean;
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
      this.virtualClusters = 0;
      this.l2Maps = [];
      this.meta = undefined;
      return;
    }
    const h = p.header;
    this.checkHeader(h, p.extensions, p.extensionsEnded);
    this.checkFile(h);
    this.checkMetaRegion(h, p.snap);
    this.virtualBytes = h.virtualBytes;
    this.virtualClusters = h.virtualBytes / CLUSTER_BYTES;
    this.metaVirtOffsetBytes = p.snap.metaVirtOffsetBytes;
    this.metaBytes = p.snap.metaBytes;
    // Which structure uses each host cluster: each may be reached once (a table named twice would be walked twice).
    const use = new ClusterUse(this.fileBytes / CLUSTER_BYTES);
    use.claim(0, Use.Header);
    const l2Offsets = this.readL1(h, use);
    const refcountBlockOffsets = this.readRefcountTable(h, use);
    this.l2Maps = this.readL2Tables(l2Offsets, use);
    this.dataClusters = this.countMapped(0, this.metaVirtOffsetBytes / CLUSTER_BYTES);
    this.checkMetaMapped();
    this.checkRefcounts(refcountBlockOffsets, use);
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
        extensions: decoded.extensions,
        extensionsEnded: decoded.ended,
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
    const host = this.hostClusterOf(virtCluster);
    return host === 0 ? undefined : host * CLUSTER_BYTES;
  }

  /** Reads one whole cluster (virtual index) into `dst` (1 MiB; page aligned when direct); unallocated reads as zeros. */
  readCluster(virtCluster: number, dst: Uint8Array): void {
    assert(this.fd >= 0, 'readCluster after close');
    assert(dst.byteLength >= CLUSTER_BYTES, 'readCluster: dst smaller than a cluster');
    assert(
      Number.isInteger(virtCluster) && virtCluster >= 0 && virtCluster < this.virtualClusters,
      `readCluster: virtual cluster ${virtCluster} outside the image`,
    );
    const host = this.hostClusterOf(virtCluster);
    if (host === 0) {
      dst.fill(0, 0, CLUSTER_BYTES);
      return;
    }
    const got = readAt(this.path, this.fd, dst, CLUSTER_BYTES, host * CLUSTER_BYTES, this.direct);
    if (got !== CLUSTER_BYTES) throw truncated(this.path, `cluster at byte ${host * CLUSTER_BYTES}`);
  }

  /** Reads of whole data clusters through this image's fd; close it before this reader. */
  clusterReader(o: ClusterReadOptions): ClusterReader {
    assert(this.fd >= 0, 'clusterReader after close');
    return new ClusterReader(this.path, this.fd, o);
  }

  /**
   * Reads exactly `lengthBytes` at `positionBytes` into `dst` (page aligned when direct); the file ending first is
   * a truncated image, `what` naming the structure read.
   */
  readExact(dst: Uint8Array, lengthBytes: number, positionBytes: number, what: string): void {
    assert(this.fd >= 0, 'readExact after close');
    const got = readAt(this.path, this.fd, dst, lengthBytes, positionBytes, this.direct, what);
    if (got < lengthBytes) {
      throw new SnapPipeError('TRUNCATED', `${this.path}: the file ends inside the ${what} at byte ${positionBytes + got} (truncated image)`);
    }
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

  /** Host cluster of a virtual cluster; 0 when unallocated or outside the image. */
  private hostClusterOf(virtCluster: number): number {
    if (!Number.isInteger(virtCluster) || virtCluster < 0 || virtCluster >= this.virtualClusters) return 0;
    const map = this.l2Maps[Math.floor(virtCluster / ENTRIES_PER_TABLE_CLUSTER)];
    return map === undefined ? 0 : map[virtCluster % ENTRIES_PER_TABLE_CLUSTER];
  }

  private bad(what: string): SnapPipeError {
    return new SnapPipeError('BAD_IMAGE', `${this.path}: ${what}`);
  }

  /**
   * The header fields and features, as snap-pipe writes them. QCOW2 (docs/interop/qcow2.txt, "Header"): a reader
   * must refuse an image with incompatible feature bits it does not know; snap-pipe knows none (QEMU's are dirty,
   * corrupt, external data file, compression type and extended L2 entries, each changing how the image must be
   * read). It writes no compatible bits (lazy refcounts) and no autoclear bits either: QEMU refuses to open an
   * image with autoclear bit 1 (raw external data) and no data file, and bit 0 claims bitmaps snap-pipe never
   * writes. Extensions: QEMU reads them up to the end marker; snap-pipe writes its own and the marker, nothing else.
   */
  private checkHeader(h: Qcow2Header, extensions: HeaderExtensionRef[], ended: boolean): void {
    if (h.version !== QCOW2_VERSION || h.clusterBits !== CLUSTER_BITS || h.refcountOrder !== REFCOUNT_ORDER) {
      throw this.bad(
        `unsupported QCOW2 layout (version ${h.version}, cluster_bits ${h.clusterBits}, refcount_order ${h.refcountOrder})`,
      );
    }
    if (h.headerLengthBytes !== QCOW2_HEADER_LENGTH_BYTES) {
      throw this.bad(`QCOW2 header length ${h.headerLengthBytes} (snap-pipe writes ${QCOW2_HEADER_LENGTH_BYTES})`);
    }
    if (h.cryptMethod !== 0 || h.backingFileOffsetBytes !== 0 || h.snapshotCount !== 0 || h.snapshotsOffsetBytes !== 0) {
      throw this.bad('QCOW2 image uses encryption, a backing file or internal snapshots');
    }
    if (h.incompatibleFeatures !== 0n) throw this.bad(`QCOW2 incompatible features 0x${h.incompatibleFeatures.toString(16)}`);
    if (h.compatibleFeatures !== 0n) {
      throw this.bad(`QCOW2 compatible features 0x${h.compatibleFeatures.toString(16)} (snap-pipe writes none)`);
    }
    if (h.autoclearFeatures !== 0n) {
      throw this.bad(`QCOW2 autoclear features 0x${h.autoclearFeatures.toString(16)} (snap-pipe writes none)`);
    }
    const ours = extensions.length === 1 && extensions[0].type === SNAP_EXT_MAGIC && extensions[0].lengthBytes === SNAP_EXT_DATA_BYTES;
    if (!ours || !ended) {
      const types = extensions.map((e) => `0x${e.type.toString(16)} (${e.lengthBytes} bytes)`).join(', ');
      throw this.bad(`QCOW2 header extensions ${types}${ended ? '' : ' and no end marker (type 0, length 0)'}: snap-pipe writes its own and the end marker only`);
    }
  }

  /** The file: whole clusters, no larger than any image snap-pipe writes, and as long as its tables need. */
  private checkFile(h: Qcow2Header): void {
    const C = CLUSTER_BYTES;
    if (h.refcountTableOffsetBytes === 0 || h.refcountTableOffsetBytes % C !== 0) {
      throw this.bad(`refcount table offset ${h.refcountTableOffsetBytes}`);
    }
    if (h.refcountTableClusters === 0 || h.refcountTableClusters > REFCOUNT_TABLE_CLUSTERS_MAX) {
      throw this.bad(`refcount table of ${h.refcountTableClusters} clusters (snap-pipe writes 1 to ${REFCOUNT_TABLE_CLUSTERS_MAX})`);
    }
    // The refcount table is written last: a truncated file shows here first.
    if (h.refcountTableOffsetBytes + h.refcountTableClusters * C > this.fileBytes) throw truncated(this.path, 'refcount table');
    if (this.fileBytes % C !== 0) {
      throw new SnapPipeError('TRUNCATED', `${this.path}: the file ends ${this.fileBytes % C} bytes into a cluster (truncated image)`);
    }
    if (this.fileBytes > FILE_BYTES_MAX) {
      throw this.bad(`the file is ${this.fileBytes} bytes, more than any image snap-pipe writes (at most ${FILE_BYTES_MAX})`);
    }
  }

  /**
   * The virtual size, the snap-pipe extension's metadata region and the L1 table's size, against each other and
   * against limits.ts: snap-pipe's virtual disk ends with the metadata region, and its L1 table has one entry per
   * 128 GiB of it.
   */
  private checkMetaRegion(h: Qcow2Header, snap: SnapExtension): void {
    const C = CLUSTER_BYTES;
    if (h.virtualBytes % C !== 0) throw this.bad(`virtual size ${h.virtualBytes} is not whole clusters`);
    if (h.virtualBytes > VIRTUAL_BYTES_MAX) {
      throw this.bad(`virtual size ${h.virtualBytes} is more than snap-pipe writes (at most ${VIRTUAL_BYTES_MAX}: 16 TiB of RAM and its metadata)`);
    }
    const metaVirt = snap.metaVirtOffsetBytes;
    if (metaVirt % C !== 0) throw this.bad(`metadata offset ${metaVirt} not cluster aligned`);
    if (snap.metaBytes === 0 || snap.metaBytes > META_BYTES_MAX || snap.metaBytes > h.virtualBytes - metaVirt) {
      throw this.bad(`metadata region (${snap.metaBytes} bytes at ${metaVirt}) outside the virtual disk`);
    }
    const virtualWanted = metaVirt + Math.ceil(snap.metaBytes / C) * C;
    if (h.virtualBytes !== virtualWanted) {
      throw this.bad(`virtual size is ${h.virtualBytes}, snap-pipe's layout for this image has ${virtualWanted} (damaged header)`);
    }
    const l1Needed = Math.ceil(h.virtualBytes / C / ENTRIES_PER_TABLE_CLUSTER);
    assert(l1Needed <= L1_ENTRIES_MAX);
    if (h.l1Entries !== l1Needed) throw this.bad(`L1 table has ${h.l1Entries} entries, the virtual size needs ${l1Needed}`);
    if (h.l1OffsetBytes === 0 || h.l1OffsetBytes % C !== 0) throw this.bad(`L1 table offset ${h.l1OffsetBytes}`);
    if (h.l1OffsetBytes + C > this.fileBytes) throw truncated(this.path, 'L1 table');
  }

  /** Claims a cluster of a table named by the header; a second claim is a damaged header. */
  private claimHeaderTable(use: ClusterUse, offsetBytes: number, what: Use): void {
    const was = use.claim(offsetBytes / CLUSTER_BYTES, what);
    if (was !== Use.Free) throw this.bad(`${useName(what)} at byte ${offsetBytes} is also ${useName(was)} (damaged header)`);
  }

  /** The L1 table (one cluster: at most L1_ENTRIES_MAX entries): the L2 table offset per L1 index, 0 for none. */
  private readL1(h: Qcow2Header, use: ClusterUse): number[] {
    const C = CLUSTER_BYTES;
    this.claimHeaderTable(use, h.l1OffsetBytes, Use.L1Table);
    const s = this.scratch;
    const bytes = h.l1Entries * TABLE_ENTRY_BYTES;
    const got = readAt(this.path, this.fd, s, roundUp4k(bytes), h.l1OffsetBytes, this.direct, 'L1 table');
    if (got < bytes) throw truncated(this.path, 'L1 table');
    const view = new DataView(s.buffer, s.byteOffset, bytes);
    const offsets: number[] = [];
    for (let i = 0; i < h.l1Entries; i++) {
      const e: Entry = { hi: view.getUint32(i * 8), lo: view.getUint32(i * 8 + 4) };
      const fault = entryFault(e, 1);
      if (fault !== undefined) throw this.bad(`L1 entry ${i} is 0x${entryHex(e)}: ${fault} (damaged L1 table)`);
      const off = entryOffset(e);
      if (off % C !== 0) throw this.bad(`L2 table offset ${off} not cluster aligned`);
      if (off + C > this.fileBytes) throw truncated(this.path, `L2 table at byte ${off}`);
      offsets.push(off);
    }
    return offsets;
  }

  /**
   * The refcount table: the refcount block offset per block index (0: none), for the blocks that cover the file;
   * entries past those must be 0. Claims the table and every block.
   */
  private readRefcountTable(h: Qcow2Header, use: ClusterUse): number[] {
    const C = CLUSTER_BYTES;
    const s = this.scratch;
    for (let i = 0; i < h.refcountTableClusters; i++) this.claimHeaderTable(use, h.refcountTableOffsetBytes + i * C, Use.RefcountTable);
    const blocksNeeded = Math.ceil(use.clusters / REFCOUNTS_PER_BLOCK);
    const entries = h.refcountTableClusters * ENTRIES_PER_TABLE_CLUSTER;
    const blocks = new Array<number>(blocksNeeded).fill(0);
    for (let i = 0; i < h.refcountTableClusters; i++) {
      const got = readAt(this.path, this.fd, s, C, h.refcountTableOffsetBytes + i * C, this.direct, 'refcount table');
      if (got !== C) throw truncated(this.path, 'refcount table');
      const view = new DataView(s.buffer, s.byteOffset, C);
      const words = new Uint32Array(s.buffer, s.byteOffset, C / 4);
      for (let k = 0; k < ENTRIES_PER_TABLE_CLUSTER; k++) {
        if ((words[2 * k] | words[2 * k + 1]) === 0) continue; // the usual case, without DataView calls
        const e: Entry = { hi: view.getUint32(k * 8), lo: view.getUint32(k * 8 + 4) };
        const b = i * ENTRIES_PER_TABLE_CLUSTER + k;
        const fault = b >= blocksNeeded ? `past the ${blocksNeeded} refcount blocks the file needs` : refcountTableEntryFault(e);
        if (fault !== undefined) throw this.bad(`refcount table entry ${b} of ${entries} is 0x${entryHex(e)} (damaged refcount table: ${fault})`);
        const off = refcountTableOffset(e);
        if (off + C > this.fileBytes) throw truncated(this.path, `refcount block at byte ${off}`);
        const was = use.claim(off / C, Use.RefcountBlock);
        if (was !== Use.Free) throw this.bad(`refcount block ${b} at byte ${off} is also ${useName(was)} (damaged refcount table)`);
        blocks[b] = off;
      }
    }
    return blocks;
  }

  /**
   * Every L2 table the L1 table names, each once: its entries checked (flags, reserved bits, nothing past the
   * virtual size, offsets cluster aligned and inside the file) and every data cluster claimed once.
   */
  private readL2Tables(l2Offsets: number[], use: ClusterUse): (Int32Array | undefined)[] {
    const C = CLUSTER_BYTES;
    const E = ENTRIES_PER_TABLE_CLUSTER;
    const s = this.scratch;
    const maps: (Int32Array | undefined)[] = [];
    l2Offsets.forEach((l2Offset, l1Index) => {
      if (l2Offset === 0) return;
      const was = use.claim(l2Offset / C, Use.L2Table);
      if (was === Use.L2Table) {
        const other = l2Offsets.indexOf(l2Offset);
        throw this.bad(`L1 entries ${other} and ${l1Index} both name the L2 table at byte ${l2Offset} (damaged L1 table)`);
      }
      if (was !== Use.Free) throw this.bad(`the L2 table at byte ${l2Offset} (L1 entry ${l1Index}) is also ${useName(was)} (damaged L1 table)`);
      const got = readAt(this.path, this.fd, s, C, l2Offset, this.direct, 'L2 table');
      if (got !== C) throw truncated(this.path, `L2 table at byte ${l2Offset}`);
      const view = new DataView(s.buffer, s.byteOffset, C);
      const words = new Uint32Array(s.buffer, s.byteOffset, C / 4);
      const first = l1Index * E;
      const inImage = Math.min(E, this.virtualClusters - first);
      const map = new Int32Array(E);
      for (let k = 0; k < E; k++) {
        if ((words[2 * k] | words[2 * k + 1]) === 0) continue; // the usual case, without DataView calls
        const e: Entry = { hi: view.getUint32(k * 8), lo: view.getUint32(k * 8 + 4) };
        const v = first + k;
        const fault = k >= inImage ? `past the virtual size of ${this.virtualClusters} clusters` : entryFault(e, 2);
        if (fault !== undefined) throw this.bad(`L2 entry for virtual cluster ${v} is 0x${entryHex(e)}: ${fault} (damaged L2 table)`);
        const off = entryOffset(e);
        if (off % C !== 0) throw this.bad(`data cluster offset ${off} not cluster aligned`);
        if (off + C > this.fileBytes) throw truncated(this.path, `data cluster at byte ${off}`);
        const dataWas = use.claim(off / C, Use.Data);
        if (dataWas === Use.Data) {
          throw this.bad(`virtual clusters ${this.virtualClusterOf(off / C, maps, map, first)} and ${v} both map to the cluster at byte ${off} (damaged L2 table)`);
        }
        if (dataWas !== Use.Free) throw this.bad(`the data cluster of virtual cluster ${v} at byte ${off} is also ${useName(dataWas)} (damaged L2 table)`);
        map[k] = off / C;
      }
      maps[l1Index] = map;
    });
    return maps;
  }

  /** The first virtual cluster mapped to `host` among `maps` and the table `current` being read (first index `first`). */
  private virtualClusterOf(host: number, maps: (Int32Array | undefined)[], current: Int32Array, first: number): number {
    for (const [l1Index, map] of [...maps.entries(), [first / ENTRIES_PER_TABLE_CLUSTER, current] as const]) {
      const k = map ? map.indexOf(host) : -1;
      if (k >= 0) return l1Index * ENTRIES_PER_TABLE_CLUSTER + k;
    }
    return -1;
  }

  /** Mapped virtual clusters in [first, end), counted in the L2 tables the image has. */
  private countMapped(first: number, end: number): number {
    let n = 0;
    this.l2Maps.forEach((map, l1Index) => {
      if (map === undefined) return;
      const base = l1Index * ENTRIES_PER_TABLE_CLUSTER;
      for (let k = Math.max(0, first - base); k < Math.min(ENTRIES_PER_TABLE_CLUSTER, end - base); k++) if (map[k] !== 0) n++;
    });
    return n;
  }

  /** Every cluster of the metadata region is mapped: what is read and allocated next is bounded by the file. */
  private checkMetaMapped(): void {
    const first = this.metaVirtOffsetBytes / CLUSTER_BYTES;
    const count = Math.ceil(this.metaBytes / CLUSTER_BYTES);
    for (let i = 0; i < count; i++) {
      if (this.hostClusterOf(first + i) === 0) {
        throw this.bad(`metadata cluster ${i} (virtual cluster ${first + i}) is not mapped (damaged L1 or L2 table)`);
      }
    }
  }

  /**
   * Every refcount the blocks hold, against the use of each cluster: 1 for a used cluster, 0 for an unused one and
   * for every entry past the end of the file (qemu-img check calls more a leak and fewer corruption).
   */
  private checkRefcounts(blocks: number[], use: ClusterUse): void {
    const C = CLUSTER_BYTES;
    const s = this.scratch;
    blocks.forEach((offsetBytes, b) => {
      if (offsetBytes === 0) {
        s.fill(0, 0, C);
      } else {
        const got = readAt(this.path, this.fd, s, C, offsetBytes, this.direct, 'refcount block');
        if (got !== C) throw truncated(this.path, `refcount block at byte ${offsetBytes}`);
      }
      const first = b * REFCOUNTS_PER_BLOCK;
      const inFile = Math.min(REFCOUNTS_PER_BLOCK, use.clusters - first);
      for (let k = 0; k < inFile; k++) {
        const got = (s[2 * k] << 8) | s[2 * k + 1];
        const want = use.usedBy(first + k) === Use.Free ? 0 : 1;
        if (got === want) continue;
        if (offsetBytes === 0) {
          throw this.bad(`cluster ${first + k} has no refcount block (refcount table entry ${b} is 0) (damaged refcount table)`);
        }
        throw this.bad(`cluster ${first + k} has refcount ${got}, expected ${want} (damaged refcount block)`);
      }
      // Past the end of the file every refcount is 0: checked 16 bits at a time (zero in either byte order).
      const halves = new Uint16Array(s.buffer, s.byteOffset, REFCOUNTS_PER_BLOCK);
      for (let k = inFile; k < REFCOUNTS_PER_BLOCK; k++) {
        if (halves[k] === 0) continue;
        throw this.bad(`cluster ${first + k} has refcount ${(s[2 * k] << 8) | s[2 * k + 1]}, expected 0 (damaged refcount block)`);
      }
    });
  }

  private loadMeta(snap: SnapExtension): SnapshotMeta {
    const C = CLUSTER_BYTES;
    // Bounded: checkMetaMapped found a distinct cluster of the file for every MiB of it.
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
    // The blocks where the writer puts them (layoutBlocks), the metadata right after: nothing overlaps.
    for (const b of meta.blocks) {
      if (b.lengthBytes > VIRTUAL_BYTES_MAX) throw this.bad(`metadata damaged (block ${b.id} of ${b.lengthBytes} bytes)`);
    }
    const { virtOffsetsBytes, ramEndBytes } = layoutBlocks(meta.blocks.map((b) => b.lengthBytes));
    meta.blocks.forEach((b, i) => {
      if (b.virtOffsetBytes !== virtOffsetsBytes[i]) {
        throw this.bad(`metadata damaged (block ${b.id} at virtual byte ${b.virtOffsetBytes}, where snap-pipe puts it at ${virtOffsetsBytes[i]})`);
      }
    });
    if (ramEndBytes !== snap.metaVirtOffsetBytes) {
      throw this.bad(`metadata damaged (the RAM blocks end at virtual byte ${ramEndBytes}, the metadata region starts at ${snap.metaVirtOffsetBytes})`);
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
