// What load relies on in an image besides its QCOW2 structure (which ImageReader.open checks), checked before the
// first byte goes out: the verbatim stream parts make a stream around the pages (checkStreamParts), and every chunk
// with data pages has a cluster (planReads). load, load --postcopy and verify all call checkImage, so an image
// verify passes is one load accepts, and load refuses what verify refuses.

import { SnapPipeError } from '../errors.js';
import { popcount8 } from '../format/image/bits.js';
import { BLOCK_ID_BYTES_MAX, BLOCKS_MAX } from '../format/image/limits.js';
import { chunksOf, pagesOf } from '../format/image/metadata.js';
import type { ImageReader } from './reader.js';
import { type SnapshotMeta } from '../format/image/types.js';
import { CLUSTER_BYTES, PAGES_PER_CHUNK } from '../format/units.js';
import {
  CAP_IGNORE_SHARED,
  QEVM_MAGIC,
  QEVM_VERSION,
  RAM_EOS,
  RAM_IDSTR,
  RAM_MEM_SIZE,
  SEC_CONFIGURATION,
  SEC_EOF,
  SEC_FOOTER,
  SEC_FULL,
  SEC_START,
} from '../format/stream/constants.js';
import { checkDeviceStateEnd } from '../format/stream/parser.js';
import { countSwitchoverStarts } from '../format/stream/switchover.js';

const TWO_32 = 0x1_0000_0000;

/** Everything load checks in an opened image before it writes anything; returns what it will read. */
export function checkImage(reader: ImageReader): { meta: SnapshotMeta; plan: Plan } {
  const meta = reader.meta;
  if (meta === undefined) throw new SnapPipeError('INCOMPLETE', `${reader.path}: no metadata (an incomplete image)`);
  checkStreamParts(reader.path, meta);
  return { meta, plan: planReads(reader.path, reader, meta) };
}

export function damaged(path: string, what: string): SnapPipeError {
  return new SnapPipeError('BAD_IMAGE', `${path}: metadata damaged: ${what}`);
}

/** Big-endian cursor over a verbatim stream part; running off the end is `fail`. */
class Cursor {
  at = 0;
  constructor(
    private readonly b: Uint8Array,
    private readonly fail: (what: string) => SnapPipeError,
  ) {}
  need(n: number, what: string): void {
    if (this.at + n > this.b.length) throw this.fail(`${what} runs past the end`);
  }
  u8(what: string): number {
    this.need(1, what);
    return this.b[this.at++];
  }
  be32(what: string): number {
    this.need(4, what);
    const b = this.b;
    const v = ((b[this.at] << 24) | (b[this.at + 1] << 16) | (b[this.at + 2] << 8) | b[this.at + 3]) >>> 0;
    this.at += 4;
    return v;
  }
  be64(what: string): number {
    const hi = this.be32(what);
    return hi * TWO_32 + this.be32(what);
  }
  str8(what: string): string {
    const n = this.u8(what);
    this.need(n, what);
    const s = new TextDecoder('latin1').decode(this.b.subarray(this.at, this.at + n));
    this.at += n;
    return s;
  }
  get rest(): number {
    return this.b.length - this.at;
  }
}

/** The verbatim parts must be what the stream needs around the pages: a header, the RAM setup for these blocks, an end. */
export function checkStreamParts(path: string, meta: SnapshotMeta): void {
  const bad = (what: string) => damaged(path, what);
  if (meta.blocks.length === 0) throw bad('no RAM blocks');
  if (meta.blocks.length > BLOCKS_MAX) throw bad(`${meta.blocks.length} RAM blocks`);

  const h = new Cursor(meta.head, (w) => bad(`stream header: ${w}`));
  if (h.be32('magic') !== QEVM_MAGIC || h.be32('version') !== QEVM_VERSION) throw bad('stream header is not QEVM version 3');
  if (h.rest > 0 && h.u8('configuration') !== SEC_CONFIGURATION) throw bad('stream header: unexpected bytes after the file header');

  // ram START: header, MEM_SIZE + block list matching the block table, EOS, footer.
  const id = meta.ramSectionId;
  const s = new Cursor(meta.ramSetup, (w) => bad(`RAM setup section: ${w}`));
  if (s.u8('section type') !== SEC_START || s.be32('section id') !== id || s.str8('section name') !== RAM_IDSTR) {
    throw bad(`RAM setup section is not a ram START section with id ${id}`);
  }
  s.be32('instance id');
  if (s.be32('version id') !== meta.ramVersionId) throw bad('RAM setup section version differs from the block table');
  const sizeRecord = s.be64('MEM_SIZE record');
  if ((sizeRecord % 4096) !== RAM_MEM_SIZE) throw bad('RAM setup section does not start with MEM_SIZE');
  const totalBytes = sizeRecord - RAM_MEM_SIZE;
  const ignoreShared = meta.capabilities.includes(CAP_IGNORE_SHARED);
  let sum = 0;
  for (const b of meta.blocks) {
    const name = s.str8('block name');
    const lengthBytes = s.be64('block length');
    const addr = ignoreShared ? s.be64('block address') : undefined;
    if (name !== b.id || lengthBytes !== b.lengthBytes || addr !== b.addr) {
      throw bad(`RAM setup section names ${name} (${lengthBytes} bytes) where the block table has ${b.id} (${b.lengthBytes} bytes)`);
    }
    if (b.id.length > BLOCK_ID_BYTES_MAX) throw bad(`block name of ${b.id.length} bytes`);
    sum += lengthBytes;
  }
  if (sum !== totalBytes) throw bad(`RAM setup announces ${totalBytes} bytes, the blocks add up to ${sum}`);
  if (s.be64('EOS') !== RAM_EOS || s.u8('footer') !== SEC_FOOTER || s.be32('footer id') !== id || s.rest !== 0) {
    throw bad('RAM setup section does not end with EOS and its footer');
  }

  if (countSwitchoverStarts(meta.switchoverCommands) === null) {
    throw bad(`switch-over commands (${meta.switchoverCommands.length} bytes) are not SWITCHOVER_START commands`);
  }

  const dev = meta.deviceState;
  if (dev.length === 0 || (dev[0] !== SEC_FULL && dev[0] !== SEC_EOF)) throw bad('device state does not start with a device section or EOF');
  try {
    checkDeviceStateEnd(dev, 0);
  } catch (err) {
    if (err instanceof SnapPipeError) throw bad('device state does not end with EOF (and a VM description)');
    throw err;
  }
}

export interface DataChunk {
  hostOffsetBytes: number;
  block: number;
  chunk: number;
  pages: number;
}

/** Bits of page i's byte that are valid pages of the block (the last byte may be partial). */
export function validMask(byteIndex: number, pages: number): number {
  const rest = pages - byteIndex * 8;
  return rest >= 8 ? 0xff : (1 << rest) - 1;
}

export interface Plan {
  chunks: DataChunk[];
  dataPages: number;
  zeroPages: number;
  unsentPages: number;
}

/** Every chunk with data pages must have a cluster; sorted by host offset so the file is read front to back. */
export function planReads(path: string, reader: ImageReader, meta: SnapshotMeta): Plan {
  const chunks: DataChunk[] = [];
  let dataPages = 0;
  let zeroPages = 0;
  let unsentPages = 0;
  meta.blocks.forEach((b, bi) => {
    const pages = pagesOf(b);
    const { sent, data } = meta.pages[bi];
    const chunkCount = chunksOf(b);
    for (let c = 0; c < chunkCount; c++) {
      let n = 0;
      const first = (c * PAGES_PER_CHUNK) / 8;
      const last = Math.ceil(Math.min((c + 1) * PAGES_PER_CHUNK, pages) / 8);
      for (let i = first; i < last; i++) {
        const m = validMask(i, pages);
        const d = sent[i] & data[i] & m;
        n += popcount8(d);
        zeroPages += popcount8(sent[i] & ~data[i] & m);
        unsentPages += popcount8(~sent[i] & m);
      }
      if (n === 0) continue;
      dataPages += n;
      const host = reader.hostOffsetOf(b.virtOffsetBytes / CLUSTER_BYTES + c);
      if (host === undefined) {
        throw damaged(path, `block ${b.id} chunk ${c} has ${n} data pages but no cluster in the image`);
      }
      chunks.push({ hostOffsetBytes: host, block: bi, chunk: c, pages: n });
    }
  });
  chunks.sort((x, y) => x.hostOffsetBytes - y.hostOffsetBytes);
  for (let i = 1; i < chunks.length; i++) {
    if (chunks[i].hostOffsetBytes === chunks[i - 1].hostOffsetBytes) {
      throw damaged(path, `two chunks share the cluster at byte ${chunks[i].hostOffsetBytes}`);
    }
  }
  return { chunks, dataPages, zeroPages, unsentPages };
}
