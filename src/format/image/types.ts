// The logical content of a snap-pipe image, shared by the writer (save) and the reader (info, load).
// Physical layout (QCOW2 v3, 1 MiB clusters) lives in qcow2.ts; the metadata encoding in metadata.ts.
import type { StreamParts } from '../stream/parts.js';

/**
 * Version of snap-pipe's own metadata; a reader refuses versions it does not know.
 * 1: cluster checksums were CRC-32 (zlib). 2: cluster checksums are CRC-32C (Castagnoli), which the CPU computes
 * ~7x faster here (native/fastmem.c); everything else is unchanged.
 */
export const FORMAT_VERSION = 2;

export interface RamBlockInfo {
  /** QEMU's RAMBlock idstr, e.g. "pc.ram". */
  id: string;
  /** used_length from the RAM setup, in bytes (a multiple of PAGE_BYTES). */
  lengthBytes: number;
  /** Where the block starts in the image's virtual disk; a multiple of CLUSTER_BYTES. */
  virtOffsetBytes: number;
  /** mr->addr, present only when the source had x-ignore-shared. */
  addr?: number;
}

/** Per-block page state at the end of a save. Bit i of a bitmap is page i (LSB-first within each byte). */
export interface BlockPages {
  /** The page was sent at least once (as data or zero). */
  sent: Uint8Array;
  /** The page's last version was data; its bytes are in the image. sent && !data: a zero page. */
  data: Uint8Array;
}

export interface SaveCounters {
  dataPages: number;
  zeroPages: number;
  /** Page records that repeated an earlier page (plain precopy re-sends dirty pages). */
  resentPages: number;
  streamBytes: number;
  dataClusters: number;
  /**
   * Clusters written more than once (partial chunks completed later, pages re-sent). Each rewrite moved the cluster's
   * checksum by the old content of the pages it overwrote (zeros, or read just before the write); nothing is read
   * back at finish.
   */
  rewrittenClusters: number;
}

/** Everything snap-pipe keeps besides the RAM pages themselves: the stream's verbatim parts, and its own records. */
export interface SnapshotMeta extends StreamParts {
  formatVersion: number;
  blocks: RamBlockInfo[];
  pages: BlockPages[];
  /**
   * CRC-32C of each 1 MiB cluster's final content, per block, per chunk. Chunks with no data cluster hold 0
   * and are not checked (the whole chunk reads as zeros).
   */
  chunkCrc32c: Uint32Array[];
  counters: SaveCounters;
  /** When the save finished (ISO 8601) and which snap-pipe version wrote it. */
  savedAt: string;
  writer: string;
}
