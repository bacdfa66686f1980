// Which pages a load sends, from the image's page bitmaps (the read plan itself, which clusters hold data and in
// which order the file is read, is image/checks.ts planReads, shared with verify). A page is
//   data   sent at save and its last version had content: a PAGE record from its cluster,
//   zero   sent at save and its last version was zero: a ZERO record, no read,
//   unsent never sent at save: precopy leaves it out; postcopy sends it as zero (ADVISE wiped the destination).
// Pure: bitmaps in, page numbers out.
import { pagesOf } from '../format/image/metadata.js';
import { type SnapshotMeta } from '../format/image/types.js';
import { PAGES_PER_CHUNK } from '../format/units.js';
import { validMask, type DataChunk } from '../image/checks.js';

/** Whether page `page` of block `block` is a data page. */
export function isDataPage(meta: SnapshotMeta, block: number, page: number): boolean {
  const { sent, data } = meta.pages[block];
  const i = page >>> 3;
  const bit = 1 << (page & 7);
  return (sent[i] & data[i] & bit) !== 0;
}

/** Calls `visit` for every zero page, in block order then page order. */
export function forEachZeroPage(meta: SnapshotMeta, visit: (block: number, page: number) => void): void {
  meta.blocks.forEach((b, bi) => {
    const pages = pagesOf(b);
    const { sent, data } = meta.pages[bi];
    const bytes = Math.ceil(pages / 8);
    for (let i = 0; i < bytes; i++) {
      let z = sent[i] & ~data[i] & validMask(i, pages);
      // Bounded by the 8 bits of z.
      while (z !== 0) {
        const bit = 31 - Math.clz32(z & -z);
        z &= z - 1;
        visit(bi, i * 8 + bit);
      }
    }
  });
}

/** The data pages of chunk `ch`, ascending, into `list`; returns how many. */
export function dataPagesOf(meta: SnapshotMeta, ch: DataChunk, list: Int32Array): number {
  const pages = pagesOf(meta.blocks[ch.block]);
  const { sent, data } = meta.pages[ch.block];
  const firstPage = ch.chunk * PAGES_PER_CHUNK;
  const lastByte = Math.ceil(Math.min(firstPage + PAGES_PER_CHUNK, pages) / 8);
  let n = 0;
  for (let i = firstPage / 8; i < lastByte; i++) {
    let d = sent[i] & data[i] & validMask(i, pages);
    // Bounded by the 8 bits of d.
    while (d !== 0) {
      const bit = 31 - Math.clz32(d & -d);
      d &= d - 1;
      list[n++] = i * 8 + bit;
    }
  }
  return n;
}
