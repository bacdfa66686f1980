// The bytes of a stream as a stage thread reads them: blocking reads of one fd (stdin, or a socket save --listen
// accepted), bounded by the pipeline's FAILED field.
import { readSync } from 'node:fs';
import { ioError } from '../../errors.js';
import type { ByteInput } from '../ring/input.js';
import { Aborted, failed } from '../ring/wait.js';
import { epochMs } from './rpc.js';

/**
 * Reads a stream's fd (0, or a socket save --listen accepted: the main channel or a multifd channel) in large
 * pieces; an EAGAIN (stdin left non-blocking by a parent) waits briefly and retries. Checks the pipeline's FAILED
 * field before every read: once the save has failed or been aborted (the main thread then wakes a read blocked on an
 * empty pipe, see SavePipeline), the reader must not block in read(0) again, or the thread could not be terminated
 * and the process could not exit.
 */
export class FdInput implements ByteInput {
  waitMs = 0;
  /** When the first bytes came (epochMs()), 0 before. */
  firstDataAtMs = 0;
  private readonly nap = new Int32Array(new SharedArrayBuffer(4));
  constructor(
    private readonly ctrl?: Int32Array,
    private readonly fd = 0,
  ) {}
  read(dst: Uint8Array, off: number, len: number): number {
    const t0 = performance.now();
    try {
      for (;;) {
        if (this.ctrl && failed(this.ctrl)) throw new Aborted();
        try {
          const n = readSync(this.fd, dst, off, len, null);
          if (n > 0 && this.firstDataAtMs === 0) this.firstDataAtMs = epochMs();
          return n;
        } catch (err) {
          const code = (err as NodeJS.ErrnoException).code;
          if (code === 'EAGAIN') {
            Atomics.wait(this.nap, 0, 0, 2);
            continue;
          }
          if (code === 'EOF') return 0;
          throw ioError(`reading the migration stream from ${this.fd === 0 ? 'stdin' : 'its socket'}`, err);
        }
      }
    } finally {
      this.waitMs += performance.now() - t0;
    }
  }
}
