// `snap-pipe info`: what an image holds, for people (formatInfo) and scripts (JSON of ImageInfo).

import { popcount8 } from './bits.js';
import { formatBytes } from '../format.js';
import { printable } from '../text.js';
import { ImageReader, incompleteWhy } from './reader.js';
import { bitmapBytesOf, pagesOf } from './metadata.js';
import { CLUSTER_BYTES, type SnapshotMeta } from './types.js';
import { countSwitchoverStarts } from '../stream/switchover.js';

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

export function formatInfo(info: ImageInfo): string {
  const lines: string[] = [];
  lines.push(`image:          ${info.path}`);
  lines.push(`status:         ${info.complete ? 'complete' : `INCOMPLETE: ${incompleteWhy(info.failure)}`}`);
  lines.push(`format version: ${info.formatVersion}`);
  lines.push(`file size:      ${formatBytes(info.fileBytes)} (${formatBytes(info.clusterBytes)} clusters)`);
  if (!info.complete) return lines.map(printable).join('\n');
  if (info.machineType !== undefined) lines.push(`machine type:   ${info.machineType}`);
  if (info.virtualBytes !== undefined) lines.push(`virtual size:   ${formatBytes(info.virtualBytes)}`);
  if (info.dataClusters !== undefined) {
    lines.push(`data clusters:  ${info.dataClusters} (${formatBytes(info.dataClusters * info.clusterBytes)})`);
  }
  if (info.deviceStateBytes !== undefined) lines.push(`device state:   ${formatBytes(info.deviceStateBytes)}`);
  if (info.dataPages !== undefined) {
    lines.push(
      `pages:          ${info.dataPages} data, ${info.zeroPages ?? 0} zero, ${info.resentPages ?? 0} re-sent` +
        (info.sawRamEnd === undefined ? '' : info.sawRamEnd ? ' (migration with RAM end)' : ' (no RAM end section)'),
    );
  }
  if (info.capabilities !== undefined && info.capabilities.length > 0) {
    lines.push(`capabilities:   ${info.capabilities.join(', ')}`);
  }
  if (info.switchoverStarts) lines.push(`switch-over:    SWITCHOVER_START (QEMU 10.0 or later), replayed by load`);
  if (info.savedAt !== undefined) lines.push(`saved at:       ${info.savedAt}${info.writer ? ` by ${info.writer}` : ''}`);
  if (info.blocks !== undefined && info.blocks.length > 0) {
    lines.push('RAM blocks:');
    // A loop, not Math.max(...ids): spreading an image's block list into one call overflows the stack (150k blocks
    // did).
    const ids = info.blocks.map((b) => printable(b.id));
    let idWidth = 0;
    for (const id of ids) idWidth = Math.max(idWidth, id.length);
    info.blocks.forEach((b, i) => {
      lines.push(
        `  ${ids[i].padEnd(idWidth)}  ${formatBytes(b.lengthBytes).padStart(10)} at ${formatBytes(b.virtOffsetBytes).padStart(10)}` +
          `  ${b.dataPages} data, ${b.zeroPages} zero, ${b.unsentPages} unsent of ${b.pages} pages`,
      );
    });
  }
  // Every field read from the image (machine type, block names, writer, capabilities) with its control characters
  // escaped: each stays on its line and none reaches a terminal raw.
  return lines.map(printable).join('\n');
}
