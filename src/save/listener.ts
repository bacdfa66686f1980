// `save --listen unix:PATH`: the socket QEMU's `migrate "unix:PATH"` connects to, owned here from listen to unlink.
// The save starts its stage threads and opens the image first, then listens, so QEMU's migration (and the paused
// guest's downtime) never waits for snap-pipe to start. The socket file is created with mode 0600 (only the user
// running snap-pipe, normally QEMU's, may connect). QEMU opens one connection for the migration stream (the main
// channel) and, with the multifd capability, one per multifd channel (migration/socket.c socket_send_channel_create,
// once per channel). They are told apart by their first bytes, left in the socket for the stage that reads it:
// `QEVM` starts the main channel, a multifd init message (0x11223344, then the channel id) a multifd channel, as
// QEMU 10's own destination does (migration.c migration_ioc_process_incoming; QEMU 7.2's took the first connection
// as the main channel, which the order QEMU connects in allows, but a peek does not depend on it). Once the main
// channel and the --multifd-channels channels are there, any further connection fails the save. The accepted fds
// are made blocking for the stage threads; the save's answers on QEMU's return path go back on the main channel.
// The path is removed at close and when the process exits.
import fs from 'node:fs';
import net from 'node:net';
import { resolve as resolvePath } from 'node:path';
import { SnapPipeError, ioError } from '../errors.js';
import { printable } from '../format/text.js';
import { decodeInit, MULTIFD_INIT_BYTES, MULTIFD_MAGIC } from '../format/stream/multifd.js';
import { QEVM_MAGIC } from '../format/stream/constants.js';
import { peekSocket, shutdownSocket, socketBlocking, socketFd } from '../native/uring.js';
import { MAX_CHANNELS } from './ring/layout.js';

/**
 * After QEMU's first connection, how long its other channels may take to connect and send their first bytes. QEMU
 * opens them all at once (multifd.c multifd_send_setup / multifd_save_setup), within milliseconds.
 */
export const CHANNELS_TIMEOUT_MS = 30_000;
/** A channel id is one byte (multifd.c MultiFDInit_t): the listener checks it against --multifd-channels itself. */
const MULTIFD_CHANNEL_IDS = 256;
/** How long a connection beyond the expected ones may take to say what it is before it fails the save anyway. */
const EXTRA_NAMING_MS = 1_000;
/** A TLS record of type handshake, version 3.x: how a TLS client's first message starts (RFC 8446 5.1). */
const TLS_HANDSHAKE = 0x16;
/** How often a connection is looked at until its first bytes have come. */
const PEEK_INTERVAL_MS = 2;

/** The accepted connections: the main channel's fd, and each multifd channel's fd by its channel id. */
export interface Connections {
  main: number;
  channels: number[];
}

export class StreamListener {
  /** When QEMU's first connection came (performance.now()), 0 before. */
  connectedAt = 0;
  /** Rejects when something ends the save from the listener's side: a connection after the expected ones. */
  readonly failed: Promise<never>;
  private fail: (err: SnapPipeError) => void = () => undefined;
  private readonly conns: net.Socket[] = [];
  private readonly fds: number[] = [];
  private closed = false;
  private timers: NodeJS.Timeout[] = [];
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
        server.listen({ path, backlog: 4 + MAX_CHANNELS }, () => {
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
   * Waits for QEMU's main channel and its `channels` multifd channels: the first connection at most `timeoutMs`,
   * the rest within CHANNELS_TIMEOUT_MS of it. Returns their fds, blocking. A connection beyond them, or one that
   * is neither, fails the save.
   */
  accept(timeoutMs: number, channels: number): Promise<Connections> {
    return new Promise<Connections>((resolve, reject) => {
      const found: { main: number; channels: number[] } = { main: -1, channels: new Array<number>(channels).fill(-1) };
      let pending = 1 + channels;
      let settled = false;
      // An error after the expected connections are all there (one classified late) ends the save instead.
      const done = (err?: unknown) => {
        if (settled) {
          if (err) this.fail(err instanceof SnapPipeError ? err : new SnapPipeError('IO', String(err)));
          return;
        }
        settled = true;
        this.clearTimers();
        if (err) reject(err);
        else resolve(found);
      };
      this.timers.push(setTimeout(() => done(new SnapPipeError('IO', `no connection on ${this.path} in ${timeoutMs / 1000} s (QEMU's migrate "unix:${this.path}" never came)`)), timeoutMs));
      this.server.on('connection', (sock: net.Socket) => {
        if (pending === 0 || this.closed) {
          this.refuseExtra(sock, channels);
          return;
        }
        if (this.conns.length === 0) this.firstConnection(channels, found, done);
        this.conns.push(sock);
        this.classify(sock, channels)
          .then((kind) => {
            if (kind.main) {
              if (found.main >= 0) throw new SnapPipeError('BAD_STREAM', `two migration streams (QEVM) connected to ${this.path}`);
              found.main = kind.fd;
            } else {
              if (found.channels[kind.channel] >= 0) throw new SnapPipeError('BAD_STREAM', `two multifd channels with id ${kind.channel} connected to ${this.path}`);
              found.channels[kind.channel] = kind.fd;
            }
            if (--pending === 0) done();
          })
          .catch(done);
      });
    });
  }

  /**
   * A connection after the expected ones fails the save, saying what it was: a multifd channel without
   * --multifd-channels or past its count (QEMU 7.2 connects its main channel first, so the stream may already
   * flow), or a connection too many.
   */
  private refuseExtra(sock: net.Socket, channels: number): void {
    const tooMany = new SnapPipeError('UNSUPPORTED', `QEMU opened one more connection to ${this.path} than the main channel and ${channels} multifd channels (--multifd-channels ${channels}; QEMU's multifd-channels must be the same)`);
    if (this.closed) {
      sock.destroy();
      return;
    }
    this.conns.push(sock);
    // Its first bytes name it better; one that sends none within EXTRA_NAMING_MS is refused as it is.
    const silent = new Promise<void>((resolve) => this.timers.push(setTimeout(resolve, EXTRA_NAMING_MS)));
    Promise.race([this.classify(sock, channels), silent]).then(
      () => this.fail(tooMany),
      (err: unknown) => this.fail(err instanceof SnapPipeError ? err : tooMany),
    );
  }

  /** The first connection came: the others must follow within CHANNELS_TIMEOUT_MS. */
  private firstConnection(channels: number, found: Connections, done: (err: unknown) => void): void {
    this.connectedAt = performance.now();
    this.clearTimers();
    this.timers.push(setTimeout(() => {
      const got = found.channels.filter((fd) => fd >= 0).length;
      const what = found.main < 0 ? 'no migration stream (QEVM)' : `${got} of the ${channels} multifd channels --multifd-channels names`;
      done(new SnapPipeError('IO', `QEMU connected to ${this.path} but sent ${what} in ${CHANNELS_TIMEOUT_MS / 1000} s (are QEMU's multifd capability and multifd-channels the same as this save's --multifd-channels?)`));
    }, CHANNELS_TIMEOUT_MS));
  }

  /** Waits for a connection's first bytes (left in the socket) and says which channel it is. */
  private async classify(sock: net.Socket, channels: number): Promise<{ main: true; fd: number } | { main: false; fd: number; channel: number }> {
    const fd = socketFd(sock);
    this.fds.push(fd);
    const head = await this.peek(fd, 4);
    const magic = ((head[0] << 24) | (head[1] << 16) | (head[2] << 8) | head[3]) >>> 0;
    if (magic === QEVM_MAGIC) {
      socketBlocking(fd);
      return { main: true, fd };
    }
    if (head[0] === TLS_HANDSHAKE && head[1] === 3) {
      throw new SnapPipeError('UNSUPPORTED', `a TLS session on ${this.path} (QEMU's tls-creds): snap-pipe save takes the stream in the clear; a unix socket is local`);
    }
    if (magic !== MULTIFD_MAGIC) {
      throw new SnapPipeError('BAD_STREAM', `a connection to ${this.path} that is neither a migration stream nor a multifd channel (it starts 0x${magic.toString(16).padStart(8, '0')})`);
    }
    if (channels === 0) {
      throw new SnapPipeError('UNSUPPORTED', `QEMU opened a multifd channel to ${this.path}: give save --multifd-channels N with QEMU's multifd-channels (2 unless set), or turn QEMU's multifd capability off`);
    }
    const { channelId } = decodeInit(await this.peek(fd, MULTIFD_INIT_BYTES), MULTIFD_CHANNEL_IDS);
    if (channelId >= channels) {
      throw new SnapPipeError('UNSUPPORTED', `QEMU opened multifd channel ${channelId} to ${this.path}, but --multifd-channels is ${channels}: give QEMU's multifd-channels`);
    }
    socketBlocking(fd);
    return { main: false, fd, channel: channelId };
  }

  /** The first n bytes of the socket, once they have come; they stay in the socket. */
  private async peek(fd: number, n: number): Promise<Uint8Array> {
    const buf = new Uint8Array(n);
    for (;;) {
      if (this.closed) throw new SnapPipeError('IO', `${this.path} closed while a connection was being accepted`);
      const got = peekSocket(fd, buf);
      if (got === n) return buf;
      if (got === 0) throw new SnapPipeError('TRUNCATED', `a connection to ${this.path} closed before its first ${n} bytes`);
      await new Promise((resolve) => setTimeout(resolve, PEEK_INTERVAL_MS));
    }
  }

  private clearTimers(): void {
    for (const t of this.timers) clearTimeout(t);
    this.timers = [];
  }

  /** Wakes every read blocked on a connection (the save failed, was stopped, or is done with them). */
  wake(): void {
    for (const fd of this.fds) shutdownSocket(fd);
  }

  /** Closes the stream and the listening socket and removes the path. Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.clearTimers();
    for (const c of this.conns) c.destroy();
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
