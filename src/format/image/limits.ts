// Every bound snap-pipe puts on what it reads from an image, in one place. An image may come from anyone: every
// size, count and offset read from one is checked against these and against the file's real size before anything
// is allocated or looped over, so the work and memory of `load`, `verify` and `info` are bounded by the figures
// below whatever the bytes say.
//
// The bounds follow from what snap-pipe itself can write: at most RAM_TOTAL_BYTES_MAX of RAM in at most BLOCKS_MAX
// blocks (the stream parser refuses more), laid out by layoutBlocks, followed by the metadata, and the tables
// layoutTail puts after them.
//
// What reading an image holds in memory, then (besides Node itself, about 50 MiB resident):
//   - one 1 MiB cluster of scratch, plus the reads in flight of load and verify (queue depth x 1 MiB);
//   - one byte per cluster of the file (which structure uses it): at most FILE_CLUSTERS_MAX bytes (16 MiB);
//   - per L2 table the image has, 512 KiB (the host cluster of each of its 131072 virtual clusters): at most
//     L1_ENTRIES_MAX of them (65 MiB), and never more than the file has clusters;
//   - the metadata once, at most META_BYTES_MAX and never more than the clusters mapped to it (so at most the file's
//     size), plus its JSON section parsed (at most JSON_SECTION_BYTES_MAX of text);
//   - load's and verify's lists of data clusters: one small object per data cluster mapped (at most the file's
//     clusters).

import { RAM_TOTAL_BYTES_MAX } from '../stream/parser.js';
import { ENTRIES_PER_TABLE_CLUSTER, layoutTail } from './qcow2.js';
import { CLUSTER_BYTES } from '../units.js';

/**
 * RAM blocks in one image. QEMU machines have tens (a pc guest: pc.ram, pc.bios, the VGA RAM, a few option ROMs
 * and ACPI tables); thousands would be a damaged block table. Load refuses more (checkStreamParts), and each block
 * costs the layout less than a cluster of rounding.
 */
export const BLOCKS_MAX = 4096;

/** A RAM block's name: QEMU's RAMBlock idstr is at most 255 characters, sent with a one-byte length. */
export const BLOCK_ID_BYTES_MAX = 255;

/**
 * snap-pipe's metadata: two page bitmaps (1 bit per 4 KiB page each: 2 x 512 MiB for 16 TiB of RAM), a CRC-32C per
 * 1 MiB cluster (64 MiB for 16 TiB) and the device state verbatim (megabytes for ordinary machines).
 */
export const META_BYTES_MAX = 2 ** 31;

/**
 * The metadata's JSON section: the block table (at most BLOCKS_MAX names of at most BLOCK_ID_BYTES_MAX bytes, each
 * byte at most 6 once escaped: under 7 MiB) and a few scalars. Bounds the heap JSON.parse can take.
 */
export const JSON_SECTION_BYTES_MAX = 8 << 20;

/** Virtual disk: all RAM, each block rounded up to whole clusters, then the metadata (16 TiB + 6 GiB). */
export const VIRTUAL_CLUSTERS_MAX = RAM_TOTAL_BYTES_MAX / CLUSTER_BYTES + BLOCKS_MAX + META_BYTES_MAX / CLUSTER_BYTES;
export const VIRTUAL_BYTES_MAX = VIRTUAL_CLUSTERS_MAX * CLUSTER_BYTES;

/** L1 entries for the largest virtual disk (one per 128 GiB): 129, in one L1 cluster. */
export const L1_ENTRIES_MAX = Math.ceil(VIRTUAL_CLUSTERS_MAX / ENTRIES_PER_TABLE_CLUSTER);

/** The host file of the largest image the writer lays out: every cluster of it a data or metadata cluster. */
const LARGEST = layoutTail({
  dataClusters: VIRTUAL_CLUSTERS_MAX - META_BYTES_MAX / CLUSTER_BYTES,
  metaVirtOffsetBytes: (VIRTUAL_CLUSTERS_MAX - META_BYTES_MAX / CLUSTER_BYTES) * CLUSTER_BYTES,
  metaBytes: META_BYTES_MAX,
  isL1IndexUsedByData: () => true,
});

/** Clusters of the host file (data, metadata, header, L1 and L2 tables, refcount blocks and table): 16 TiB + 6.2 GiB. */
export const FILE_CLUSTERS_MAX = LARGEST.totalClusters;
export const FILE_BYTES_MAX = FILE_CLUSTERS_MAX * CLUSTER_BYTES;

/** The refcount table of the largest image: one cluster (33 refcount blocks of 524288 refcounts cover the file). */
export const REFCOUNT_TABLE_CLUSTERS_MAX = LARGEST.refcountTableClusters;
