// What an image holds, as figures (ImageInfo): `snap-pipe info` prints them (commands/info.ts) or their JSON.

import { popcount8 } from '../format/image/bits.js';
import { ImageReader } from './reader.js';
import { bitmapBytesOf, pagesOf } from '../format/image/metadata.js';
import { type SnapshotMeta } from '../format/image/types.js';
import { CLUSTER_BYTES } from '../format/units.js';
import { countSwitchoverStarts } from '../format/stream/switchover.js';

export interface BlockSummary {
  id: string;
  lengthBytes: number;
  virtOffsetBytes: number;
  pages: number;
  /** Pages whose last version was data. */
  dataPages: number;
  /** Pages whose last version was a zero page. */
  zeroPages: number;
  /** Pages never sent (read as zeros). */
  unsentPages: number;
}

export interface ImageInfo {
  path: string;
  complete: boolean;
  /** An incomplete image: why its save failed, when the save could record it. */
  failure?: string;
  formatVersion: number;
  machineType?: string;
  fileBytes: number;
  virtualBytes?: number;
  clusterBytes: number;
  /** Data clusters mapped in the image (complete images only). */
  dataClusters?: number;
  metadataBytes?: number;
  deviceStateBytes?: number;
  blocks?: BlockSummary[];
  /** Save counters: page records seen in the stream. */
  dataPages?: number;
  zeroPages?: number;
  resentPages?: number;
  streamBytes?: number;
  savedAt?: string;
  writer?: string;
  sawRamEnd?: boolean;
  capabilities?: string[];
  /** SWITCHOVER_START commands the source sent (QEMU 10.0+ with a machine type of 10.0 or later), replayed by load. */
  switchoverStarts?: number;
}

/** Counts set bits among the first `bits` bits (LSB-first within each byte). */
function countBits(bitmap: Uint8Array, bits: number, mask?: Uint8Array, invertMask = false): number {
  let n = 0;
  const full = Math.floor(bits / 8);
  for (let i = 0; i < full; i++) {
    let b = bitmap[i];
    if (mask) b &= invertMask ? ~mask[i] & 0xff : mask[i];
    n += popcount8(b);
  }
  const rest = bits % 8;
  if (rest !== 0) {
    let b = bitmap[full] & ((1 << rest) - 1);
    if (mask) b &= invertMask ? ~mask[full] & 0xff : mask[full];
    n += popcount8(b);
  }
  return n;
}

export function summarizeBlocks(meta: SnapshotMeta): BlockSummary[] {
  return meta.blocks.map((b, i) => {
    const pages = pagesOf(b);
    const { sent, data } = meta.pages[i];
    if (sent.byteLength < bitmapBytesOf(b) || data.byteLength < bitmapBytesOf(b)) throw new RangeError('bitmap too short');
    const sentPages = countBits(sent, pages);
    const dataPages = countBits(data, pages, sent);
    return {
      id: b.id,
      lengthBytes: b.lengthBytes,
      virtOffsetBytes: b.virtOffsetBytes,
      pages,
      dataPages,
      zeroPages: sentPages - dataPages,
      unsentPages: pages - sentPages,
    };
  });
}

/** Works on incomplete images too (complete: false, only what the header says). */
export function readInfo(path: string): ImageInfo {
  const reader = ImageReader.open(path, { allowIncomplete: true });
  try {
    const info: ImageInfo = {
      path,
      complete: reader.complete,
      formatVersion: reader.formatVersion,
      fileBytes: reader.fileBytes,
      clusterBytes: CLUSTER_BYTES,
    };
    if (reader.failure !== undefined) info.failure = reader.failure;
    const meta = reader.meta;
    if (!reader.complete || meta === undefined) return info;
    info.machineType = meta.machineType;
    info.virtualBytes = reader.virtualBytes;
    info.dataClusters = reader.dataClusters;
    info.metadataBytes = reader.metaBytes;
    info.deviceStateBytes = meta.deviceState.byteLength;
    info.blocks = summarizeBlocks(meta);
    info.dataPages = meta.counters.dataPages;
    info.zeroPages = meta.counters.zeroPages;
    info.resentPages = meta.counters.resentPages;
    info.streamBytes = meta.counters.streamBytes;
    info.savedAt = meta.savedAt;
    info.writer = meta.writer;
    info.sawRamEnd = meta.sawRamEnd;
    info.capabilities = meta.capabilities;
    info.switchoverStarts = countSwitchoverStarts(meta.switchoverCommands) ?? 0;
    return info;
  } finally {
    reader.close();
  }
}
