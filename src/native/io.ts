// One I/O interface for the writer (1 MiB chunks, 4 KiB pages to an O_DIRECT fd) with two backends:
// 'uring' (batched, asynchronous, via the addon) and 'sync' (fs.writeSync/readSync, done at once, reported on reap).
// Both check the same arguments and alignment, retry EINTR/EAGAIN, finish short transfers, and report a failed
// request from reap() as SnapPipeError('IO', '<op> of N bytes at offset X: ENOSPC (...)').
import { readSync, writeSync } from 'node:fs';
import { constants as osConstants } from 'node:os';
import { getSystemErrorMap } from 'node:util';
import { SnapPipeError, ioError } from '../errors.js';
import { UringRing, uringAvailable } from './uring.js';

export type IoBackendName = 'uring' | 'sync';
export interface IoCompletion {
  tag: number;
  bytes: number;
}
export interface IoBackend {
  readonly name: IoBackendName;
  readonly queueDepth: number;
  /** Queue a write of view[off, off+len) at fileOffset; tag is returned with its completion. Throws if the queue is full (caller keeps inFlight < queueDepth). */
  write(fd: number, mem: Uint8Array, off: number, len: number, fileOffsetBytes: number, tag: number): void;
  read(fd: number, mem: Uint8Array, off: number, len: number, fileOffsetBytes: number, tag: number): void;
  /**
   * Submit what was queued and wait until at least `min` completions are ready (min is capped at inFlight); returns
   * completed requests (short transfers already resubmitted internally until whole, EINTR/EAGAIN retried). A failed
   * request throws SnapPipeError('IO', '<op> of N bytes at offset X: ENOSPC (...)') — see src/errors.ts.
   * The returned array and its objects are reused by the next reap(): read them before calling again.
   */
  reap(min: number): IoCompletion[];
  readonly inFlight: number;
  /** Idempotent. Waits for requests the kernel still holds (it never frees memory being written), then frees. */
  close(): void;
}

/**
 * backend.reap(min) (0 submits what is queued and takes what is done) with a failed request's error naming the file
 * it was on: `<path>: <op> of N bytes at offset X: EIO (...)`.
 */
export function reapNamed(backend: IoBackend, path: string, min = 1): IoCompletion[] {
  try {
    return backend.reap(min);
  } catch (err) {
    throw err instanceof SnapPipeError ? new SnapPipeError(err.code, `${path}: ${err.message}`) : err;
  }
}

export interface IoBackendOptions {
  io: IoBackendName | 'auto';
  queueDepth: number;
  /** Memory offset, length and file offset of each request must be multiples of this. Default 4096 (O_DIRECT). */
  blockBytes?: number;
}

const QUEUE_DEPTH_MAX = 4096;
const RETRIES_MAX = 1000; // EINTR/EAGAIN resubmissions of one request before it counts as failed
const ROUNDS_MAX = 1_000_000; // kernel waits in one reap(); each round completes or advances a request
const { EINTR, EAGAIN } = osConstants.errno;

const errnoNames: string[] = [];
for (const [name, n] of Object.entries(osConstants.errno)) errnoNames[n] ??= name; // EAGAIN before EWOULDBLOCK
const errnoMessages = getSystemErrorMap(); // -errno -> [name, message] (libuv's table)

/** A Node-style error object for a positive errno, for ioError(). */
function errnoError(errno: number): { code: string; message: string } {
  const code = errnoNames[errno] ?? `E${errno}`;
  const message = errnoMessages.get(-errno)?.[1] ?? `errno ${errno}`;
  return { code, message: `${code}: ${message}` };
}

function describe(op: string, len: number, fileOffset: number, doneBytes: number): string {
  return `${op} of ${len} bytes at offset ${fileOffset}${doneBytes > 0 ? ` (${doneBytes} done)` : ''}`;
}

function checkInt(name: string, v: number, min: number, max: number): void {
  if (!Number.isInteger(v) || v < min || v > max) {
    throw new RangeError(`${name} must be an integer in [${min}, ${max}], got ${v}`);
  }
}

/**
 * Arguments of one request, checked the same way for both backends. Alignment is checked against the memory's
 * offset inside its buffer (the buffer itself must start aligned: alignedShared() memory does, a plain
 * SharedArrayBuffer does not); the uring addon checks the real address again.
 */
function checkRequest(op: string, fd: number, mem: Uint8Array, off: number, len: number, pos: number, tag: number, blockBytes: number): void {
  if (!(mem instanceof Uint8Array)) throw new TypeError(`${op}: mem must be a Uint8Array`);
  checkInt(`${op}: fd`, fd, 0, 0x7fffffff);
  checkInt(`${op}: off`, off, 0, mem.length);
  checkInt(`${op}: len`, len, 1, Math.min(mem.length - off, 0x7ffff000));
  checkInt(`${op}: fileOffsetBytes`, pos, 0, Number.MAX_SAFE_INTEGER);
  checkInt(`${op}: tag`, tag, 0, 0xffffffff);
  const mask = blockBytes - 1;
  const why =
    pos % blockBytes !== 0
      ? 'offset'
      : len & mask
        ? 'length'
        : (mem.byteOffset + off) & mask
          ? `memory offset ${mem.byteOffset + off}`
          : '';
  if (why) {
    const err = new RangeError(`${op} of ${len} bytes at file offset ${pos}: ${why} not a multiple of ${blockBytes}`);
    throw Object.assign(err, { code: 'ERR_IO_ALIGNMENT' });
  }
}

const OP_WRITE = 0;
const OP_READ = 1;
const OP_NAMES = ['write', 'read'];

/** Per-request state, one entry per slot (slot = the tag the ring sees), allocated once. */
class SlotTable {
  readonly fd: Int32Array;
  readonly op: Uint8Array;
  readonly off: Float64Array;
  readonly len: Float64Array;
  readonly pos: Float64Array;
  readonly done: Float64Array;
  readonly tag: Uint32Array;
  readonly retries: Uint16Array;
  readonly mem: (Uint8Array | undefined)[];
  private readonly free: Int32Array;
  private freeCount: number;

  constructor(readonly depth: number) {
    this.fd = new Int32Array(depth);
    this.op = new Uint8Array(depth);
    this.off = new Float64Array(depth);
    this.len = new Float64Array(depth);
    this.pos = new Float64Array(depth);
    this.done = new Float64Array(depth);
    this.tag = new Uint32Array(depth);
    this.retries = new Uint16Array(depth);
    this.mem = new Array<Uint8Array | undefined>(depth).fill(undefined);
    this.free = new Int32Array(depth);
    for (let i = 0; i < depth; i++) this.free[i] = depth - 1 - i;
    this.freeCount = depth;
  }

  get used(): number {
    return this.depth - this.freeCount;
  }

  take(op: number, fd: number, mem: Uint8Array, off: number, len: number, pos: number, tag: number): number {
    if (this.freeCount === 0) {
      throw new Error(`${OP_NAMES[op]}: the I/O queue is full (${this.depth} in flight); reap before queueing more`);
    }
    const s = this.free[--this.freeCount];
    this.op[s] = op;
    this.fd[s] = fd;
    this.mem[s] = mem;
    this.off[s] = off;
    this.len[s] = len;
    this.pos[s] = pos;
    this.tag[s] = tag;
    this.done[s] = 0;
    this.retries[s] = 0;
    return s;
  }

  give(s: number): void {
    this.mem[s] = undefined;
    this.free[this.freeCount++] = s;
  }

  failure(s: number, err: unknown): SnapPipeError {
    return ioError(describe(OP_NAMES[this.op[s]], this.len[s], this.pos[s], this.done[s]), err);
  }
}

/** Completion objects handed out by reap(), allocated once and reused. */
class CompletionList {
  readonly list: IoCompletion[] = [];
  private readonly pool: IoCompletion[];
  constructor(depth: number) {
    this.pool = Array.from({ length: depth }, () => ({ tag: 0, bytes: 0 }));
  }
  reset(): void {
    this.list.length = 0;
  }
  push(tag: number, bytes: number): void {
    const c = this.pool[this.list.length];
    c.tag = tag;
    c.bytes = bytes;
    this.list.push(c);
  }
}

// NOTE for callers: neither backend orders requests. The uring backend runs in-flight requests concurrently and
// completes them in any order, so the caller must never have two in-flight writes that overlap (nor a read that
// overlaps an in-flight write): the later one is not guaranteed to land last. Wait for the first one's completion.

class UringBackend implements IoBackend {
  readonly name = 'uring' as const;
  private readonly ring: UringRing;
  private readonly slots: SlotTable;
  private readonly out: Int32Array; // (slot, result) pairs from the ring, preallocated
  private readonly done: CompletionList;
  /** Short transfers and EINTR/EAGAIN resubmitted (for tests and stats). */
  resubmits = 0;

  constructor(readonly queueDepth: number, readonly blockBytes: number) {
    this.ring = new UringRing(queueDepth, { blockBytes });
    this.slots = new SlotTable(queueDepth);
    this.out = new Int32Array(queueDepth * 2);
    this.done = new CompletionList(queueDepth);
  }

  get inFlight(): number {
    return this.slots.used;
  }

  write(fd: number, mem: Uint8Array, off: number, len: number, fileOffsetBytes: number, tag: number): void {
    checkRequest('write', fd, mem, off, len, fileOffsetBytes, tag, this.blockBytes);
    this.queue(this.slots.take(OP_WRITE, fd, mem, off, len, fileOffsetBytes, tag));
  }

  read(fd: number, mem: Uint8Array, off: number, len: number, fileOffsetBytes: number, tag: number): void {
    checkRequest('read', fd, mem, off, len, fileOffsetBytes, tag, this.blockBytes);
    this.queue(this.slots.take(OP_READ, fd, mem, off, len, fileOffsetBytes, tag));
  }

  /** Queues what is left of slot s. The ring has as many slots as we do, so it always has room. */
  private queue(s: number): void {
    const t = this.slots;
    const d = t.done[s];
    const mem = t.mem[s] as Uint8Array;
    const ok =
      t.op[s] === OP_WRITE
        ? this.ring.prepWrite(t.fd[s], mem, t.off[s] + d, t.len[s] - d, t.pos[s] + d, s)
        : this.ring.prepRead(t.fd[s], mem, t.off[s] + d, t.len[s] - d, t.pos[s] + d, s);
    if (!ok) throw new Error(`io_uring ring full with ${t.used} requests in flight (ring and slot table disagree)`);
  }

  reap(min: number): IoCompletion[] {
    checkInt('reap: min', min, 0, 0xffffffff);
    const t = this.slots;
    const done = this.done;
    done.reset();
    const target = Math.min(min, t.used);
    let failure: SnapPipeError | undefined;
    for (let rounds = 0; ; rounds++) {
      if (rounds === ROUNDS_MAX) throw new Error(`reap: no progress after ${ROUNDS_MAX} kernel waits`);
      const n = this.ring.wait(target - done.list.length, this.out); // submits what is queued, in the same call
      for (let i = 0; i < n; i++) {
        const s = this.out[2 * i];
        const res = this.out[2 * i + 1];
        if (res < 0) {
          if ((-res === EINTR || -res === EAGAIN) && t.retries[s]++ < RETRIES_MAX && !failure) {
            this.resubmits++;
            this.queue(s);
            continue;
          }
          failure ??= t.failure(s, errnoError(-res));
          t.give(s);
          continue;
        }
        if (res === 0) {
          failure ??=
            t.op[s] === OP_READ
              ? new SnapPipeError('TRUNCATED', `${describe('read', t.len[s], t.pos[s], t.done[s])}: end of file`)
              : t.failure(s, { code: 'EIO', message: 'EIO: the kernel wrote 0 bytes' });
          t.give(s);
          continue;
        }
        t.done[s] += res;
        if (t.done[s] < t.len[s]) {
          // Short transfer: resubmit the rest (O_DIRECT needs it still aligned; the kernel stops on block bounds).
          if (t.done[s] % this.blockBytes !== 0) {
            failure ??= new SnapPipeError(
              'IO',
              `${describe(OP_NAMES[t.op[s]], t.len[s], t.pos[s], t.done[s])}: short transfer left a remainder not aligned to ${this.blockBytes} bytes`,
            );
            t.give(s);
          } else if (!failure) {
            this.resubmits++;
            this.queue(s);
          } else {
            t.give(s);
          }
          continue;
        }
        done.push(t.tag[s], t.len[s]);
        t.give(s);
      }
      if (failure) throw failure; // requests still in flight stay tracked; close() waits for them
      if (done.list.length >= target) return done.list;
    }
  }

  close(): void {
    this.ring.close(true);
    for (let s = 0; s < this.slots.depth; s++) this.slots.mem[s] = undefined;
  }
}

class SyncBackend implements IoBackend {
  readonly name = 'sync' as const;
  private readonly slots: SlotTable; // requests done but not yet reported
  private readonly failures: (SnapPipeError | undefined)[];
  private readonly order: Int32Array; // slots in the order they were done
  private count = 0;
  private readonly done: CompletionList;
  private closed = false;

  constructor(readonly queueDepth: number, readonly blockBytes: number) {
    this.slots = new SlotTable(queueDepth);
    this.failures = new Array<SnapPipeError | undefined>(queueDepth).fill(undefined);
    this.order = new Int32Array(queueDepth);
    this.done = new CompletionList(queueDepth);
  }

  get inFlight(): number {
    return this.count;
  }

  write(fd: number, mem: Uint8Array, off: number, len: number, fileOffsetBytes: number, tag: number): void {
    checkRequest('write', fd, mem, off, len, fileOffsetBytes, tag, this.blockBytes);
    this.run(this.slots.take(OP_WRITE, fd, mem, off, len, fileOffsetBytes, tag));
  }

  read(fd: number, mem: Uint8Array, off: number, len: number, fileOffsetBytes: number, tag: number): void {
    checkRequest('read', fd, mem, off, len, fileOffsetBytes, tag, this.blockBytes);
    this.run(this.slots.take(OP_READ, fd, mem, off, len, fileOffsetBytes, tag));
  }

  private run(s: number): void {
    if (this.closed) throw new Error('the sync I/O backend is closed');
    const t = this.slots;
    const mem = t.mem[s] as Uint8Array;
    const len = t.len[s];
    let failure: SnapPipeError | undefined;
    while (t.done[s] < len && !failure) {
      const d = t.done[s];
      let n: number;
      try {
        n =
          t.op[s] === OP_WRITE
            ? writeSync(t.fd[s], mem, t.off[s] + d, len - d, t.pos[s] + d)
            : readSync(t.fd[s], mem, t.off[s] + d, len - d, t.pos[s] + d);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if ((code === 'EINTR' || code === 'EAGAIN') && t.retries[s]++ < RETRIES_MAX) continue;
        failure = t.failure(s, err);
        break;
      }
      if (n === 0) {
        failure =
          t.op[s] === OP_READ
            ? new SnapPipeError('TRUNCATED', `${describe('read', len, t.pos[s], d)}: end of file`)
            : t.failure(s, { code: 'EIO', message: 'EIO: the kernel wrote 0 bytes' });
      }
      t.done[s] += n;
    }
    this.failures[s] = failure;
    this.order[this.count++] = s;
  }

  reap(min: number): IoCompletion[] {
    checkInt('reap: min', min, 0, 0xffffffff);
    const t = this.slots;
    this.done.reset();
    let failure: SnapPipeError | undefined;
    for (let i = 0; i < this.count; i++) {
      const s = this.order[i];
      failure ??= this.failures[s];
      if (!this.failures[s]) this.done.push(t.tag[s], t.len[s]);
      this.failures[s] = undefined;
      t.give(s);
    }
    this.count = 0;
    if (failure) throw failure;
    return this.done.list;
  }

  close(): void {
    this.closed = true;
  }
}

/** Opens the backend asked for; 'auto' picks io_uring when it works here, else sync with a one-line note saying why. */
export function openIoBackend(opts: IoBackendOptions): { backend: IoBackend; note?: string } {
  const { io, queueDepth } = opts;
  const blockBytes = opts.blockBytes ?? 4096;
  checkInt('queueDepth', queueDepth, 1, QUEUE_DEPTH_MAX);
  checkInt('blockBytes', blockBytes, 1, 1 << 20);
  if ((blockBytes & (blockBytes - 1)) !== 0) throw new RangeError(`blockBytes must be a power of two, got ${blockBytes}`);
  if (io === 'sync') return { backend: new SyncBackend(queueDepth, blockBytes) };
  if (io !== 'uring' && io !== 'auto') throw new RangeError(`io must be 'uring', 'sync' or 'auto', got ${String(io)}`);
  const probe = uringAvailable();
  if (probe.ok) {
    try {
      return { backend: new UringBackend(queueDepth, blockBytes) };
    } catch (err) {
      if (io === 'uring') throw ioError(`io_uring with queue depth ${queueDepth}`, err);
      const e = err as NodeJS.ErrnoException;
      return {
        backend: new SyncBackend(queueDepth, blockBytes),
        note: `io_uring not used: io_uring_queue_init(${queueDepth}) failed with ${e.code ?? e.message}; using the sync backend`,
      };
    }
  }
  if (io === 'uring') throw new SnapPipeError('IO', `io_uring unavailable: ${probe.reason}`);
  return { backend: new SyncBackend(queueDepth, blockBytes), note: `io_uring not used: ${probe.reason}; using the sync backend` };
}
