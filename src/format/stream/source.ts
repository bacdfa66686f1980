// What the stream parser reads from: the bytes of a migration stream as they arrive, read in place. save's input
// ring (save/ring/input.ts) is one; the parser knows nothing of where the bytes come from or how they are held.
// Every read names what it reads (`what`), for the one line a stream cut short gives.

export interface StreamSource {
  /** Bytes consumed so far (the offset errors name). */
  readonly consumedBytes: number;
  /** True when at least n bytes follow; false only if the input ended first. */
  ensure(n: number): boolean;
  /** The next n bytes, copied, without consuming them. */
  peek(n: number, what: string): Uint8Array;
  peekU8(what: string): number;
  u8(what: string): number;
  be16(what: string): number;
  be32(what: string): number;
  /** A be64 as two u32 halves, [high, low], into `out`. */
  be64Parts(what: string, out: Uint32Array): void;
  /** The next n bytes, copied. */
  take(n: number, what: string): Uint8Array;
  /** Consumes n bytes left in place; returns where they start, for the sink to copy them from (see the sink). */
  skipInPlace(n: number, what: string): number;
  /** From now on, keep a copy of what is consumed, until endCapture() returns it. */
  startCapture(): void;
  endCapture(): Uint8Array;
  /** Consumes the input piece by piece until `done(piece)` says the stream is complete, or the input ends. */
  consumeUntil(done: (piece: Uint8Array) => boolean): void;
  /** Consumes everything up to the end of input, returning it. */
  takeRest(): Uint8Array;
}
