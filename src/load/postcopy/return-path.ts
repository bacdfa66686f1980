// QEMU's return path as the postcopy load reads it: the only code that reads stdin (or, with --connect, the stream's
// socket). It reads without ever blocking, decodes the messages (each stamped with the time its bytes were read),
// and at the end waits for them in the event loop, bounded.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import { SnapPipeError, ioError } from '../../errors.js';
import { ReturnPathDecoder, type RpMessage } from '../../format/stream/returnpath.js';
import { recvSocket, socketNonBlocking } from '../../native/uring.js';

/**
 * QEMU's return path, decoded; every message is stamped with the time its bytes were read. Non-blocking reads while
 * the stream goes out (poll), then one bounded, blocking wait at the end (waitUntil).
 *
 * stdin is read without blocking, between sections and while idle: through a second open file description of the
 * same pipe (/proc/self/fd/0 with O_NONBLOCK), or for a socket (Node's child_process pipes) fd 0 itself switched to
 * non-blocking mode. With --connect, QEMU writes its return path to the socket the stream goes out on: that socket
 * stays blocking for the stream's writes, and is read with recv(MSG_DONTWAIT). After EOF, with nothing left to
 * send, the wait for SHUT blocks in the event loop (libuv's epoll on that fd: no polling, no thread stuck in a read)
 * for at most the session's SHUT_WAIT_MS_MAX, so a SHUT or the pipe closing is seen at once, and a destination that
 * never says SHUT ends the load with an error instead of hanging it.
 */
export class ReturnPathIn {
  private readonly fd: number;
  private readonly ownFd: boolean;
  /** For a socket on stdin: the handle that put it in non-blocking mode, held while this lives (never read through). */
  readonly socket: net.Socket | undefined;
  /** With --connect: the stream's socket, owned by its connections (load/connect.ts), read through until the end. */
  private readonly streamSocket: net.Socket | undefined;
  private readonly buf = new Uint8Array(64 << 10);
  private readonly decoder = new ReturnPathDecoder();
  /** The last phase's libuv handle on `fd` (see waitUntil); poll() no longer reads once it exists. */
  private watcher: net.Socket | undefined;
  eof = false;
  bytes = 0;

  /** Where it comes from, for messages: stdin, or the --connect socket. */
  get name(): string {
    return this.streamSocket ? 'the --connect socket' : 'stdin';
  }

  /** QEMU's return path on `fd` (stdin), or with `streamSocket` on the socket the stream goes to (fd its fd). */
  constructor(fd: number, streamSocket?: net.Socket) {
    if (streamSocket) {
      this.fd = fd;
      this.ownFd = false;
      this.streamSocket = streamSocket;
      return;
    }
    try {
      // A pipe (QEMU's exec: gives one): a second open file description of it, so that O_NONBLOCK does not change
      // the description behind fd 0.
      this.fd = fs.openSync(`/proc/self/fd/${fd}`, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
      this.ownFd = true;
      return;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENXIO') throw ioError(`opening the return path (fd ${fd})`, err);
    }
    // A socket (cannot be reopened): let libuv switch it to non-blocking mode, and read it directly.
    try {
      this.socket = new net.Socket({ fd, readable: false, writable: false });
    } catch (err) {
      throw ioError(`opening the return path (fd ${fd})`, err);
    }
    this.fd = fd;
    this.ownFd = false;
  }

  /** Reads what is there now (without waiting) and hands each whole message to `on`. */
  poll(on: (m: RpMessage, t: number) => void): void {
    assert(!this.watcher, 'ReturnPathIn.poll after waitUntil');
    if (this.eof) return;
    for (;;) {
      let n: number;
      const limit = Error.stackTraceLimit;
      Error.stackTraceLimit = 0; // EAGAIN is the common case: keep its error object cheap
      try {
        n = this.streamSocket ? recvSocket(this.fd, this.buf) : fs.readSync(this.fd, this.buf, 0, this.buf.length, null);
        if (n < 0) return; // nothing waiting on the stream's socket
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === 'EAGAIN' || code === 'EWOULDBLOCK') return;
        if (code === 'EINTR') continue;
        throw ioError(`reading the return path (${this.name})`, err);
      } finally {
        Error.stackTraceLimit = limit;
      }
      const t = performance.now();
      if (n === 0) {
        this.eof = true;
        const err = this.closedInsideMessage();
        if (err) throw err;
        return;
      }
      this.decode(this.buf.subarray(0, n), t, on);
      if (n < this.buf.length) return;
    }
  }

  private decode(data: Uint8Array, t: number, on: (m: RpMessage, t: number) => void): void {
    this.bytes += data.length;
    this.decoder.push(data);
    for (let m = this.decoder.next(); m; m = this.decoder.next()) on(m, t);
  }

  private closedInsideMessage(): SnapPipeError | undefined {
    if (this.decoder.pending === 0) return undefined;
    return new SnapPipeError('TRUNCATED', `return path from QEMU: closed inside a message (${this.decoder.pending} bytes of it)`);
  }

  /**
   * The last phase: waits, without polling, until `done()` holds after a message, the return path closes, or
   * `waitMsMax` passes; resolves false only when the time ran out. The fd is handed to libuv (a net.Socket over it:
   * epoll, so the event loop sleeps until QEMU writes or closes), and poll() may not be used afterwards. In the
   * socket case this is a second handle on fd 0; the first (this.socket) never reads, so it never registered fd 0.
   * With --connect it is the stream's own socket, made non-blocking again: nothing is written after EOF.
   */
  waitUntil(on: (m: RpMessage, t: number) => void, done: () => boolean, waitMsMax: number): Promise<boolean> {
    this.poll(on); // what is there already
    if (done() || this.eof) return Promise.resolve(true);
    let w: net.Socket;
    try {
      if (this.streamSocket) socketNonBlocking(this.fd);
      w = this.watcher = this.streamSocket ?? new net.Socket({ fd: this.fd, readable: true, writable: false });
    } catch (err) {
      throw ioError(`waiting on the return path (fd ${this.fd})`, err);
    }
    return new Promise<boolean>((resolve, reject) => {
      let settled = false;
      const finish = (err: unknown, ok: boolean) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        w.pause();
        if (err) reject(err);
        else resolve(ok);
      };
      const timer = setTimeout(() => finish(undefined, false), waitMsMax);
      w.on('data', (d: Buffer) => {
        if (settled) return;
        try {
          this.decode(d, performance.now(), on);
          if (done()) finish(undefined, true);
        } catch (err) {
          finish(err, false);
        }
      });
      w.on('end', () => {
        this.eof = true;
        finish(this.closedInsideMessage(), true);
      });
      w.on('error', (err) => finish(ioError(`reading the return path (${this.name})`, err), false));
      w.resume();
    });
  }

  close(): void {
    if (this.streamSocket) {
      this.streamSocket.pause(); // its connections close it
      this.streamSocket.removeAllListeners('data');
      return;
    }
    if (this.watcher) {
      // libuv closes the fd it was given, except 0-2 (fd 0 itself stays, as below).
      this.watcher.destroy();
      return;
    }
    if (!this.ownFd) return; // fd 0 itself: left to the process exit
    try {
      fs.closeSync(this.fd);
    } catch {
      // nothing to do
    }
  }
}
