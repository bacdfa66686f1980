// Operating errors: each carries a stable code and one clear line for the user. Programmer errors use assert().

export type ErrorCode =
  | 'USAGE' // bad command line (exit 2)
  | 'BAD_STREAM' // the migration stream is malformed or uses something snap-pipe does not decode
  | 'UNSUPPORTED' // well-formed, but a feature snap-pipe refuses (capability, page size, section)
  | 'TRUNCATED' // the stream or image ended early
  | 'IO' // a system call failed (ENOSPC, EIO, ...)
  | 'NO_DIRECT' // the file system refuses O_DIRECT
  | 'EXISTS' // refusing to overwrite a complete image
  | 'BAD_IMAGE' // not a snap-pipe image, damaged or unknown version
  | 'INCOMPLETE' // the image's save never finished
  | 'CHECKSUM' // a chunk checksum did not match
  | 'WORKER' // a worker died
  | 'INTERRUPTED'; // SIGINT/SIGTERM

export class SnapPipeError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string) {
    super(message);
    this.name = 'SnapPipeError';
    this.code = code;
  }
}

/**
 * Wraps a Node system error (with .code like 'ENOSPC') into one line naming the operation:
 * `<op>: EIO (i/o error)`. `op` says what was done to what (`open PATH`, `write of N bytes at offset X`), so the tail
 * Node adds to its messages (`, open '/the/path'`, `, write`) is dropped rather than repeated.
 */
export function ioError(op: string, err: unknown): SnapPipeError {
  const e = err as NodeJS.ErrnoException;
  if (e && e.code === 'EINVAL' && /O_DIRECT|direct/i.test(op)) {
    return new SnapPipeError('NO_DIRECT', `${op}: the file system refuses O_DIRECT (EINVAL); use --no-direct`);
  }
  const what = e && e.code ? `${e.code}${e.message ? ` (${describeSystemError(e)})` : ''}` : String(err);
  return new SnapPipeError('IO', `${op}: ${what}`);
}

/** 'EIO: i/o error, open '/x'' -> 'i/o error': the description alone, without the code, syscall and path. */
function describeSystemError(e: NodeJS.ErrnoException): string {
  let text = e.message.replace(/^[A-Z0-9_]+: /, '');
  if (e.syscall) {
    const at = text.lastIndexOf(`, ${e.syscall}`);
    if (at > 0) text = text.slice(0, at);
  }
  return text;
}

/** Errors cross worker boundaries as plain objects; this restores the class and code. */
export interface SerializedError {
  code: ErrorCode;
  message: string;
  stack?: string;
}

export function serializeError(err: unknown): SerializedError {
  if (err instanceof SnapPipeError) return { code: err.code, message: err.message, stack: err.stack };
  const e = err as Error;
  return { code: 'WORKER', message: e && e.message ? e.message : String(err), stack: e?.stack };
}

export function deserializeError(s: SerializedError): SnapPipeError {
  const err = new SnapPipeError(s.code, s.message);
  if (s.stack) err.stack = s.stack;
  return err;
}
