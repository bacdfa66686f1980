// The parser refuses a RAM setup announcing more than snap-pipe can hold (a block over 2^31 pages, a total over
// 16 TiB) with one line naming the byte, before the sink's setup (where the save would allocate per-page bitmaps),
// and accepts the largest setup within the limits.
import { describe, expect, it } from 'vitest';
import { SnapPipeError } from '../../src/errors.js';
import { InputRing } from '../../src/save/ring/input.js';
import { CTRL, CTRL_INTS } from '../../src/save/ring/layout.js';
import { StreamBuilder } from '../../src/format/stream/encoder.js';
import { RAM_EOS, RAM_MEM_SIZE, RAM_VERSION, SEC_START } from '../../src/format/stream/constants.js';
import { BLOCK_PAGES_MAX, RAM_TOTAL_BYTES_MAX, StreamParser, type ParsedBlock } from '../../src/format/stream/parser.js';
import { pageContent } from '../helpers/model.js';
import { parseAll, piecewise } from '../helpers/parse.js';

const TiB = 2 ** 40;
const RAM_ID = 2;

/** Header, configuration and the ram START section header: the MEM_SIZE record comes next, at byte `at`. */
function setupStart(): { b: StreamBuilder; at: number } {
  const b = new StreamBuilder().header().configuration('pc-i440fx-7.2').sectionStart(SEC_START, RAM_ID, 'ram', 0, RAM_VERSION);
  return { b, at: b.build().length };
}

/** A be64 from two u32 halves: exact where a double is not (values past 2^53). */
function be64Parts(b: StreamBuilder, hi: number, lo: number): StreamBuilder {
  return b.be32(hi).be32(lo);
}

function refusal(bytes: Uint8Array): SnapPipeError {
  try {
    parseAll(bytes); // its sink allocates whole blocks at setup: a refusal must come before
  } catch (err) {
    expect(err).toBeInstanceOf(SnapPipeError);
    return err as SnapPipeError;
  }
  throw new Error('the parser accepted the stream');
}

describe('RAM setup limits', () => {
  it('the caps: 2^31 pages per block (Int32 page indices between reader and coalescer), 16 TiB in all', () => {
    expect(BLOCK_PAGES_MAX * 4096).toBe(8 * TiB);
    expect(RAM_TOTAL_BYTES_MAX).toBe(16 * TiB);
  });

  it('a block of 2^50 bytes announced as the total: refused at the total, UNSUPPORTED, one line naming the byte', () => {
    const { b, at } = setupStart();
    b.be64(2 ** 50 + RAM_MEM_SIZE).str8('pc.ram').be64(2 ** 50).be64(RAM_EOS).footer(RAM_ID);
    const err = refusal(b.build());
    expect(err.code).toBe('UNSUPPORTED');
    expect(err.message).toBe(`a RAM setup announcing ${2 ** 50} bytes of RAM (snap-pipe handles up to 16 TiB; a damaged stream?) at byte ${at}`);
  });

  it('a total one page over 16 TiB is refused; a total past 2^53 (not exact as a double) too', () => {
    for (const [hi, lo] of [
      [Math.floor((16 * TiB + 4096) / 2 ** 32), 4096 + RAM_MEM_SIZE],
      [0xffff_ffff, 0xffff_f000 + RAM_MEM_SIZE],
      [0x8000_0000, RAM_MEM_SIZE],
    ]) {
      const { b, at } = setupStart();
      be64Parts(b, hi, lo).str8('pc.ram').be64(4096).be64(RAM_EOS).footer(RAM_ID);
      const err = refusal(b.build());
      expect(err.code).toBe('UNSUPPORTED');
      expect(err.message).toMatch(new RegExp(`^a RAM setup announcing \\d+ bytes of RAM \\(snap-pipe handles up to 16 TiB; a damaged stream\\?\\) at byte ${at}$`));
    }
  });

  it('a block one page over 2^31 pages within a 16 TiB total: refused at the block, naming it', () => {
    const { b, at } = setupStart();
    b.be64(16 * TiB + RAM_MEM_SIZE);
    const blockAt = at + 8;
    b.str8('pc.ram').be64(8 * TiB + 4096).str8('pc.bios').be64(8 * TiB - 4096).be64(RAM_EOS).footer(RAM_ID);
    const err = refusal(b.build());
    expect(err.code).toBe('UNSUPPORTED');
    expect(err.message).toBe(
      `RAM block 'pc.ram' of ${8 * TiB + 4096} bytes (snap-pipe handles blocks of up to 2^31 pages, 8 TiB) at byte ${blockAt}`,
    );
  });

  it('a block larger than the announced total is still a damaged stream (BAD_STREAM), whatever its size', () => {
    const { b } = setupStart();
    b.be64(8192 + RAM_MEM_SIZE);
    be64Parts(b.str8('pc.ram'), 0x40_0000, 0).be64(RAM_EOS).footer(RAM_ID);
    const err = refusal(b.build());
    expect(err.code).toBe('BAD_STREAM');
    expect(err.message).toMatch(/add up to more than the announced total of 8192 bytes at byte \d+$/);
  });

  it('the largest setup within the limits passes: two blocks of 2^31 pages, 16 TiB, last page index 2^31 - 1', () => {
    const blocks = [
      { id: 'pc.ram', lengthBytes: 8 * TiB },
      { id: 'pc.ram.2', lengthBytes: 8 * TiB },
    ];
    const lastPageBytes = 8 * TiB - 4096;
    const bytes = new StreamBuilder()
      .header()
      .configuration('pc-i440fx-7.2')
      .ramSetup(RAM_ID, blocks)
      .ramPart(RAM_ID)
      .page('pc.ram.2', lastPageBytes, pageContent(7))
      .zero('pc.ram', lastPageBytes)
      .ramEos(RAM_ID)
      .eof()
      .build();
    // A sink that records instead of allocating 16 TiB.
    let setup: ParsedBlock[] = [];
    const records: [string, number, number][] = [];
    const ctrl = new Int32Array(new SharedArrayBuffer(CTRL_INTS * 4));
    const ring: InputRing = new InputRing(new Uint8Array(65536), ctrl, piecewise(bytes, 3), {
      flush() {},
      waitForSpace(cursor) {
        Atomics.store(ctrl, CTRL.IN_RELEASED, cursor);
      },
    });
    const parsed = new StreamParser(ring, {
      setup: (b) => (setup = b.map((x) => ({ ...x }))),
      page: (block, page) => records.push(['page', block, page]),
      zero: (block, page) => records.push(['zero', block, page]),
    }).parse();
    expect(setup).toEqual(blocks);
    expect(parsed.blocks).toEqual(blocks);
    expect(records).toEqual([
      ['page', 1, BLOCK_PAGES_MAX - 1],
      ['zero', 0, BLOCK_PAGES_MAX - 1],
    ]);
  });
});
