// The one stream encoder: names written the way the parser reads them (latin1, byte for byte), and its two ways of
// writing pages (records copied through the buffer, or a whole section handed over as pieces) giving the same bytes.
import { describe, expect, it } from 'vitest';
import { StreamBuilder, StreamEncoder, type ByteSink } from '../../src/format/stream/encoder.js';
import { buildStream, pageContent, sequentialOps, type BlockSpec } from '../helpers/model.js';
import { parseAll } from '../helpers/parse.js';

/** Every non-ASCII byte QEMU could put in a name, C1 controls included. */
const HIGH = Array.from({ length: 128 }, (_, i) => String.fromCharCode(0x80 + i)).join('');

describe('StreamEncoder names', () => {
  it('a block name and a machine type with non-ASCII bytes round-trip through the parser, byte for byte', () => {
    const blocks: BlockSpec[] = [
      { id: 'pc.ram', lengthBytes: 1 << 20 },
      { id: `/rom@etc/\xe9t\xe9\x9b${HIGH.slice(0, 100)}`, lengthBytes: 64 << 10 },
      { id: HIGH.slice(100), lengthBytes: 8 << 10 },
    ];
    const machine = 'pc-i440fx-7.2-\xfc\x80\xff';
    const m = buildStream(blocks, sequentialOps(blocks, 3), { machineType: machine, ramEnd: true });
    const c = parseAll(m.bytes);
    expect(c.parsed.blocks.map((b) => b.id)).toEqual(blocks.map((b) => b.id));
    expect(c.parsed.machineType).toBe(machine);
    c.ram.forEach((r, i) => expect(Buffer.compare(r, m.ram[i]), `block ${i}`).toBe(0));
    // On the wire: one byte per character, the name's latin1 bytes.
    const wire = Buffer.from(m.bytes);
    expect(wire.indexOf(Buffer.from(blocks[1].id, 'latin1'))).toBeGreaterThan(0);
    expect(wire.indexOf(Buffer.from(blocks[1].id, 'utf8'))).toBe(-1);
  });

  it('refuses what no stream can hold: a character above U+00FF, a name over 255 bytes', () => {
    expect(() => new StreamBuilder().str8('pc.r\u0100m')).toThrow(RangeError);
    expect(() => new StreamBuilder().zero('\u{1f600}', 0)).toThrow(RangeError);
    expect(() => new StreamBuilder().configuration('pc-\u2028')).toThrow(RangeError);
    expect(() => new StreamBuilder().str8('x'.repeat(256))).toThrow(RangeError);
    expect(new StreamBuilder().str8('x'.repeat(255)).build().length).toBe(256);
  });
});

/** A sink that records what it was handed, and how. */
class RecordingSink implements ByteSink {
  readonly broken = false;
  chunks: Uint8Array[] = [];
  writes = 0;
  writevs = 0;
  write(buf: Uint8Array, len: number): void {
    this.writes++;
    this.chunks.push(buf.slice(0, len));
  }
  writev(pieces: Uint8Array[], total: number): void {
    this.writevs++;
    const joined = Buffer.concat(pieces);
    expect(joined.length).toBe(total);
    this.chunks.push(new Uint8Array(joined));
  }
  get bytes(): Buffer {
    return Buffer.concat(this.chunks);
  }
}

describe('StreamEncoder sinks', () => {
  const cluster = new Uint8Array(16 * 4096);
  for (let p = 0; p < 16; p++) cluster.set(pageContent(p + 1), p * 4096);
  const pages = Int32Array.from([32, 33, 35, 47]);

  it('pagesSection gives the bytes of a PART of page records, in one writev after what was buffered', () => {
    const sink = new RecordingSink();
    const e = new StreamEncoder(sink, 1 << 20);
    e.header().ramPart(2).zero('pc.ram', 0).ramEos(2);
    e.pagesSection(2, 'pc.ram', cluster, 32, pages, pages.length);
    expect(sink.writes).toBe(1);
    expect(sink.writevs).toBe(1);
    expect(e.buffered).toBe(0);
    expect(e.sections).toBe(2);

    const b = new StreamBuilder().header().ramPart(2).zero('pc.ram', 0).ramEos(2);
    // The section names its block again: it stands on its own.
    b.ramPart(2, 'name-first');
    for (const p of pages) b.page('pc.ram', p * 4096, cluster, (p - 32) * 4096);
    b.ramEos(2);
    expect(Buffer.compare(sink.bytes, b.build())).toBe(0);
  });

  it('a growable sink takes a section larger than its buffer, and flushAfterFailure keeps whole sections only', () => {
    const b = new StreamBuilder(64);
    b.pagesSection(2, 'pc.ram', cluster, 32, pages, pages.length);
    const whole = b.build().slice();
    expect(whole.length).toBe(5 + 4 * (8 + 4096) + 7 + 13);

    const sink = new RecordingSink();
    const e = new StreamEncoder(sink, 1 << 20);
    e.verbatim(new Uint8Array([1, 2, 3])).ramPart(2).zero('pc.ram', 0).ramEos(2).ramPart(2).zero('pc.ram', 4096);
    e.flushAfterFailure();
    expect(sink.bytes.length).toBe(3 + 5 + 8 + 7 + 1 + 13);
  });
});
