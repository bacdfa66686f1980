// The one way an image is opened for reading (info, load, load --postcopy, verify, and save's look at the file it
// replaces): regular files only, and nothing can make the open itself wait.
//
// Why each step (Linux, open(2) and fifo(7)):
// - stat first: a path that is not a regular file is refused without being opened at all. Opening a device can do
//   things by itself (a watchdog arms, a tape rewinds on close), and open(2) of a unix socket fails with ENXIO, which
//   would name the wrong cause.
// - then open with O_NONBLOCK: the path may have been replaced between stat and open. A FIFO opened for reading
//   without O_NONBLOCK blocks until some process opens it for writing, possibly forever; with O_NONBLOCK the open
//   returns at once. O_NOCTTY: a terminal opened here never becomes the controlling terminal.
// - fstat the descriptor: what was opened is what is judged.
// - reopen through /proc/self/fd/N with the flags the reads want: O_DIRECT, and without O_NONBLOCK. open(2) says
//   O_NONBLOCK has no effect on regular files, but io_uring in 5.x kernels hands EAGAIN back for a read of such a
//   file that would wait, instead of finishing it in a worker thread. /proc/self/fd/N names the open file itself,
//   so the second open reaches the same inode whatever happened to the name meanwhile, and an EINVAL there can only
//   mean that the file system refuses O_DIRECT.
import fs from 'node:fs';
import { SnapPipeError, ioError } from '../errors.js';

/** What a file that is not a regular file is, for a message ("a FIFO (named pipe)"); undefined for a regular file. */
export function nonRegularKind(st: fs.Stats): string | undefined {
  if (st.isFile()) return undefined;
  if (st.isFIFO()) return 'a FIFO (named pipe)';
  if (st.isDirectory()) return 'a directory';
  if (st.isSocket()) return 'a socket';
  if (st.isCharacterDevice()) return 'a character device';
  if (st.isBlockDevice()) return 'a block device';
  if (st.isSymbolicLink()) return 'a symbolic link';
  return 'not a regular file';
}

/** The one line for an image path that is not a regular file. */
export function notRegular(path: string, kind: string, verb: 'reads' | 'writes'): SnapPipeError {
  const where = verb === 'reads' ? 'reads images from' : 'writes images to';
  return new SnapPipeError(verb === 'reads' ? 'BAD_IMAGE' : 'EXISTS', `${path} is ${kind}, not an image file (snap-pipe ${where} regular files only)`);
}

export interface OpenImageOptions {
  /** O_DIRECT reads. */
  direct: boolean;
}

/** Opens `path` for reading; returns the descriptor. Anything but a regular file (after symlinks) is refused. */
export function openImageFile(path: string, opts: OpenImageOptions): number {
  let st: fs.Stats;
  try {
    st = fs.statSync(path);
  } catch (err) {
    throw ioError(`open ${path}`, err);
  }
  const kind = nonRegularKind(st);
  if (kind !== undefined) throw notRegular(path, kind, 'reads');

  const c = fs.constants;
  let probe: number;
  try {
    probe = fs.openSync(path, c.O_RDONLY | c.O_NONBLOCK | c.O_NOCTTY);
  } catch (err) {
    // Replaced by a socket since the stat: open(2) says ENXIO.
    throw ioError(`open ${path}`, err);
  }
  try {
    let opened: fs.Stats;
    try {
      opened = fs.fstatSync(probe);
    } catch (err) {
      throw ioError(`stat ${path}`, err);
    }
    const openedKind = nonRegularKind(opened);
    if (openedKind !== undefined) throw notRegular(path, openedKind, 'reads');
    try {
      return fs.openSync(`/proc/self/fd/${probe}`, c.O_RDONLY | (opts.direct ? c.O_DIRECT : 0));
    } catch (err) {
      if (opts.direct && (err as NodeJS.ErrnoException).code === 'EINVAL') {
        throw new SnapPipeError('NO_DIRECT', `${path}: the file system refuses O_DIRECT; use --no-direct`);
      }
      throw ioError(`open ${path}`, err);
    }
  } finally {
    fs.closeSync(probe);
  }
}
