// `save --listen unix:PATH`: the socket QEMU's `migrate "unix:PATH"` connects to, owned here from listen to unlink.
// The save starts its stage threads and opens the image first, then listens, so QEMU's migration (and the paused
// guest's downtime) never waits for snap-pipe to start. The socket file is created with mode 0600 (only the user
// running snap-pipe, normally QEMU's, may connect). The first connection is the stream: its fd is made blocking and
// read by the reader stage, and the save's answers on QEMU's return path go back on it. A second connection means
// QEMU opened multifd channels (migration/socket.c socket_send_channel_create, once per channel), which this save
// does not take yet: it is refused and the save fails, naming the capability. The path is removed at close and
// when the process exits.
import fs from 'node:fs';
import net from 'node:net';
import { resolve as resolvePath } from 'node:path';
import { SnapPipeError, ioError } from '../errors.js';
import { printable } from '../format/text.js';
import { shutdownSocket, socketBlocking } from '../native/uring.js';

export class StreamListener {
  /** The accepted stream's fd, once QEMU connected (-1 before). */
  fd = -1;
  /** When QEMU connected (performance.now()). */
  connectedAt = 0;
  /** Rejects when something ends the save from the listener's side: a second connection. */
  readonly failed: Promise<never>;
  private fail: (err: SnapPipeError) => void = () => undefined;
  private conn: net.Socket | undefined;
  private closed = false;
  private acceptTimer: NodeJS.Timeout | undefined;
  private readonly unlinkAtExit = () => this.unlink();

  private constructor(
    readonly path: string,
    private readonly server: net.Server,
  ) {
    this.failed = new Promise<never>((_, reject) => (this.fail = reject));
    this.failed.catch(() => undefined); // raced by the pipeline; unraced it must not count as unhandled
    process.once('exit', this.unlinkAtExit);
  }

  /** Listens on `path` with mode 0600; a stale socket left by a dead save is replaced, anything else is refused. */
  static async open(path: string): Promise<StreamListener> {
    freeListenPath(path);
    const server = net.createServer({ pauseOnConnect: true });
    const old = process.umask(0o177);
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen({ path, backlog: 4 }, () => {
          server.off('error', reject);
          resolve();
        });
      });
    } catch (err) {
      throw ioError(`listening on ${path}`, err);
    } finally {
      process.umask(old);
    }
    return new StreamListener(path, server);
  }

  /**
   * Waits for QEMU's connection, at most `timeoutMs`; returns its fd, blocking, for the reader stage. Every later
   * connection is closed at once and fails the save (multifd channels).
   */
  accept(timeoutMs: number): Promise<number> {
    return new Promise<number>((resolve, reject) => {
      const timer = (this.acceptTimer = setTimeout(() => {
        reject(new SnapPipeError('IO', `no connection on ${this.path} in ${timeoutMs / 1000} s (QEMU's migrate "unix:${this.path}" never came)`));
      }, timeoutMs));
      this.server.on('connection', (sock: net.Socket) => {
        if (this.conn) {
          sock.destroy();
          this.fail(new SnapPipeError('UNSUPPORTED', `QEMU opened a second connection to ${this.path}: its multifd channels, which snap-pipe save does not take yet; turn the multifd capability off`));
          return;
        }
        clearTimeout(timer);
        this.conn = sock;
        this.connectedAt = performance.now();
        try {
          this.fd = fdOf(sock);
          socketBlocking(this.fd);
          resolve(this.fd);
        } catch (err) {
          reject(err);
        }
      });
    });
  }

  /** Wakes a read blocked on the stream (the save failed or was stopped). */
  wake(): void {
    if (this.fd >= 0) shutdownSocket(this.fd);
  }

  /** Closes the stream and the listening socket and removes the path. Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.acceptTimer);
    this.conn?.destroy();
    this.server.close();
    this.unlink();
    process.off('exit', this.unlinkAtExit);
  }

  private unlink(): void {
    try {
      if (fs.lstatSync(this.path).isSocket()) fs.unlinkSync(this.path);
    } catch {
      // gone already
    }
  }
}

/** libuv's fd of an accepted unix socket (a Pipe handle); Node has no public accessor. */
function fdOf(sock: net.Socket): number {
  const fd = (sock as unknown as { _handle?: { fd?: number } })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) throw new SnapPipeError('IO', 'the accepted connection has no file descriptor');
  return fd;
}

/**
 * Makes `path` free to listen on: a socket there that nobody listens on (left by a save that was killed) is removed;
 * any other file, or a live socket, is refused with one line. save checks this before it touches the image.
 */
export function freeListenPath(path: string): void {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(path);
  } catch {
    return; // nothing there
  }
  if (!st.isSocket()) throw new SnapPipeError('USAGE', `--listen: ${printable(path)} exists and is not a socket; choose another path`);
  if (listening(path)) throw new SnapPipeError('USAGE', `--listen: something already listens on ${printable(path)}`);
  fs.unlinkSync(path);
}

/**
 * Whether a socket bound to `path` listens, from /proc/net/unix (Flags has __SO_ACCEPTCON, 0x10000, on listening
 * sockets: net/unix/af_unix.c unix_seq_show). Not by connecting: to another save, a connection is its stream.
 */
function listening(path: string): boolean {
  const wanted = new Set([path, resolvePath(path)]);
  for (const line of fs.readFileSync('/proc/net/unix', 'utf8').split('\n').slice(1)) {
    const cols = line.trim().split(/\s+/);
    if (cols.length < 8 || !wanted.has(cols.slice(7).join(' '))) continue;
    if ((Number.parseInt(cols[3], 16) & 0x10000) !== 0) return true;
  }
  return false;
}
