// `load --connect unix:PATH`: the connections to a QEMU waiting in `migrate_incoming "unix:PATH"`, owned here from
// connect to close. The main channel connects first, then each multifd channel in id order: QEMU 7.2's destination
// takes its first accepted connection as the main channel (migration.c migration_ioc_process_incoming); 10.x peeks at
// each connection's first bytes, which load writes at once. The fds are made blocking for load's synchronous writes.
import net from 'node:net';
import { SnapPipeError } from '../errors.js';
import { printable } from '../format/text.js';
import { enlargeSendBuffer, socketBlocking, socketFd } from '../native/uring.js';

/** A multifd channel's send buffer: 8 packets of 512 KiB. */
const CHANNEL_SEND_BUFFER_BYTES = 4 << 20;
/** How long each connection may take: QEMU listens already, or this is the wrong path. */
const CONNECT_TIMEOUT_MS = 10_000;

export class StreamConnections {
  private constructor(
    private readonly socks: net.Socket[],
    /** The main channel's fd, then each multifd channel's. */
    readonly main: number,
    readonly channels: number[],
  ) {}

  /** Connects the main channel and `channels` multifd channels to unix socket `path`. */
  static async open(path: string, channels: number): Promise<StreamConnections> {
    const socks: net.Socket[] = [];
    try {
      for (let c = 0; c <= channels; c++) socks.push(await connectOnce(path));
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

function connectOnce(path: string): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const sock = net.connect({ path });
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new SnapPipeError('IO', `--connect: no answer from ${printable(path)} in ${CONNECT_TIMEOUT_MS / 1000} s`));
    }, CONNECT_TIMEOUT_MS);
    sock.once('connect', () => {
      clearTimeout(timer);
      sock.pause();
      resolve(sock);
    });
    sock.once('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      const why = err.code === 'ENOENT' || err.code === 'ECONNREFUSED' ? "nothing listens there (is QEMU's migrate_incoming \"unix:PATH\" running?)" : err.message;
      reject(new SnapPipeError('IO', `--connect: cannot connect to ${printable(path)}: ${why}`));
    });
  });
}
