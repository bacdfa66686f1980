// QCOW2 v3 physical layout: pure encoders/decoders for the header, snap-pipe's header extension, L1/L2 entries,
// refcount blocks and the dense host layout snap-pipe writes. No I/O here.
//
// Host file (all in whole 1 MiB clusters):
//   cluster 0                 header + snap-pipe extension + end-of-extensions marker
//   clusters 1 .. D           data clusters, in arrival order
//   next M clusters           snap-pipe metadata (mapped in the virtual disk after the last RAM block)
//   L2 tables                 only for L1 entries that map something
//   L1 table                  whole clusters
//   refcount blocks           16-bit entries, every used cluster has refcount 1
//   refcount table            last, so a truncated file is noticed at once

import assert from 'node:assert/strict';
import { printable } from '../text.js';
import { CLUSTER_BITS, CLUSTER_BYTES } from '../units.js';

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"
export const QCOW2_VERSION = 3;
export const QCOW2_HEADER_LENGTH_BYTES = 104;
/** 16-bit refcounts. */
export const REFCOUNT_ORDER = 4;
export const REFCOUNT_ENTRY_BYTES = 2;
export const REFCOUNTS_PER_BLOCK = CLUSTER_BYTES / REFCOUNT_ENTRY_BYTES; // 524288
export const TABLE_ENTRY_BYTES = 8;
/** Entries per L2 table, per L1 cluster and per refcount-table cluster. */
export const ENTRIES_PER_TABLE_CLUSTER = CLUSTER_BYTES / TABLE_ENTRY_BYTES; // 131072

/** Bit 63 of L1/L2 entries: refcount is exactly 1, the cluster may be written in place. */
export const QCOW_OFLAG_COPIED = 1n << 63n;
/** Bits 9-55 of L1/L2/refcount table entries hold the host offset. */
export const OFFSET_MASK = 0x00ff_ffff_ffff_fe00n;

/** Header extension type of snap-pipe's own extension ("SNP1"). QEMU ignores unknown extensions. */
export const SNAP_EXT_MAGIC = 0x534e5031;
export const SNAP_EXT_DATA_BYTES = 32;
export const SNAP_FLAG_COMPLETE = 1;
/**
 * Header extension "SNPF": why the save that wrote an incomplete image failed, one line of UTF-8 (at most
 * SNAP_FAILURE_BYTES_MAX bytes). Written only into an image that stays incomplete; a finished image has none.
 */
export const SNAP_FAILURE_EXT_MAGIC = 0x534e5046;
export const SNAP_FAILURE_BYTES_MAX = 1024;
/** Header bytes that matter: header, one extension header + data, end marker. Fits the first 4 KiB. */
export const HEADER_AREA_BYTES = 4096;

export interface Qcow2Header {
  version: number;
  backingFileOffsetBytes: number;
  backingFileSizeBytes: number;
  clusterBits: number;
  virtualBytes: number;
  cryptMethod: number;
  l1Entries: number;
  l1OffsetBytes: number;
  refcountTableOffsetBytes: number;
  refcountTableClusters: number;
  snapshotCount: number;
  snapshotsOffsetBytes: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLengthBytes: number;
}

export interface SnapExtension {
  formatVersion: number;
  flags: number;
  /** Where the metadata starts in the virtual disk (cluster aligned). */
  metaVirtOffsetBytes: number;
  metaBytes: number;
  metaCrc32: number;
}

export interface HeaderExtensionRef {
  type: number;
  offsetBytes: number;
  lengthBytes: number;
}

function getU64(view: DataView, offsetBytes: number): number {
  const v = view.getBigUint64(offsetBytes);
  // Anything above 2^53 is not an offset or size snap-pipe wrote; make it fail the range checks.
  return v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(v);
}

function setU64(view: DataView, offsetBytes: number, value: number | bigint): void {
  const v = typeof value === 'bigint' ? value : BigInt(value);
  view.setBigUint64(offsetBytes, v);
}

/**
 * Writes the 104-byte v3 header, the snap-pipe extension, the failure note when given (an incomplete image only)
 * and the end marker into `dst` (zeroed first).
 */
export function encodeHeader(dst: Uint8Array, header: Qcow2Header, ext: SnapExtension, failure?: string): void {
  assert(dst.byteLength >= HEADER_AREA_BYTES, 'encodeHeader: dst too small');
  assert.equal(header.headerLengthBytes, QCOW2_HEADER_LENGTH_BYTES);
  dst.fill(0, 0, HEADER_AREA_BYTES);
  const view = new DataView(dst.buffer, dst.byteOffset, HEADER_AREA_BYTES);
  view.setUint32(0, QCOW2_MAGIC);
  view.setUint32(4, header.version);
  setU64(view, 8, header.backingFileOffsetBytes);
  view.setUint32(16, header.backingFileSizeBytes);
  view.setUint32(20, header.clusterBits);
  setU64(view, 24, header.virtualBytes);
  view.setUint32(32, header.cryptMethod);
  view.setUint32(36, header.l1Entries);
  setU64(view, 40, header.l1OffsetBytes);
  setU64(view, 48, header.refcountTableOffsetBytes);
  view.setUint32(56, header.refcountTableClusters);
  view.setUint32(60, header.snapshotCount);
  setU64(view, 64, header.snapshotsOffsetBytes);
  setU64(view, 72, header.incompatibleFeatures);
  setU64(view, 80, header.compatibleFeatures);
  setU64(view, 88, header.autoclearFeatures);
  view.setUint32(96, header.refcountOrder);
  view.setUint32(100, header.headerLengthBytes);
  let pos = header.headerLengthBytes;
  view.setUint32(pos, SNAP_EXT_MAGIC);
  view.setUint32(pos + 4, SNAP_EXT_DATA_BYTES);
  pos += 8;
  view.setUint32(pos, ext.formatVersion);
  view.setUint32(pos + 4, ext.flags);
  setU64(view, pos + 8, ext.metaVirtOffsetBytes);
  setU64(view, pos + 16, ext.metaBytes);
  view.setUint32(pos + 24, ext.metaCrc32 >>> 0);
  view.setUint32(pos + 28, 0);
  pos += SNAP_EXT_DATA_BYTES;
  if (failure !== undefined) {
    assert.equal(ext.flags & SNAP_FLAG_COMPLETE, 0, 'encodeHeader: a failure note in a complete image');
    const note = truncateUtf8(failure, SNAP_FAILURE_BYTES_MAX);
    view.setUint32(pos, SNAP_FAILURE_EXT_MAGIC);
    view.setUint32(pos + 4, note.length);
    dst.set(note, pos + 8);
    pos += 8 + Math.ceil(note.length / 8) * 8;
  }
  // End of extensions: type 0, length 0 (already zero).
  assert(pos + 8 <= HEADER_AREA_BYTES);
}

/** A header for a snap-pipe image with every field snap-pipe does not use at its neutral value. */
export function snapHeader(fields: {
  virtualBytes: number;
  l1Entries: number;
  l1OffsetBytes: number;
  refcountTableOffsetBytes: number;
  refcountTableClusters: number;
}): Qcow2Header {
  return {
    version: QCOW2_VERSION,
    backingFileOffsetBytes: 0,
    backingFileSizeBytes: 0,
    clusterBits: CLUSTER_BITS,
    cryptMethod: 0,
    snapshotCount: 0,
    snapshotsOffsetBytes: 0,
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: REFCOUNT_ORDER,
    headerLengthBytes: QCOW2_HEADER_LENGTH_BYTES,
    ...fields,
  };
}

/** True if the bytes start with the QCOW2 magic. */
export function hasQcow2Magic(src: Uint8Array): boolean {
  if (src.byteLength < 4) return false;
  return new DataView(src.buffer, src.byteOffset, 4).getUint32(0) === QCOW2_MAGIC;
}

export type HeaderDecode =
  | { kind: 'not-qcow2' }
  | { kind: 'short' }
  /** `failure`: the note of a failed save, made printable (it is read from a file anyone may have written). */
  /**
   * `ended`: the end-of-extensions marker (type 0, length 0) was found within `src`, after the listed extensions. QEMU
   * checks the marker's length like any extension's: one running past the cluster is "Header extension too large".
   */
  | { kind: 'ok'; header: Qcow2Header; extensions: HeaderExtensionRef[]; ended: boolean; snap: SnapExtension | undefined; failure?: string };

/**
 * Decodes a QCOW2 header and lists its extensions from the first bytes of a file (`src` = what could be read, up to
 * HEADER_AREA_BYTES). Decodes the snap-pipe extension if present. Field values are not validated here beyond what
 * is needed to walk the extensions safely.
 */
export function decodeHeader(src: Uint8Array): HeaderDecode {
  if (!hasQcow2Magic(src)) return { kind: 'not-qcow2' };
  if (src.byteLength < 72) return { kind: 'short' };
  const view = new DataView(src.buffer, src.byteOffset, src.byteLength);
  const version = view.getUint32(4);
  const v3 = version >= 3;
  if (v3 && src.byteLength < QCOW2_HEADER_LENGTH_BYTES) return { kind: 'short' };
  const header: Qcow2Header = {
    version,
    backingFileOffsetBytes: getU64(view, 8),
    backingFileSizeBytes: view.getUint32(16),
    clusterBits: view.getUint32(20),
    virtualBytes: getU64(view, 24),
    cryptMethod: view.getUint32(32),
    l1Entries: view.getUint32(36),
    l1OffsetBytes: getU64(view, 40),
    refcountTableOffsetBytes: getU64(view, 48),
    refcountTableClusters: view.getUint32(56),
    snapshotCount: view.getUint32(60),
    snapshotsOffsetBytes: getU64(view, 64),
    incompatibleFeatures: v3 ? view.getBigUint64(72) : 0n,
    compatibleFeatures: v3 ? view.getBigUint64(80) : 0n,
    autoclearFeatures: v3 ? view.getBigUint64(88) : 0n,
    refcountOrder: v3 ? view.getUint32(96) : 4,
    headerLengthBytes: v3 ? view.getUint32(100) : 72,
  };
  const extensions: HeaderExtensionRef[] = [];
  let snap: SnapExtension | undefined;
  let failure: string | undefined;
  let ended = false;
  let pos = header.headerLengthBytes;
  // Bounded walk: every extension takes at least 8 bytes and all must lie in `src`.
  while (pos + 8 <= src.byteLength) {
    const type = view.getUint32(pos);
    const lengthBytes = view.getUint32(pos + 4);
    if (type === 0) {
      ended = lengthBytes === 0;
      break;
    }
    const dataOffsetBytes = pos + 8;
    if (lengthBytes > src.byteLength - dataOffsetBytes) break; // runs past what we read: not ours
    extensions.push({ type, offsetBytes: dataOffsetBytes, lengthBytes });
    if (type === SNAP_EXT_MAGIC && lengthBytes >= SNAP_EXT_DATA_BYTES && snap === undefined) {
      snap = {
        formatVersion: view.getUint32(dataOffsetBytes),
        flags: view.getUint32(dataOffsetBytes + 4),
        metaVirtOffsetBytes: getU64(view, dataOffsetBytes + 8),
        metaBytes: getU64(view, dataOffsetBytes + 16),
        metaCrc32: view.getUint32(dataOffsetBytes + 24),
      };
    }
    if (type === SNAP_FAILURE_EXT_MAGIC && failure === undefined) {
      const note = src.subarray(dataOffsetBytes, dataOffsetBytes + Math.min(lengthBytes, SNAP_FAILURE_BYTES_MAX));
      failure = printable(new TextDecoder().decode(note));
    }
    pos = dataOffsetBytes + Math.ceil(lengthBytes / 8) * 8;
  }
  return { kind: 'ok', header, extensions, ended, snap, ...(failure !== undefined ? { failure } : {}) };
}

/** The UTF-8 of `text`, cut at a character boundary to at most `maxBytes`. */
function truncateUtf8(text: string, maxBytes: number): Uint8Array {
  const all = new TextEncoder().encode(text);
  if (all.length <= maxBytes) return all;
  let end = maxBytes;
  while (end > 0 && (all[end] & 0xc0) === 0x80) end--;
  return all.subarray(0, end);
}

/** An L1 or L2 entry pointing at `hostOffsetBytes` with refcount 1 (COPIED). */
export function tableEntry(hostOffsetBytes: number): bigint {
  assert(hostOffsetBytes > 0 && hostOffsetBytes % CLUSTER_BYTES === 0, `tableEntry: bad offset ${hostOffsetBytes}`);
  return BigInt(hostOffsetBytes) | QCOW_OFLAG_COPIED;
}

export function writeEntry(dst: Uint8Array, index: number, entry: bigint): void {
  new DataView(dst.buffer, dst.byteOffset, dst.byteLength).setBigUint64(index * TABLE_ENTRY_BYTES, entry);
}

export function readEntry(src: Uint8Array, index: number): bigint {
  return new DataView(src.buffer, src.byteOffset, src.byteLength).getBigUint64(index * TABLE_ENTRY_BYTES);
}

/** Places RAM blocks (in setup order) at cluster-aligned virtual offsets, each rounded up to whole clusters. */
export function layoutBlocks(lengthsBytes: number[]): { virtOffsetsBytes: number[]; ramEndBytes: number } {
  const virtOffsetsBytes: number[] = [];
  let ramEndBytes = 0;
  for (const lengthBytes of lengthsBytes) {
    assert(Number.isSafeInteger(lengthBytes) && lengthBytes >= 0, `layoutBlocks: bad length ${lengthBytes}`);
    virtOffsetsBytes.push(ramEndBytes);
    ramEndBytes += Math.ceil(lengthBytes / CLUSTER_BYTES) * CLUSTER_BYTES;
  }
  return { virtOffsetsBytes, ramEndBytes };
}

export interface TailLayout {
  /** Host cluster indices (each region is contiguous). */
  metaFirstCluster: number;
  metaClusters: number;
  l2FirstCluster: number;
  /** L1 index of each L2 table, in host order. */
  l2ForL1Index: number[];
  l1FirstCluster: number;
  l1Clusters: number;
  l1Entries: number;
  refcountBlockFirstCluster: number;
  refcountBlocks: number;
  refcountTableFirstCluster: number;
  refcountTableClusters: number;
  /** Every host cluster 0 .. totalClusters-1 is used and has refcount 1. */
  totalClusters: number;
  virtualBytes: number;
  metaVirtOffsetBytes: number;
}

/**
 * Lays out everything written at finish after `dataClusters` data clusters (host clusters 1..dataClusters).
 * `mappedVirtClusters` says which virtual clusters carry data (to know which L2 tables are needed).
 */
export function layoutTail(p: {
  dataClusters: number;
  metaVirtOffsetBytes: number;
  metaBytes: number;
  isL1IndexUsedByData: (l1Index: number) => boolean;
}): TailLayout {
  assert(p.metaVirtOffsetBytes % CLUSTER_BYTES === 0, 'layoutTail: metadata not cluster aligned');
  assert(p.metaBytes > 0, 'layoutTail: empty metadata');
  const metaClusters = Math.ceil(p.metaBytes / CLUSTER_BYTES);
  const metaVirtCluster = p.metaVirtOffsetBytes / CLUSTER_BYTES;
  const virtualClusters = metaVirtCluster + metaClusters;
  const virtualBytes = virtualClusters * CLUSTER_BYTES;
  const l1Entries = Math.ceil(virtualClusters / ENTRIES_PER_TABLE_CLUSTER);
  const metaL1First = Math.floor(metaVirtCluster / ENTRIES_PER_TABLE_CLUSTER);
  const l2ForL1Index: number[] = [];
  for (let i = 0; i < l1Entries; i++) {
    if (i >= metaL1First || p.isL1IndexUsedByData(i)) l2ForL1Index.push(i);
  }
  const l1Clusters = Math.ceil((l1Entries * TABLE_ENTRY_BYTES) / CLUSTER_BYTES);
  const metaFirstCluster = 1 + p.dataClusters;
  const l2FirstCluster = metaFirstCluster + metaClusters;
  const l1FirstCluster = l2FirstCluster + l2ForL1Index.length;
  const refcountBlockFirstCluster = l1FirstCluster + l1Clusters;
  // Refcount blocks and table count themselves: iterate to the fixed point (converges in a couple of rounds).
  let refcountBlocks = 1;
  let refcountTableClusters = 1;
  for (let round = 0; round < 16; round++) {
    const total = refcountBlockFirstCluster + refcountBlocks + refcountTableClusters;
    const blocks = Math.ceil(total / REFCOUNTS_PER_BLOCK);
    const tableClusters = Math.ceil((blocks * TABLE_ENTRY_BYTES) / CLUSTER_BYTES);
    if (blocks === refcountBlocks && tableClusters === refcountTableClusters) break;
    refcountBlocks = blocks;
    refcountTableClusters = tableClusters;
  }
  const refcountTableFirstCluster = refcountBlockFirstCluster + refcountBlocks;
  const totalClusters = refcountTableFirstCluster + refcountTableClusters;
  assert(refcountBlocks * REFCOUNTS_PER_BLOCK >= totalClusters, 'layoutTail: refcount blocks do not converge');
  return {
    metaFirstCluster,
    metaClusters,
    l2FirstCluster,
    l2ForL1Index,
    l1FirstCluster,
    l1Clusters,
    l1Entries,
    refcountBlockFirstCluster,
    refcountBlocks,
    refcountTableFirstCluster,
    refcountTableClusters,
    totalClusters,
    virtualBytes,
    metaVirtOffsetBytes: p.metaVirtOffsetBytes,
  };
}

/** Fills refcount block `blockIndex` (one cluster in `dst`): refcount 1 for every cluster below totalClusters. */
export function fillRefcountBlock(dst: Uint8Array, blockIndex: number, totalClusters: number): void {
  dst.fill(0, 0, CLUSTER_BYTES);
  const first = blockIndex * REFCOUNTS_PER_BLOCK;
  const count = Math.min(REFCOUNTS_PER_BLOCK, totalClusters - first);
  // Big-endian 16-bit 1: low byte at the odd address.
  for (let i = 0; i < count; i++) dst[i * REFCOUNT_ENTRY_BYTES + 1] = 1;
}
