// The rules each QCOW2 table entry of a snap-pipe image must follow, and a record of which structure uses each host
// cluster, so that no cluster is reached twice. Pure; the reader does the I/O.
//
// QCOW2 facts (QEMU's docs/interop/qcow2.txt, "Cluster mapping" and "Host cluster management"; what qemu-img check
// reports, block/qcow2-refcount.c, seen from qemu-img 7.2 on images edited byte by byte):
//   - An L1 entry: bits 0-8 and 56-62 reserved (zero), bits 9-55 the offset of an L2 table (cluster aligned, 0: none),
//     bit 63 COPIED, set exactly when the L2 table's refcount is 1. qemu-img check: "ERROR found L1 entry with
//     reserved bits set", "ERROR OFLAG_COPIED L2 cluster" when COPIED disagrees with the refcount.
//   - A standard L2 entry: bit 0 "reads as zeros", bits 1-8 and 56-61 reserved, bits 9-55 the data cluster's offset,
//     bit 62 compressed (then the rest means something else), bit 63 COPIED as above. qemu-img check: "ERROR found
//     l2 entry with reserved bits set", "ERROR OFLAG_COPIED data cluster".
//   - A refcount table entry: bits 0-8 reserved, bits 9-63 the offset of a refcount block (cluster aligned, 0: none).
//   - A cluster's refcount is the number of references to it (header, L1 table, L2 tables, data clusters, refcount
//     table and blocks, and snapshots, which snap-pipe has none of): more is a leak, fewer is corruption ("ERROR
//     cluster N refcount=1 reference=2").
// snap-pipe writes every used cluster once, with refcount 1 and COPIED set, and never the zero or compressed flags.

import { CLUSTER_BYTES } from '../units.js';

/** An entry split into its high and low 32 bits (numbers, not BigInt: hot loops read 131072 per table). */
export interface Entry {
  hi: number;
  lo: number;
}

const HI_COPIED = 0x8000_0000;
const HI_COMPRESSED = 0x4000_0000;
/** Bits 56-62 of an L1 entry, 56-61 of an L2 entry. */
const HI_L1_RESERVED = 0x7f00_0000;
const HI_L2_RESERVED = 0x3f00_0000;
/** Bits 0-8 of an L1 entry, 1-8 of an L2 entry (bit 0 is the zero flag), 0-8 of a refcount table entry. */
const LO_L1_RESERVED = 0x1ff;
const LO_L2_RESERVED = 0x1fe;
const LO_ZERO = 1;
/** Bits 9-55: the host offset. */
const HI_OFFSET = 0x00ff_ffff;
const LO_OFFSET = 0xffff_fe00;

export function entryHex(e: Entry): string {
  return ((BigInt(e.hi >>> 0) << 32n) | BigInt(e.lo >>> 0)).toString(16);
}

/** The host offset an L1/L2 entry names (0: none). Exact: at most 2^56. */
export function entryOffset(e: Entry): number {
  return (e.hi & HI_OFFSET) * 0x1_0000_0000 + ((e.lo & LO_OFFSET) >>> 0);
}

/** The offset a refcount table entry names (bits 9-63; may exceed 2^53, then it is past any file anyway). */
export function refcountTableOffset(e: Entry): number {
  return (e.hi >>> 0) * 0x1_0000_0000 + ((e.lo & LO_OFFSET) >>> 0);
}

/**
 * What is wrong with the flags of an L1 entry (level 1) or a standard L2 entry (level 2), or undefined. A zero entry
 * is fine. The offset's alignment and range are the caller's to check.
 */
export function entryFault(e: Entry, level: 1 | 2): string | undefined {
  if (e.hi === 0 && e.lo === 0) return undefined;
  if (level === 2 && (e.hi & HI_COMPRESSED) !== 0) return 'a compressed cluster (snap-pipe writes none)';
  if (level === 2 && (e.lo & LO_ZERO) !== 0) return 'the zero flag set (snap-pipe writes none)';
  if ((e.hi & (level === 1 ? HI_L1_RESERVED : HI_L2_RESERVED)) !== 0 || (e.lo & (level === 1 ? LO_L1_RESERVED : LO_L2_RESERVED)) !== 0) {
    return 'reserved bits set';
  }
  if (entryOffset(e) === 0) return 'flags set but no cluster';
  if ((e.hi & HI_COPIED) === 0) return 'the COPIED flag clear, though every cluster has refcount 1';
  return undefined;
}

/** What is wrong with a refcount table entry, or undefined. A zero entry is fine. */
export function refcountTableEntryFault(e: Entry): string | undefined {
  if ((e.lo & LO_L1_RESERVED) !== 0) return 'reserved bits set';
  if (refcountTableOffset(e) % CLUSTER_BYTES !== 0) return 'an offset that is not cluster aligned';
  return undefined;
}

/** Which structure uses a host cluster. */
export const Use = {
  Free: 0,
  Header: 1,
  L1Table: 2,
  RefcountTable: 3,
  RefcountBlock: 4,
  L2Table: 5,
  Data: 6,
} as const;
export type Use = (typeof Use)[keyof typeof Use];

const USE_NAMES: Record<Use, string> = {
  [Use.Free]: 'unused',
  [Use.Header]: 'the header',
  [Use.L1Table]: 'the L1 table',
  [Use.RefcountTable]: 'the refcount table',
  [Use.RefcountBlock]: 'a refcount block',
  [Use.L2Table]: 'an L2 table',
  [Use.Data]: 'a data cluster',
};

export function useName(use: Use): string {
  return USE_NAMES[use];
}

/** One byte per host cluster of the file: which structure uses it. */
export class ClusterUse {
  private readonly use: Uint8Array;

  constructor(readonly clusters: number) {
    this.use = new Uint8Array(clusters);
  }

  /** Records that `use` takes `cluster`; returns what already took it (Use.Free if nothing did, and then records). */
  claim(cluster: number, use: Use): Use {
    const was = this.use[cluster] as Use;
    if (was === Use.Free) this.use[cluster] = use;
    return was;
  }

  usedBy(cluster: number): Use {
    return (cluster < this.clusters ? this.use[cluster] : Use.Free) as Use;
  }
}
