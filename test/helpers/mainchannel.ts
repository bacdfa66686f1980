// Reads the RAM part of a multifd migration's main channel, for the capture test only: the block list of ram START,
// the ZERO and PAGE records the main channel itself carries, and its sync points (EOS ends every RAM section;
// MULTIFD_FLUSH 0x200, QEMU 8.1+, stands alone). Stops at the first section that is not a RAM section or a
// command, where the device state begins. The product's parser refuses multifd streams (0x200) and stays so.
import {
  QEVM_MAGIC,
  RAM_CONTINUE,
  RAM_EOS,
  RAM_FLAGS_MASK,
  RAM_MEM_SIZE,
  RAM_MULTIFD_FLUSH,
  RAM_PAGE,
  RAM_ZERO,
  SEC_COMMAND,
  SEC_CONFIGURATION,
  SEC_END,
  SEC_FOOTER,
  SEC_PART,
  SEC_START,
  SEC_SUBSECTION,
} from '../../src/format/stream/constants.js';
import { PAGE_BYTES } from '../../src/format/units.js';

export interface MainChannelRam {
  machineType: string;
  blocks: { id: string; lengthBytes: number }[];
  /** Pages the main channel carries, by block: offset -> 'zero' or the data's position in the channel. */
  pages: Map<string, Map<number, 'zero' | number>>;
  eos: number;
  flushes: number;
  /** Sync records in stream order: 'E' (EOS) or 'F' (MULTIFD_FLUSH). */
  syncOrder: string;
  ramSections: number;
}

class Cursor {
  at = 0;
  constructor(readonly b: Uint8Array) {}
  u8(): number {
    if (this.at >= this.b.length) throw new Error(`main channel ends at byte ${this.at}`);
    return this.b[this.at++];
  }
  be16(): number {
    return (this.u8() << 8) | this.u8();
  }
  be32(): number {
    return ((this.be16() << 16) | this.be16()) >>> 0;
  }
  be64(): number {
    return this.be32() * 2 ** 32 + this.be32();
  }
  str(n: number): string {
    if (this.at + n > this.b.length) throw new Error(`main channel ends inside a name at byte ${this.at}`);
    const s = Buffer.from(this.b.subarray(this.at, this.at + n)).toString('latin1');
    this.at += n;
    return s;
  }
}

/** Machine type and subsections (configuration/capabilities, /uuid, /target-page-bits): skipped. */
function configuration(c: Cursor): string {
  c.u8();
  const machineType = c.str(c.be32());
  while (c.b[c.at] === SEC_SUBSECTION) {
    c.u8();
    const name = c.str(c.u8());
    c.be32();
    if (name === 'configuration/capabilities') {
      const n = c.be32();
      for (let i = 0; i < n; i++) c.str(c.u8());
    } else if (name === 'configuration/uuid') c.at += 16;
    else if (name === 'configuration/target-page-bits') c.be32();
    else throw new Error(`configuration subsection ${name}`);
  }
  return machineType;
}

/** ram.c ram_load_precopy's records up to EOS. */
function records(c: Cursor, out: MainChannelRam, ctx: { block: string }): void {
  for (let n = 0; n < 1e8; n++) {
    const word = c.be64();
    const flags = word % (RAM_FLAGS_MASK + 1);
    const addr = word - flags;
    if (flags === RAM_EOS) {
      out.eos++;
      out.syncOrder += 'E';
      return;
    }
    if (flags === RAM_MULTIFD_FLUSH) {
      out.flushes++;
      out.syncOrder += 'F';
      continue;
    }
    if ((flags & RAM_CONTINUE) === 0) ctx.block = c.str(c.u8());
    const page = flags & ~RAM_CONTINUE;
    const pages = out.pages.get(ctx.block) ?? new Map<number, 'zero' | number>();
    out.pages.set(ctx.block, pages);
    if (page === RAM_ZERO) {
      if (c.u8() !== 0) throw new Error(`a ZERO record with a fill byte at ${c.at}`);
      pages.set(addr, 'zero');
    } else if (page === RAM_PAGE) {
      pages.set(addr, c.at);
      c.at += PAGE_BYTES;
    } else throw new Error(`RAM record flags 0x${flags.toString(16)} at ${c.at - 8}`);
  }
}

function ramStart(c: Cursor, out: MainChannelRam): void {
  const total = c.be64();
  if (total % (RAM_FLAGS_MASK + 1) !== RAM_MEM_SIZE) throw new Error('ram START without MEM_SIZE');
  let sum = 0;
  while (sum < total - RAM_MEM_SIZE) {
    const id = c.str(c.u8());
    const lengthBytes = c.be64();
    out.blocks.push({ id, lengthBytes });
    sum += lengthBytes;
  }
}

export function readMainChannel(bytes: Uint8Array): MainChannelRam {
  const c = new Cursor(bytes);
  if (c.be32() !== QEVM_MAGIC || c.be32() !== 3) throw new Error('main channel: not a QEVM stream');
  const out: MainChannelRam = { machineType: '', blocks: [], pages: new Map(), eos: 0, flushes: 0, syncOrder: '', ramSections: 0 };
  if (bytes[c.at] === SEC_CONFIGURATION) out.machineType = configuration(c);
  const ctx = { block: '' };
  for (let n = 0; n < 1e6; n++) {
    const type = c.u8();
    if (type === SEC_COMMAND) {
      c.be16();
      const len = c.be16();
      c.at += len;
      continue;
    }
    if (type !== SEC_START && type !== SEC_PART && type !== SEC_END) return out;
    c.be32();
    if (type === SEC_START) {
      if (c.str(c.u8()) !== 'ram') throw new Error('a START section other than ram');
      c.be32();
      c.be32();
      ramStart(c, out);
    }
    records(c, out, ctx);
    if (c.u8() !== SEC_FOOTER) throw new Error(`no section footer at ${c.at - 1}`);
    c.be32();
    out.ramSections++;
  }
  throw new Error('main channel: too many sections');
}
