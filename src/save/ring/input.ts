// The input ring: the reader thread reads stdin straight into it, the parser walks it, and page data stays in place
// until the coalescer has copied it into its chunk (so a page is copied once on its way to its chunk).
// Positions are free-running counters wrapping at 2^32, kept as int32 (`| 0`); the ring's capacity is a power of two.
//
// Why int32 and not u32 (`>>> 0`): V8 keeps an object's number fields as small integers (Smi: int32 on this build)
// until one is stored outside that range; the field then changes representation, the object's map is replaced,
// and every optimized function relying on it is thrown away. With u32 positions and a small-integer byte count,
// that happened to the whole parser when the stream passed 2 GiB, and TurboFan compiled it all again. Distances
// between positions are taken with `| 0` too (they lie within the ring): `>>> 0` of a difference that leaves the int32
// range makes the optimized code bail out ("overflow") once the positions wrap.
import { SnapPipeError } from '../../errors.js';
import type { StreamSource } from '../../format/stream/source.js';
import { isPowerOfTwo, MAIN_LANE, type Lane } from './layout.js';

/** Where the bytes come from: fd 0 in the reader worker, an array of pieces in tests. Returns 0 at end of input. */
export interface ByteInput {
  read(dst: Uint8Array, off: number, len: number): number;
}

/** The consumer side as the ring sees it. */
export interface ReleaseChannel {
  /** Publish whatever the parser has produced so far (called before every read that may block). */
  flush(): void;
  /** The ring is full: let the consumer release everything before `cursor`, and block until IN_RELEASED moves. */
  waitForSpace(cursor: number): void;
}

const READ_MAX_BYTES = 1 << 20;

export class InputRing implements StreamSource {
  readonly bytes: Uint8Array;
  readonly mask: number;
  /** Bytes read into the ring (int32, wrapping). */
  private written = 0;
  /** Parser position (int32, wrapping). */
  cursor = 0;
  /**
   * Absolute stream offset of `cursor`, for messages and counters. Starts as -0, a heap number, so that V8 gives the
   * field its floating-point representation at once (see the top of the file); -0 counts and prints as 0.
   */
  consumedBytes = -0;
  private eof = false;
  /** While capturing, consumed bytes are also copied here (header, configuration, RAM setup, device state). */
  private capture: Uint8Array[] | undefined;
  readCalls = 0;

  constructor(
    bytes: Uint8Array,
    private readonly ctrl: Int32Array,
    private readonly input: ByteInput,
    private readonly channel: ReleaseChannel,
    private readonly lane: Lane = MAIN_LANE,
  ) {
    if (!isPowerOfTwo(bytes.length) || bytes.length < 65536) {
      throw new RangeError(`input ring of ${bytes.length} bytes: must be a power of two of at least 64 KiB`);
    }
    this.bytes = bytes;
    this.mask = bytes.length - 1;
    // Positions continue from where the consumer's release mark stands (0 in a save; tests start near the wraps).
    this.written = this.cursor = Atomics.load(ctrl, lane.inReleased) | 0;
  }

  get available(): number {
    return (this.written - this.cursor) | 0;
  }

  /** True when at least n bytes follow the cursor; false only if the input ended first. */
  ensure(n: number): boolean {
    while (this.available < n) {
      if (this.eof) return false;
      this.fill();
    }
    return true;
  }

  /** Like ensure, but an early end of input is an error naming what was being read. */
  need(n: number, what: string): void {
    if (!this.ensure(n)) {
      throw new SnapPipeError(
        'TRUNCATED',
        `stream ended at byte ${this.consumedBytes + this.available} while reading ${what} (needed ${n} bytes)`,
      );
    }
  }

  private fill(): void {
    const cap = this.bytes.length;
    let free = cap - ((this.written - Atomics.load(this.ctrl, this.lane.inReleased)) | 0);
    while (free === 0) {
      this.channel.waitForSpace(this.cursor);
      free = cap - ((this.written - Atomics.load(this.ctrl, this.lane.inReleased)) | 0);
    }
    const at = this.written & this.mask;
    const len = Math.min(free, cap - at, READ_MAX_BYTES);
    this.channel.flush();
    const got = this.input.read(this.bytes, at, len);
    this.readCalls++;
    if (got === 0) {
      this.eof = true;
      return;
    }
    this.written = (this.written + got) | 0;
    // Progress the main thread watches (save/returnpath.ts: is the stream still coming?).
    Atomics.store(this.ctrl, this.lane.inWritten, this.written);
  }

  private advance(n: number): void {
    if (this.capture) this.capture.push(this.copyOut(this.cursor, n));
    this.cursor = (this.cursor + n) | 0;
    this.consumedBytes += n;
  }

  /** Copies n bytes starting at ring position pos (may wrap). */
  copyOut(pos: number, n: number): Uint8Array {
    const out = new Uint8Array(n);
    const at = pos & this.mask;
    const first = Math.min(n, this.bytes.length - at);
    out.set(this.bytes.subarray(at, at + first), 0);
    if (first < n) out.set(this.bytes.subarray(0, n - first), first);
    return out;
  }

  private byteAt(i: number): number {
    return this.bytes[(this.cursor + i) & this.mask];
  }

  /** The next n bytes, copied, without consuming them. */
  peek(n: number, what: string): Uint8Array {
    this.need(n, what);
    return this.copyOut(this.cursor, n);
  }

  peekU8(what: string): number {
    this.need(1, what);
    return this.byteAt(0);
  }

  u8(what: string): number {
    this.need(1, what);
    const v = this.byteAt(0);
    this.advance(1);
    return v;
  }

  be16(what: string): number {
    this.need(2, what);
    const v = (this.byteAt(0) << 8) | this.byteAt(1);
    this.advance(2);
    return v;
  }

  be32(what: string): number {
    this.need(4, what);
    const v = ((this.byteAt(0) << 24) | (this.byteAt(1) << 16) | (this.byteAt(2) << 8) | this.byteAt(3)) >>> 0;
    this.advance(4);
    return v;
  }

  /** A be64 as [high u32, low u32] (RAM records keep flags in the low bits). */
  be64Parts(what: string, out: Uint32Array): void {
    this.need(8, what);
    out[0] = ((this.byteAt(0) << 24) | (this.byteAt(1) << 16) | (this.byteAt(2) << 8) | this.byteAt(3)) >>> 0;
    out[1] = ((this.byteAt(4) << 24) | (this.byteAt(5) << 16) | (this.byteAt(6) << 8) | this.byteAt(7)) >>> 0;
    this.advance(8);
  }

  take(n: number, what: string): Uint8Array {
    this.need(n, what);
    const out = this.copyOut(this.cursor, n);
    this.advance(n);
    return out;
  }

  /** Steps over n bytes that stay in the ring (page data handed to the coalescer); never captured. */
  skipInPlace(n: number, what: string): number {
    this.need(n, what);
    const pos = this.cursor;
    this.cursor = (this.cursor + n) | 0;
    this.consumedBytes += n;
    return pos;
  }

  startCapture(): void {
    this.capture = [];
  }

  endCapture(): Uint8Array {
    const parts = this.capture ?? [];
    this.capture = undefined;
    return concat(parts);
  }

  /**
   * Consumes the input piece by piece (what each read brought), handing each piece to `done`, until `done` says the
   * stream is complete or the input ends. Reads no further than the piece that completes it.
   */
  consumeUntil(done: (piece: Uint8Array) => boolean): void {
    while (this.ensure(1)) {
      const n = this.available;
      const piece = this.copyOut(this.cursor, n);
      this.cursor = (this.cursor + n) | 0;
      this.consumedBytes += n;
      if (done(piece)) return;
    }
  }

  /** Consumes everything up to the end of input, returning it. */
  takeRest(): Uint8Array {
    const parts: Uint8Array[] = [];
    while (this.ensure(1)) {
      const n = this.available;
      parts.push(this.copyOut(this.cursor, n));
      this.cursor = (this.cursor + n) | 0;
      this.consumedBytes += n;
    }
    return concat(parts);
  }
}

export function concat(parts: Uint8Array[]): Uint8Array {
  if (parts.length === 1) return parts[0];
  let n = 0;
  for (const p of parts) n += p.length;
  const out = new Uint8Array(n);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}
