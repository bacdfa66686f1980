// Everything the CLI prints goes through here, written to fd 1 or 2 with fs.writeSync before the call returns.
//
// Not process.stdout/process.stderr: into a pipe, Node writes them asynchronously (what the pipe cannot take at once
// waits in the process's memory), and process.exit() ends the process without waiting for it. An `info` of a few
// hundred KiB into a 64 KiB pipe read slowly lost everything past the pipe's capacity and still exited 0. Touching
// process.stdout also switches fd 1 to non-blocking mode, under load's own writes to it.
import fs from 'node:fs';
import { SnapPipeError, ioError } from './errors.js';
import { jsonText } from './format/text.js';

export const STDOUT_FD = 1;
export const STDERR_FD = 2;

/** A descriptor left non-blocking by whoever shares it answers EAGAIN when full: wait this long and retry. */
const EAGAIN_SLEEP_MS = 2;
/** ... and give up after this long without a byte taken. */
const EAGAIN_STALL_MS_MAX = 10 * 60_000;

const sleepCell = new Int32Array(new SharedArrayBuffer(4));

function streamName(fd: number): string {
  return fd === STDOUT_FD ? 'stdout' : fd === STDERR_FD ? 'stderr' : `fd ${fd}`;
}

/**
 * Writes all of `text` (UTF-8) to `fd`: partial writes advanced, EAGAIN waited out (bounded). A reader that closed
 * the pipe (EPIPE: Node ignores SIGPIPE, so the write fails instead of the process dying) and every other error
 * throw a SnapPipeError naming the stream.
 */
export function writeText(fd: number, text: string): void {
  writeAll(fd, Buffer.from(text, 'utf8'));
}

/** Writes all of `bytes` to `fd`, as writeText does (save's answers on QEMU's return path go this way too). */
export function writeAll(fd: number, bytes: Uint8Array): void {
  const name = streamName(fd);
  writeLoop(bytes.length, (done) => fs.writeSync(fd, bytes, done, bytes.length - done), {
    stalled: name,
    closed: `${name}: the reader closed it before the output was complete (EPIPE)`,
    failed: `write to ${name}`,
  });
}

/** What writeLoop's failures say: the prefix of the stall line, the whole EPIPE line, the failing write. */
export interface WriteWords {
  stalled: string;
  closed: string;
  failed: string;
}

/**
 * Calls `write(done)` until `total` bytes are out: partial writes advanced, EAGAIN waited out (bounded by
 * EAGAIN_STALL_MS_MAX without progress), EPIPE and every other error thrown as a SnapPipeError in `words`.
 * Returns the number of system calls.
 */
export function writeLoop(total: number, write: (done: number) => number, words: WriteWords): number {
  let done = 0;
  let calls = 0;
  let stalledSince = 0;
  while (done < total) {
    let n: number;
    try {
      n = write(done);
      calls++;
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'EAGAIN') {
        const now = performance.now();
        if (stalledSince === 0) stalledSince = now;
        else if (now - stalledSince > EAGAIN_STALL_MS_MAX) {
          throw new SnapPipeError('IO', `${words.stalled}: the reader took nothing for ${EAGAIN_STALL_MS_MAX / 1000} s`);
        }
        Atomics.wait(sleepCell, 0, 0, EAGAIN_SLEEP_MS);
        continue;
      }
      if (code === 'EPIPE' || code === 'ECONNRESET') throw new SnapPipeError('IO', words.closed);
      throw ioError(words.failed, err);
    }
    stalledSince = 0;
    done += n;
  }
  return calls;
}

/** Results (help, info, verify's report): all of it on stdout, or a SnapPipeError. */
export function printOut(text: string): void {
  writeText(STDOUT_FD, text);
}

/** Reports asked for on stderr (--stats): all of it, or a SnapPipeError. */
export function printErr(text: string): void {
  writeText(STDERR_FD, text);
}

/**
 * --stats: with `true`, `summary()` on stderr; with a FILE, `report` as JSON in FILE (a FILE that cannot be written
 * is one line naming it, like every other failure).
 */
export function writeStats(stats: string | true | undefined, summary: () => string, report: unknown): void {
  if (stats === true) {
    printErr(summary() + '\n');
    return;
  }
  if (stats === undefined) return;
  try {
    fs.writeFileSync(stats, jsonText(report) + '\n');
  } catch (err) {
    throw ioError(`writing the --stats file ${stats}`, err);
  }
}

/** One line on stderr that must not fail the command (a note, the last line of a failing one): best effort. */
export function tellErr(line: string): void {
  try {
    writeText(STDERR_FD, line);
  } catch {
    // stderr is gone: nobody is left to tell
  }
}
