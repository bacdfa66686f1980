// The one encoder of QEMU's migration stream (the framing of savevm.c and ram.c, QEMU 7.2 to 10.2). It fills a
// buffer allocated at construction and hands it to a sink when the next piece does not fit or on flush(); the sink
// decides where the bytes go: a GrowableSink keeps them in memory (StreamBuilder: tests, the perf generator, the
// small pieces of commands.ts), load's PipeSink (src/load/pipe.ts) writes them to QEMU's pipe. Pure: no I/O here.
//
//   file header   be32 "QEVM", be32 3
//   CONFIGURATION u8 0x07, be32 length, machine type, [SUBSECTION u8 0x05, str8 name, be32 version, payload]
//   START / FULL  u8 type, be32 section id, str8 idstr, be32 instance, be32 version, payload, u8 0x7e, be32 id
//   PART / END    u8 type, be32 section id, payload, u8 0x7e, be32 id
//   ram payload   records, then be64 EOS; a record is be64 (offset in the block | flags), then, unless the flags
//                 have CONTINUE (same block as the record before), str8 block name; then ZERO: u8 0, PAGE: 4 KiB
//   COMMAND       u8 0x08, be16 command, be16 length, payload (commands.ts: each command)
//   end           u8 EOF, [u8 VMDESCRIPTION, be32 length, JSON]
//
// str8 is a u8 length and that many bytes. Names (machine type, section, block and capability names) are bytes on
// the wire, and the parser decodes them as latin1: they are encoded as latin1 here, one byte per character, so a
// name decoded from a stream is written back byte for byte. A character above U+00FF cannot come from a stream and
// is a RangeError, as is a name of more than 255 bytes (QEMU asserts that too).
import { PAGE_BYTES } from '../units.js';
import {
  QEVM_MAGIC,
  QEVM_VERSION,
  RAM_CONTINUE,
  RAM_EOS,
  RAM_MEM_SIZE,
  RAM_PAGE,
  RAM_VERSION,
  RAM_ZERO,
  SEC_COMMAND,
  SEC_CONFIGURATION,
  SEC_END,
  SEC_EOF,
  SEC_FOOTER,
  SEC_FULL,
  SEC_PART,
  SEC_START,
  SEC_SUBSECTION,
  SEC_VMDESCRIPTION,
  SUB_CAPABILITIES,
} from './constants.js';

const TWO_32 = 0x1_0000_0000;
const NAME_BYTES_MAX = 255;
/** The longest record header: be64, str8 name. */
export const RECORD_HEAD_BYTES_MAX = 8 + 1 + NAME_BYTES_MAX;
/** A PART/END header (u8 type, be32 id) and tail (be64 EOS, u8 footer, be32 id). */
export const PART_HEAD_BYTES = 5;
export const PART_TAIL_BYTES = 8 + 5;
const utf8 = new TextEncoder();

/** Where an encoder's bytes go. Every byte handed over is taken, or the call throws. */
export interface ByteSink {
  /** Takes buf[0, len); the encoder reuses buf once the call returns. */
  write(buf: Uint8Array, len: number): void;
  /** Takes the pieces in order, `total` bytes in all; they are only valid during the call. */
  writev(pieces: Uint8Array[], total: number): void;
  /** A write failed part-way: the stream is cut inside a piece, and nothing more may be written. */
  readonly broken: boolean;
}

/** Keeps everything in memory, in pieces, until bytes() joins them. */
export class GrowableSink implements ByteSink {
  readonly broken = false;
  private parts: Uint8Array[] = [];

  write(buf: Uint8Array, len: number): void {
    this.parts.push(buf.slice(0, len));
  }

  writev(pieces: Uint8Array[]): void {
    for (const p of pieces) if (p.length > 0) this.parts.push(p.slice());
  }

  /** Everything taken so far, as one array (kept as the first piece: writing may go on). */
  bytes(): Uint8Array {
    const out = new Uint8Array(this.parts.reduce((a, p) => a + p.length, 0));
    let at = 0;
    for (const p of this.parts) {
      out.set(p, at);
      at += p.length;
    }
    this.parts = [out];
    return out;
  }
}

export class StreamEncoder {
  private buf: Uint8Array;
  private len = 0;
  /** End of the last whole section or verbatim part in buf (what flushAfterFailure keeps). */
  private sectionEnd = 0;
  /** Block of the last record: the next record of that block says CONTINUE instead of its name. */
  private lastBlock: string | undefined;
  /** ram sections ended (ramEos) so far. */
  sections = 0;

  /** `bufferBytes`: the buffer's size; it only grows for a single piece larger than that (see room). */
  constructor(
    private readonly sink: ByteSink,
    bufferBytes = 1 << 16,
  ) {
    this.buf = new Uint8Array(bufferBytes);
  }

  /** Bytes buffered, not yet handed to the sink. */
  get buffered(): number {
    return this.len;
  }

  /** Makes n bytes fit contiguously: flushes what is buffered if they do not fit after it. */
  room(n: number): this {
    if (this.len + n <= this.buf.length) return this;
    this.flush();
    if (n > this.buf.length) this.buf = new Uint8Array(n);
    return this;
  }

  flush(): void {
    if (this.len === 0) return;
    this.sink.write(this.buf, this.len);
    this.len = 0;
    this.sectionEnd = 0;
  }

  /** Best effort after a failure: hands over the whole sections buffered (the one in progress is dropped). */
  flushAfterFailure(): void {
    if (this.sink.broken) return;
    this.len = this.sectionEnd;
    try {
      this.flush();
    } catch {
      // the failure being reported matters more
    }
  }

  // -------------------------------------------------------------------------------------------------------------
  // Primitives

  u8(v: number): this {
    this.room(1);
    this.buf[this.len++] = v & 0xff;
    return this;
  }

  be16(v: number): this {
    return this.u8(v >>> 8).u8(v);
  }

  be32(v: number): this {
    this.room(4);
    const b = this.buf;
    let i = this.len;
    b[i++] = v >>> 24;
    b[i++] = (v >>> 16) & 0xff;
    b[i++] = (v >>> 8) & 0xff;
    b[i++] = v & 0xff;
    this.len = i;
    return this;
  }

  be64(v: number): this {
    return this.be32(Math.floor(v / TWO_32)).be32(v >>> 0);
  }

  /** Bytes of any size, copied through the buffer. */
  bytes(b: Uint8Array): this {
    let at = 0;
    while (at < b.length) {
      if (this.len === this.buf.length) this.flush();
      const n = Math.min(b.length - at, this.buf.length - this.len);
      this.buf.set(at === 0 && n === b.length ? b : b.subarray(at, at + n), this.len);
      this.len += n;
      at += n;
    }
    return this;
  }

  /** Verbatim stream bytes that end where a section ends (a saved header, RAM setup or device state). */
  verbatim(b: Uint8Array): this {
    this.bytes(b);
    this.sectionEnd = this.len;
    return this;
  }

  /** A name as latin1, one byte per character, without a length (see the top of this file). */
  latin1(s: string): this {
    this.room(s.length);
    const b = this.buf;
    let i = this.len;
    for (let k = 0; k < s.length; k++) {
      const c = s.charCodeAt(k);
      if (c > 0xff) throw new RangeError(`name ${JSON.stringify(s)}: U+${c.toString(16).padStart(4, '0')} is not a latin1 byte`);
      b[i++] = c;
    }
    this.len = i;
    return this;
  }

  /** u8 length, then the name as latin1. */
  str8(s: string): this {
    if (s.length > NAME_BYTES_MAX) throw new RangeError(`name of ${s.length} bytes (at most ${NAME_BYTES_MAX})`);
    this.room(1 + s.length);
    return this.u8(s.length).latin1(s);
  }

  // -------------------------------------------------------------------------------------------------------------
  // Sections

  header(): this {
    return this.be32(QEVM_MAGIC).be32(QEVM_VERSION);
  }

  configuration(machineType: string, capabilities: string[] = []): this {
    this.u8(SEC_CONFIGURATION).be32(machineType.length).latin1(machineType);
    if (capabilities.length > 0) {
      this.u8(SEC_SUBSECTION).str8(SUB_CAPABILITIES).be32(1).be32(capabilities.length);
      for (const c of capabilities) this.str8(c);
    }
    return this;
  }

  sectionStart(type: number, id: number, idstr: string, instance: number, version: number): this {
    return this.u8(type).be32(id).str8(idstr).be32(instance).be32(version);
  }

  /** A COMMAND section: be16 command, be16 payload length, payload (commands.ts encodes each command). */
  command(cmd: number, payload: Uint8Array = new Uint8Array(0)): this {
    if (payload.length > 0xffff) throw new RangeError(`command payload of ${payload.length} bytes`);
    return this.u8(SEC_COMMAND).be16(cmd).be16(payload.length).bytes(payload);
  }

  footer(id: number): this {
    return this.u8(SEC_FOOTER).be32(id);
  }

  /** ram START: MEM_SIZE, the block list, EOS, footer. */
  ramSetup(id: number, blocks: { id: string; lengthBytes: number; addr?: number }[]): this {
    const total = blocks.reduce((a, b) => a + b.lengthBytes, 0);
    this.sectionStart(SEC_START, id, 'ram', 0, RAM_VERSION).be64(total + RAM_MEM_SIZE);
    for (const b of blocks) {
      this.str8(b.id).be64(b.lengthBytes);
      if (b.addr !== undefined) this.be64(b.addr);
    }
    return this.be64(RAM_EOS).footer(id);
  }

  /**
   * A ram PART header. 'continue': the first record may say CONTINUE after the last section's block, as QEMU's
   * own records do. 'name-first': the first record names its block, so the section stands on its own (another
   * encoder may write to the same stream in between).
   */
  ramPart(id: number, chain: 'continue' | 'name-first' = 'continue'): this {
    if (chain === 'name-first') this.lastBlock = undefined;
    return this.u8(SEC_PART).be32(id);
  }

  ramEnd(id: number): this {
    return this.u8(SEC_END).be32(id);
  }

  /** Ends a ram PART/END payload: EOS and footer; a whole section is buffered. */
  ramEos(id: number): this {
    this.be64(RAM_EOS).footer(id);
    this.sections++;
    this.sectionEnd = this.len;
    return this;
  }

  /** A device FULL section with an opaque payload. */
  device(id: number, idstr: string, payload: Uint8Array, instance = 0, version = 1): this {
    return this.sectionStart(SEC_FULL, id, idstr, instance, version).bytes(payload).footer(id);
  }

  /** EOF followed by the VM description JSON (UTF-8). */
  eof(vmdesc: object | undefined = { page_size: PAGE_BYTES, devices: [] }): this {
    this.u8(SEC_EOF);
    if (vmdesc) {
      const json = utf8.encode(JSON.stringify(vmdesc));
      this.u8(SEC_VMDESCRIPTION).be32(json.length).bytes(json);
    }
    return this;
  }

  // -------------------------------------------------------------------------------------------------------------
  // RAM records

  private recordHeader(block: string, offsetBytes: number, flags: number): void {
    if (block === this.lastBlock) {
      this.be64(offsetBytes + flags + RAM_CONTINUE);
      return;
    }
    this.be64(offsetBytes + flags).str8(block);
    this.lastBlock = block;
  }

  /** A PAGE record: the page at src[srcOffBytes, +4 KiB). */
  page(block: string, offsetBytes: number, src: Uint8Array, srcOffBytes = 0): this {
    const data = src.subarray(srcOffBytes, srcOffBytes + PAGE_BYTES);
    if (data.length !== PAGE_BYTES) throw new RangeError(`page of ${data.length} bytes`);
    this.recordHeader(block, offsetBytes, RAM_PAGE);
    return this.bytes(data);
  }

  zero(block: string, offsetBytes: number): this {
    this.recordHeader(block, offsetBytes, RAM_ZERO);
    return this.u8(0);
  }

  /**
   * One whole PART section (naming its block first) of the pages `pages[0, count)` of `block`, whose data lies in
   * `src` from page `firstPage` on. What was buffered goes first; then the section goes to the sink in one writev:
   * the record headers from the buffer, the page data straight from `src`, never copied.
   */
  pagesSection(id: number, block: string, src: Uint8Array, firstPage: number, pages: Int32Array, count: number): void {
    this.flush();
    this.room(PART_HEAD_BYTES + count * RECORD_HEAD_BYTES_MAX + PART_TAIL_BYTES);
    this.ramPart(id, 'name-first');
    const pieces: Uint8Array[] = [];
    let cut = 0;
    for (let i = 0; i < count; i++) {
      const p = pages[i];
      this.recordHeader(block, p * PAGE_BYTES, RAM_PAGE);
      pieces.push(this.buf.subarray(cut, this.len));
      const at = (p - firstPage) * PAGE_BYTES;
      pieces.push(src.subarray(at, at + PAGE_BYTES));
      cut = this.len;
    }
    this.ramEos(id);
    pieces.push(this.buf.subarray(cut, this.len));
    this.sink.writev(pieces, this.len + count * PAGE_BYTES);
    this.len = 0;
    this.sectionEnd = 0;
  }
}

/** The encoder over a GrowableSink: build() returns everything encoded so far. */
export class StreamBuilder extends StreamEncoder {
  private readonly memory: GrowableSink;

  /** `bufferBytes`: small for a single command. */
  constructor(bufferBytes = 1 << 16) {
    const memory = new GrowableSink();
    super(memory, bufferBytes);
    this.memory = memory;
  }

  build(): Uint8Array {
    this.flush();
    return this.memory.bytes();
  }
}
