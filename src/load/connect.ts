// Where load's stream goes: stdout (QEMU's exec: pipe), or with `load --connect unix:PATH` the connections to a QEMU
// waiting in `migrate_incoming "unix:PATH"`, owned here from connect to close. Either is opened only once the image
// has been checked, so a bad image is refused before QEMU is touched. The main channel connects first, then each
// multifd channel in id order: QEMU 7.2's destination takes its first accepted connection as the main channel
// (migration.c migration_ioc_process_incoming); 10.x peeks at each connection's first bytes, which load writes at
// once. The fds are made blocking for load's synchronous writes.
import net from 'node:net';
import { SnapPipeError } from '../errors.js';
import { printable } from '../format/text.js';
import { enlargeSendBuffer, socketBlocking, socketFd } from '../native/uring.js';

/** A multifd channel's send buffer: 8 packets of 512 KiB. */
const CHANNEL_SEND_BUFFER_BYTES = 4 << 20;
/** Until QEMU listens, a connection is tried again this often. */
const RETRY_MS = 10;

/** The descriptors a load writes its stream to, and (postcopy) reads QEMU's return path from. */
export interface StreamTarget {
  /** The stream (the main channel). */
  out: number;
  /** With multifd: each channel's socket, by channel id. */
  multifdFds?: number[];
  /** Postcopy: QEMU's return path, stdin under exec:, else the main channel's socket (`returnPathSocket`). */
  returnPath?: number;
  returnPathSocket?: net.Socket;
}

/** Opens the target once the image has been checked (runLoad, runPostcopyLoad call it). */
export type OpenTarget = () => Promise<StreamTarget>;

export class StreamConnections {
  private constructor(
    private readonly socks: net.Socket[],
    /** The main channel's fd, then each multifd channel's. */
    readonly main: number,
    readonly channels: number[],
  ) {}

  /** The main channel's socket (QEMU's return path comes back on it). */
  get mainSocket(): net.Socket {
    return this.socks[0];
  }

  /**
   * Connects the main channel and `channels` multifd channels to unix socket `path`. Until QEMU listens there (no
   * socket file yet, or nobody accepting), tries again for up to `waitMs`: load may start before QEMU does.
   * `onWait` is called once, when the first try finds nobody listening.
   */
  static async open(path: string, channels: number, waitMs: number, onWait?: () => void): Promise<StreamConnections> {
    const socks: net.Socket[] = [];
    const deadline = performance.now() + waitMs;
    try {
      for (let c = 0; c <= channels; c++) socks.push(await connectBy(path, deadline, waitMs, c === 0 ? onWait : undefined));
      const fds = socks.map(socketFd);
      for (const fd of fds) socketBlocking(fd);
      // Load writes each channel in turn from one thread: room for a few whole packets in each socket lets it move
      // to the next channel while QEMU's receive threads drain them side by side.
      if (channels > 0) for (const fd of fds.slice(1)) enlargeSendBuffer(fd, CHANNEL_SEND_BUFFER_BYTES);
      return new StreamConnections(socks, fds[0], fds.slice(1));
    } catch (err) {
      for (const s of socks) s.destroy();
      throw err;
    }
  }

  close(): void {
    for (const s of this.socks) s.destroy();
  }
}

/** One connection, tried again every RETRY_MS while nothing listens, until `deadline`. */
async function connectBy(path: string, deadline: number, waitMs: number, onWait?: () => void): Promise<net.Socket> {
  for (let tries = 0; ; tries++) {
    const r = await connectOnce(path, Math.max(1, deadline - performance.now()));
    if (r instanceof net.Socket) return r;
    const notYet = r.code === 'ENOENT' || r.code === 'ECONNREFUSED';
    if (!notYet) throw new SnapPipeError('IO', `--connect: cannot connect to ${printable(path)}: ${r.message}`);
    if (performance.now() + RETRY_MS >= deadline) {
      throw new SnapPipeError('IO', `--connect: nothing listened at ${printable(path)} within ${waitMs / 1000} s (is QEMU's migrate_incoming "unix:PATH" running?)`);
    }
    if (tries === 0) onWait?.();
    await new Promise((resolve) => setTimeout(resolve, RETRY_MS));
  }
}

/** A connected socket (paused: load writes and reads its fd itself), or the error that came instead. */
function connectOnce(path: string, timeoutMs: number): Promise<net.Socket | NodeJS.ErrnoException> {
  return new Promise((resolve) => {
    const sock = net.connect({ path });
    const timer = setTimeout(() => {
      sock.destroy();
      resolve(Object.assign(new Error(`no answer in ${(timeoutMs / 1000).toFixed(1)} s`), { code: 'ETIMEDOUT' }));
    }, timeoutMs);
    sock.once('connect', () => {
      clearTimeout(timer);
      sock.pause();
      resolve(sock);
    });
    sock.once('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      sock.destroy();
      resolve(err);
    });
  });
}
