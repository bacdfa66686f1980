// Typed wrapper over the io_uring addon (native/uring.c, built by scripts/build-native.mjs into build/Release/).
// The addon checks every call again (alignment, bounds, ring state); this layer validates arguments with messages
// naming the argument and turns a bare SharedArrayBuffer into a view the addon can read.
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { SnapPipeError } from '../errors.js';

/** build/Release/uring.node, from src/native/*.ts and from dist/native/*.js alike (both two levels below the root). */
export const URING_ADDON_PATH = fileURLToPath(new URL('../../build/Release/uring.node', import.meta.url));

/** Buffers the addon accepts; a SharedArrayBuffer is wrapped in a Uint8Array here. */
export type IoMemory = ArrayBufferView | ArrayBuffer | SharedArrayBuffer;

interface NativeRing {
  prepWrite(fd: number, buf: ArrayBufferView | ArrayBuffer, bufOffset: number, length: number, fileOffset: number, tag: number): boolean;
  prepRead(fd: number, buf: ArrayBufferView | ArrayBuffer, bufOffset: number, length: number, fileOffset: number, tag: number): boolean;
  submit(): number;
  wait(minComplete: number, out: Int32Array | Uint32Array, timeoutMs?: number): number;
  registerFiles(fds: number[]): void;
  registerBuffers(views: (ArrayBufferView | ArrayBuffer)[]): void;
  close(force?: boolean): void;
  readonly inFlight: number;
  readonly queued: number;
  readonly depth: number;
  readonly blockBytes: number;
  readonly closed: boolean;
}
interface Addon {
  Ring: new (depth: number, blockBytes?: number) => NativeRing;
  setPipeSize(fd: number, bytes: number): number;
  setBlocking(fd: number, blocking?: boolean): void;
  shutdownSocket(fd: number): void;
  peekSocket(fd: number, buffer: Uint8Array): number;
  recvSocket(fd: number, buffer: Uint8Array): number;
  setSendBuffer(fd: number, bytes: number): number;
}

let loaded: { addon: Addon } | { error: string } | undefined;

function loadAddon(): { addon: Addon } | { error: string } {
  if (loaded) return loaded;
  if (!existsSync(URING_ADDON_PATH)) {
    loaded = {
      error: `the io_uring addon is not built (${URING_ADDON_PATH} is missing): install liburing-dev and run node scripts/build-native.mjs`,
    };
    return loaded;
  }
  try {
    loaded = { addon: createRequire(import.meta.url)(URING_ADDON_PATH) as Addon };
  } catch (err) {
    loaded = { error: `the io_uring addon failed to load: ${(err as Error).message.split('\n')[0]}` };
  }
  return loaded;
}

function disabledSysctl(): string {
  try {
    const v = readFileSync('/proc/sys/kernel/io_uring_disabled', 'utf8').trim();
    return v === '0' ? '' : ` (kernel.io_uring_disabled=${v})`;
  } catch {
    return '';
  }
}

/**
 * Grows the pipe on `fd` to the system's limit (/proc/sys/fs/pipe-max-size, 1 MiB by default) so that QEMU and
 * snap-pipe move the stream in large pieces: a default 64 KiB pipe caps a stream near 1 GB/s here. Returns the
 * pipe's capacity, or undefined when fd is not a pipe, the addon is not built, or the kernel says no (harmless:
 * the stream still flows, in smaller pieces).
 */
export function enlargePipe(fd: number): number | undefined {
  let max = 1 << 20;
  try {
    max = Number.parseInt(readFileSync('/proc/sys/fs/pipe-max-size', 'utf8'), 10) || max;
  } catch {
    // keep the default limit
  }
  return setPipeBytes(fd, max);
}

/**
 * Sets the capacity of the pipe on `fd` to `bytes` (F_SETPIPE_SZ; the kernel rounds up to a power of two pages).
 * Returns the capacity, or undefined when fd is not a pipe, the addon is not built, or the kernel says no.
 */
export function setPipeBytes(fd: number, bytes: number): number | undefined {
  const a = loadAddon();
  if ('error' in a) return undefined;
  try {
    return a.addon.setPipeSize(fd, bytes);
  } catch {
    return undefined;
  }
}

/** The addon, for the socket calls nothing else can make: a SnapPipeError naming the commands when it is missing. */
function socketAddon(): Addon {
  const a = loadAddon();
  if ('error' in a) throw new SnapPipeError('UNSUPPORTED', `save --listen and load --connect need the native addon: ${a.error}`);
  return a.addon;
}

/**
 * Makes reads of `fd` block (clears O_NONBLOCK): an accepted socket comes non-blocking from libuv, and a stage
 * thread reads it with blocking reads. Throws SnapPipeError when the addon is missing (nothing else can do it).
 */
export function socketBlocking(fd: number): void {
  socketAddon().setBlocking(fd);
}

/**
 * Makes `fd` non-blocking again (sets O_NONBLOCK), before a socket made blocking by socketBlocking is read through
 * libuv, whose reads loop until EAGAIN. Throws SnapPipeError when the addon is missing.
 */
export function socketNonBlocking(fd: number): void {
  socketAddon().setBlocking(fd, false);
}

/** libuv's fd of a connected or accepted unix socket (a Pipe handle); Node has no public accessor. */
export function socketFd(sock: object): number {
  const fd = (sock as { _handle?: { fd?: number } })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) throw new SnapPipeError('IO', 'the connection has no file descriptor');
  return fd;
}

/** shutdown(SHUT_RDWR) of a socket: a read blocked on it in another thread returns. False if it could not be done. */
export function shutdownSocket(fd: number): boolean {
  const a = loadAddon();
  if ('error' in a) return false;
  try {
    a.addon.shutdownSocket(fd);
    return true;
  } catch {
    return false;
  }
}

/**
 * The bytes waiting on socket `fd`, copied into `into` and left in the socket (recv with MSG_PEEK): how many, 0 when
 * the peer closed it, -1 when none have come yet. Never blocks. Throws SnapPipeError when the addon is missing.
 */
export function peekSocket(fd: number, into: Uint8Array): number {
  return socketAddon().peekSocket(fd, into);
}

/**
 * The bytes waiting on socket `fd`, read into `into` without blocking (recv with MSG_DONTWAIT), whatever the
 * socket's mode: how many, 0 when the peer closed it, -1 when none are waiting. Throws SnapPipeError when the addon
 * is missing.
 */
export function recvSocket(fd: number, into: Uint8Array): number {
  return socketAddon().recvSocket(fd, into);
}

/**
 * Grows socket `fd`'s send buffer to `bytes` (as root past net.core.wmem_max), so that a writer feeding several
 * sockets in turn rarely waits for one reader while the others starve. Returns the size the kernel reports, or
 * undefined when it could not be done (harmless: writes then block sooner).
 */
export function enlargeSendBuffer(fd: number, bytes: number): number | undefined {
  const a = loadAddon();
  if ('error' in a) return undefined;
  try {
    return a.addon.setSendBuffer(fd, bytes);
  } catch {
    return undefined;
  }
}

let probed: { ok: true } | { ok: false; reason: string } | undefined;

/** Is the io_uring backend usable here? Probes once: addon built and loadable, and a ring creatable. */
export function uringAvailable(): { ok: true } | { ok: false; reason: string } {
  if (probed) return probed;
  const a = loadAddon();
  if ('error' in a) return (probed = { ok: false, reason: a.error });
  try {
    new a.addon.Ring(2).close();
    probed = { ok: true };
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    const why =
      e.code === 'ENOSYS'
        ? 'the kernel has no io_uring (ENOSYS)'
        : e.code === 'EPERM' || e.code === 'EACCES'
          ? `io_uring is refused by the kernel or a sandbox (${e.code})${disabledSysctl()}`
          : `io_uring_queue_init failed: ${e.message}`;
    probed = { ok: false, reason: why };
  }
  return probed;
}

export interface UringRingOptions {
  /** Address, length and file offset of every request must be multiples of this (power of two). Default 4096. */
  blockBytes?: number;
}

function checkInt(name: string, v: number, min: number, max: number): void {
  if (!Number.isInteger(v) || v < min || v > max) {
    throw new RangeError(`${name} must be an integer in [${min}, ${max}], got ${v}`);
  }
}

/**
 * One io_uring instance. Requests are queued with prepWrite/prepRead (false: all `depth` slots are in flight),
 * sent with submit() (or by wait(), which submits and waits in one kernel call), and reaped with wait().
 * Each in-flight request keeps its memory referenced until its completion is reaped.
 */
export class UringRing {
  readonly depth: number;
  readonly blockBytes: number;
  private readonly ring: NativeRing;
  private lastSab: SharedArrayBuffer | undefined;
  private lastSabView: Uint8Array | undefined;

  constructor(depth: number, opts: UringRingOptions = {}) {
    checkInt('depth', depth, 1, 4096);
    const blockBytes = opts.blockBytes ?? 4096;
    checkInt('blockBytes', blockBytes, 1, 1 << 20);
    if ((blockBytes & (blockBytes - 1)) !== 0) throw new RangeError(`blockBytes must be a power of two, got ${blockBytes}`);
    const a = loadAddon();
    if ('error' in a) throw new Error(a.error);
    this.ring = new a.addon.Ring(depth, blockBytes); // throws an Error with .code/.errno when the kernel refuses
    this.depth = depth;
    this.blockBytes = blockBytes;
  }

  get inFlight(): number {
    return this.ring.inFlight;
  }
  get queued(): number {
    return this.ring.queued;
  }
  get closed(): boolean {
    return this.ring.closed;
  }

  private view(mem: IoMemory): ArrayBufferView | ArrayBuffer {
    if (ArrayBuffer.isView(mem) || mem instanceof ArrayBuffer) return mem;
    if (mem instanceof SharedArrayBuffer) {
      if (mem !== this.lastSab) {
        this.lastSab = mem;
        this.lastSabView = new Uint8Array(mem);
      }
      return this.lastSabView as Uint8Array;
    }
    throw new TypeError('buffer must be a TypedArray, DataView, ArrayBuffer or SharedArrayBuffer');
  }

  private check(fd: number, bufOffset: number, length: number, fileOffset: number, tag: number): void {
    checkInt('fd', fd, 0, 0x7fffffff);
    checkInt('bufferOffset', bufOffset, 0, Number.MAX_SAFE_INTEGER);
    checkInt('length', length, 1, 0x7ffff000);
    checkInt('fileOffset', fileOffset, 0, Number.MAX_SAFE_INTEGER);
    checkInt('tag', tag, 0, 0xffffffff);
  }

  /** Queues a write of buf[bufOffset, bufOffset+length) at fileOffset. Returns false when all slots are in flight. */
  prepWrite(fd: number, buf: IoMemory, bufOffset: number, length: number, fileOffset: number, tag: number): boolean {
    this.check(fd, bufOffset, length, fileOffset, tag);
    return this.ring.prepWrite(fd, this.view(buf), bufOffset, length, fileOffset, tag);
  }

  /** Queues a read into buf[bufOffset, bufOffset+length) from fileOffset. Returns false when all slots are in flight. */
  prepRead(fd: number, buf: IoMemory, bufOffset: number, length: number, fileOffset: number, tag: number): boolean {
    this.check(fd, bufOffset, length, fileOffset, tag);
    return this.ring.prepRead(fd, this.view(buf), bufOffset, length, fileOffset, tag);
  }

  /** Sends every queued request to the kernel in one call; returns how many were sent. */
  submit(): number {
    return this.ring.submit();
  }

  /**
   * Submits what is queued, waits until at least min(minComplete, inFlight) completions are ready (0: just look),
   * and reaps up to out.length/2 of them: out[2i] = tag (read it with `>>> 0` from an Int32Array), out[2i+1] = bytes
   * transferred or -errno. With timeoutMs >= 0 it may return fewer than minComplete. Returns the number of pairs.
   */
  wait(minComplete: number, out: Int32Array | Uint32Array, timeoutMs = -1): number {
    checkInt('minComplete', minComplete, 0, 0xffffffff);
    checkInt('timeoutMs', timeoutMs, -1, 1e9);
    if (out.length < 2) throw new RangeError('out must hold at least one (tag, result) pair');
    return this.ring.wait(minComplete, out, timeoutMs);
  }

  /** Registers fds as fixed files; later requests on them use the fixed table. [] unregisters. Not while in flight. */
  registerFiles(fds: number[]): void {
    for (const fd of fds) checkInt('fd', fd, 0, 0x7fffffff);
    this.ring.registerFiles(fds);
  }

  /** Registers memory as fixed buffers (pinned by the kernel); requests inside one use it. [] unregisters. */
  registerBuffers(mems: IoMemory[]): void {
    this.ring.registerBuffers(mems.map((m) => (m instanceof SharedArrayBuffer ? new Uint8Array(m) : this.view(m))));
  }

  /** Idempotent. Refuses while requests are in flight unless force: then it waits for the submitted ones first. */
  close(force = false): void {
    this.ring.close(force);
    this.lastSab = undefined;
    this.lastSabView = undefined;
  }
}
