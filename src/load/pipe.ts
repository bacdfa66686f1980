// Load's output: the stream encoder's bytes written to QEMU's exec: pipe (or a file), with write(2) for a full
// buffer and writev(2) for a section whose pages come straight from a cluster's memory. Partial writes are advanced,
// EAGAIN (a descriptor left non-blocking by whoever shares it) is waited out for a bounded time, and EPIPE means
// QEMU went away.
import fs from 'node:fs';
import { writeLoop, type WriteWords } from '../output.js';
import { StreamEncoder, type ByteSink } from '../format/stream/encoder.js';

/** Output is assembled in a buffer this large and written with one write call per fill. */
export const PIPE_BUFFER_BYTES = 8 << 20;
const WORDS: WriteWords = {
  stalled: 'writing the stream',
  closed: 'QEMU closed the stream before it was complete (EPIPE); the incoming migration failed on its side',
  failed: 'writing the stream to stdout',
};

/** Writes all of buf[0, len) to fd (see writeLoop). */
function writeStream(fd: number, buf: Uint8Array, len: number): number {
  return writeLoop(len, (done) => fs.writeSync(fd, buf, done, len - done), WORDS);
}

/**
 * Writes the pieces in order with writev (see writeLoop); a partial write resumes inside the piece it stopped in.
 * Returns the write calls made.
 */
export function writevAll(fd: number, pieces: Uint8Array[], total: number, words: WriteWords): number {
  let first = 0;
  let skipped = 0; // bytes of pieces[0..first) plus what was cut off pieces[first]
  return writeLoop(total, (done) => {
    while (done - skipped >= pieces[first].length) {
      skipped += pieces[first].length;
      first++;
    }
    if (done > skipped) {
      pieces[first] = pieces[first].subarray(done - skipped);
      skipped = done;
    }
    return fs.writevSync(fd, first === 0 ? pieces : pieces.slice(first));
  }, words);
}

/** The encoder's sink for a file descriptor: counts what it wrote and how long that took; `onWritten` after each. */
export class PipeSink implements ByteSink {
  /** A write failed (the reader is gone): nothing more is written. */
  broken = false;
  bytesOut = 0;
  writeCalls = 0;
  writeMs = 0;

  constructor(
    private readonly fd: number,
    private readonly onWritten: () => void,
  ) {}

  write(buf: Uint8Array, len: number): void {
    const t0 = performance.now();
    this.broken = true; // until the write succeeds
    this.writeCalls += writeStream(this.fd, buf, len);
    this.written(len, t0);
  }

  writev(pieces: Uint8Array[], total: number): void {
    const t0 = performance.now();
    this.broken = true;
    this.writeCalls += writevAll(this.fd, pieces, total, WORDS);
    this.written(total, t0);
  }

  private written(bytes: number, t0: number): void {
    this.broken = false;
    this.writeMs += performance.now() - t0;
    this.bytesOut += bytes;
    this.onWritten();
  }
}

/** An encoder writing to `fd` through a buffer of PIPE_BUFFER_BYTES, allocated once. */
export function pipeEncoder(fd: number, onWritten: () => void): { out: StreamEncoder; sink: PipeSink } {
  const sink = new PipeSink(fd, onWritten);
  return { out: new StreamEncoder(sink, PIPE_BUFFER_BYTES), sink };
}
