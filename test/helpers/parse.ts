// Runs the stream parser in one thread over a stream held in memory, fed in random pieces as a pipe would.
import { InputRing, type ByteInput } from '../../src/save/ring/input.js';
import { CTRL, CTRL_INTS } from '../../src/save/ring/layout.js';
import { StreamParser, type ParsedStream, type StreamSink } from '../../src/format/stream/parser.js';
import { rng } from './model.js';

/** Hands out the stream in pieces of random size, as a pipe would. */
export function piecewise(bytes: Uint8Array, seed: number, maxPiece = 70000): ByteInput {
  const r = rng(seed);
  let at = 0;
  return {
    read(dst, off, len) {
      if (at >= bytes.length) return 0;
      const n = Math.min(len, bytes.length - at, 1 + Math.floor(r() * maxPiece));
      dst.set(bytes.subarray(at, at + n), off);
      at += n;
      return n;
    },
  };
}

export interface Collected {
  parsed: ParsedStream;
  ram: Uint8Array[];
  sent: boolean[][];
  /** The last record of the page was data. */
  data: boolean[][];
  /** Records per page (a page re-sent counts twice). */
  records: Uint8Array[];
  /** Record kinds in stream order, run-length: ['z', 'd'] when all zero records precede all data records. */
  kindRuns: string[];
}

/**
 * Runs the parser in one thread; the sink copies pages at once, so the ring can be released up to the cursor.
 * `startPosition`: the ring's first position (an int32), to cross the sign flip and the 2^32 wrap of positions.
 */
export interface ParseExtras {
  /** Passed to the parser (QEMU's return path accepted). */
  acceptReturnPath?: boolean;
  /** The sink's optional callbacks (return path, device state). */
  sink?: Pick<StreamSink, 'returnPathOpened' | 'ping' | 'deviceState'>;
  /** Passed to the parser: the stream is a multifd main channel; its sync points show in kindRuns as 's'. */
  multifd?: boolean;
}

export function parseAll(bytes: Uint8Array, seed = 1, ringBytes = 65536, maxPiece?: number, startPosition = 0, extras: ParseExtras = {}): Collected {
  const out = emptyCollected();
  out.parsed = collect(bytes, out, seed, ringBytes, maxPiece, startPosition, extras);
  return out;
}

/**
 * For a stream that stops early (a load cut short): what the parser collected up to the point it threw, and what
 * it threw. `got.parsed` is left undefined; `error` is undefined when the stream turned out whole.
 */
export function parseUntilFailure(bytes: Uint8Array): { got: Collected; error: unknown } {
  const got = emptyCollected();
  try {
    got.parsed = collect(bytes, got, 1, 1 << 20);
  } catch (error) {
    return { got, error };
  }
  return { got, error: undefined };
}

function emptyCollected(): Collected {
  return { parsed: undefined as unknown as ParsedStream, ram: [], sent: [], data: [], records: [], kindRuns: [] };
}

/** Parses `bytes` into `out` as it goes, so what was collected is kept when the parser throws. */
function collect(
  bytes: Uint8Array,
  out: Collected,
  seed: number,
  ringBytes: number,
  maxPiece?: number,
  startPosition = 0,
  extras: ParseExtras = {},
): ParsedStream {
  const ctrl = new Int32Array(new SharedArrayBuffer(CTRL_INTS * 4));
  Atomics.store(ctrl, CTRL.IN_RELEASED, startPosition);
  const ringMem = new Uint8Array(ringBytes);
  const ring: InputRing = new InputRing(ringMem, ctrl, piecewise(bytes, seed, maxPiece), {
    flush() {},
    waitForSpace(cursor) {
      Atomics.store(ctrl, CTRL.IN_RELEASED, cursor);
    },
  });
  const kind = (k: string) => {
    if (out.kindRuns[out.kindRuns.length - 1] !== k) out.kindRuns.push(k);
  };
  const parser = new StreamParser(ring, {
    setup(blocks) {
      out.ram = blocks.map((b) => new Uint8Array(b.lengthBytes));
      out.sent = blocks.map((b) => new Array<boolean>(b.lengthBytes / 4096).fill(false));
      out.data = blocks.map((b) => new Array<boolean>(b.lengthBytes / 4096).fill(false));
      out.records = blocks.map((b) => new Uint8Array(b.lengthBytes / 4096));
    },
    page(block, page, pos) {
      out.ram[block].set(ring.copyOut(pos, 4096), page * 4096);
      out.sent[block][page] = out.data[block][page] = true;
      out.records[block][page]++;
      kind('d');
    },
    zero(block, page) {
      out.ram[block].fill(0, page * 4096, page * 4096 + 4096);
      out.sent[block][page] = true;
      out.data[block][page] = false;
      out.records[block][page]++;
      kind('z');
    },
    sync() {
      out.kindRuns.push('s');
    },
    ...extras.sink,
  }, { acceptReturnPath: extras.acceptReturnPath, multifd: extras.multifd });
  return parser.parse();
}
