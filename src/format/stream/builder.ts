// Encodes migration streams the way QEMU 7.2's savevm.c / ram.c write them: for tests, the perf generator, and
// (later) load. Appends into growing pieces; pure, no I/O.
import { PAGE_BYTES } from '../image/types.js';
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

const encoder = new TextEncoder();

export class StreamBuilder {
  private parts: Uint8Array[] = [];
  private cur: Uint8Array;
  private len = 0;
  private lastBlock: string | undefined;

  /** `chunkBytes`: the first piece's size (it grows by pieces); small for a single command. */
  constructor(chunkBytes = 1 << 16) {
    this.cur = new Uint8Array(chunkBytes);
  }

  private room(n: number): void {
    if (this.len + n <= this.cur.length) return;
    this.flushCur();
    if (n > this.cur.length) this.cur = new Uint8Array(n);
  }

  private flushCur(): void {
    if (this.len > 0) this.parts.push(this.cur.slice(0, this.len));
    this.len = 0;
  }

  u8(v: number): this {
    this.room(1);
    this.cur[this.len++] = v & 0xff;
    return this;
  }

  be16(v: number): this {
    return this.u8(v >>> 8).u8(v);
  }

  be32(v: number): this {
    this.room(4);
    this.cur[this.len++] = (v >>> 24) & 0xff;
    this.cur[this.len++] = (v >>> 16) & 0xff;
    this.cur[this.len++] = (v >>> 8) & 0xff;
    this.cur[this.len++] = v & 0xff;
    return this;
  }

  be64(v: number): this {
    return this.be32(Math.floor(v / 0x1_0000_0000)).be32(v >>> 0);
  }

  bytes(b: Uint8Array): this {
    this.room(b.length);
    this.cur.set(b, this.len);
    this.len += b.length;
    return this;
  }

  str8(s: string): this {
    const b = encoder.encode(s);
    return this.u8(b.length).bytes(b);
  }

  header(): this {
    return this.be32(QEVM_MAGIC).be32(QEVM_VERSION);
  }

  configuration(machineType: string, capabilities: string[] = []): this {
    const name = encoder.encode(machineType);
    this.u8(SEC_CONFIGURATION).be32(name.length).bytes(name);
    if (capabilities.length > 0) {
      this.u8(SEC_SUBSECTION).str8(SUB_CAPABILITIES).be32(1).be32(capabilities.length);
      for (const c of capabilities) this.str8(c);
    }
    return this;
  }

  sectionStart(type: number, id: number, idstr: string, instance: number, version: number): this {
    return this.u8(type).be32(id).str8(idstr).be32(instance).be32(version);
  }

  /** A COMMAND section: be16 command, be16 payload length, payload. */
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

  private recordHeader(block: string, offsetBytes: number, flags: number): void {
    if (block === this.lastBlock) {
      this.be64(offsetBytes + flags + RAM_CONTINUE);
    } else {
      this.be64(offsetBytes + flags).str8(block);
      this.lastBlock = block;
    }
  }

  page(block: string, offsetBytes: number, data: Uint8Array): this {
    if (data.length !== PAGE_BYTES) throw new RangeError(`page of ${data.length} bytes`);
    this.recordHeader(block, offsetBytes, RAM_PAGE);
    return this.bytes(data);
  }

  zero(block: string, offsetBytes: number): this {
    this.recordHeader(block, offsetBytes, RAM_ZERO);
    return this.u8(0);
  }

  ramPart(id: number): this {
    return this.u8(SEC_PART).be32(id);
  }

  ramEnd(id: number): this {
    return this.u8(SEC_END).be32(id);
  }

  /** Ends a ram PART/END payload: EOS and footer. */
  ramEos(id: number): this {
    return this.be64(RAM_EOS).footer(id);
  }

  /** A device FULL section with an opaque payload. */
  device(id: number, idstr: string, payload: Uint8Array, instance = 0, version = 1): this {
    return this.sectionStart(SEC_FULL, id, idstr, instance, version).bytes(payload).footer(id);
  }

  /** EOF followed by the VM description JSON. */
  eof(vmdesc: object | undefined = { page_size: PAGE_BYTES, devices: [] }): this {
    this.u8(SEC_EOF);
    if (vmdesc) {
      const json = encoder.encode(JSON.stringify(vmdesc));
      this.u8(SEC_VMDESCRIPTION).be32(json.length).bytes(json);
    }
    return this;
  }

  build(): Uint8Array {
    this.flushCur();
    const n = this.parts.reduce((a, p) => a + p.length, 0);
    const out = new Uint8Array(n);
    let at = 0;
    for (const p of this.parts) {
      out.set(p, at);
      at += p.length;
    }
    this.parts = [out];
    return out;
  }
}
