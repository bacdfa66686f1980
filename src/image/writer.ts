// Writes a snap-pipe QCOW2 image: header (marked incomplete) at create, data clusters in arrival order (allocate()
// places a virtual cluster in the file; the caller's writes and reads go through queueWrite/queueRead on its I/O
// backend, naming the cluster, never a file offset), then at finish metadata + L2 + L1 + refcounts, fdatasync, and
// only then the header marked complete, fdatasync again. Holds only an fd, a scratch cluster and typed arrays:
// usable in a worker. `fd` is public for the tests, which write clusters without a backend.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import { dirname } from 'node:path';
import { crc32 } from 'node:zlib';
import { SnapPipeError, ioError } from '../errors.js';
import { preallocate } from '../native/fastmem.js';
import { alignedShared } from '../native/memory.js';
import type { IoBackend } from '../native/io.js';
import { encodeMeta } from '../format/image/metadata.js';
import { nonRegularKind, notRegular, openImageFile } from './open.js';
import {
  ENTRIES_PER_TABLE_CLUSTER,
  HEADER_AREA_BYTES,
  SNAP_FLAG_COMPLETE,
  decodeHeader,
  encodeHeader,
  fillRefcountBlock,
  layoutTail,
  snapHeader,
  tableEntry,
  writeEntry,
  type TailLayout,
} from '../format/image/qcow2.js';
import { FORMAT_VERSION, type SnapshotMeta } from '../format/image/types.js';
import { CLUSTER_BYTES } from '../format/units.js';

/**
 * The file's blocks are allocated (fallocate) this far ahead of the data clusters handed out, and the file is cut to
 * its real length at finish. An O_DIRECT write past the end of file must extend it, which ext4 does under the inode's
 * exclusive lock, one write at a time: measured here, 1 MiB writes at queue depth 16 ran at 1.1 GB/s into a growing
 * file against 2.05 GB/s into one already sized. A write into a hole of a sized (sparse) file must still allocate its
 * blocks first: fio measured 1400 MB/s into one against 1730 MB/s into a preallocated file. Where fallocate is refused
 * (ENOSPC for this much, a file system without it), the file is sized sparse instead (ftruncate).
 *
 * 64 MiB at a time, not 1 GiB as before: fallocate holds the inode's lock, which every O_DIRECT write also takes, and
 * while an image replaced by `--force` is still being freed (see removeForReplace) one 1 GiB call took 95-150 ms,
 * right before the first write, where 64 MiB calls took 0-15 ms each. Fresh saves ran as fast (3.06 GB stream, 5
 * rounds: medians 2.09 s at 64 MiB, 2.11 s at 1 GiB), and a save killed outright leaves at most 64 MiB allocated past
 * its last cluster.
 */
export const SIZE_AHEAD_BYTES = 64 * CLUSTER_BYTES;

/** Virtual cluster indices must fit an Int32Array (2^31 MiB = 2 PiB of virtual disk). */
const VIRT_CLUSTER_MAX = 0x7fff_ffff;

function roundUpToCluster(bytes: number): number {
  return Math.ceil(bytes / CLUSTER_BYTES) * CLUSTER_BYTES;
}

/** Where the RAM blocks end in the virtual disk (the metadata follows), each block cluster aligned. */
function ramEndBytesOf(meta: SnapshotMeta): number {
  let ramEndBytes = 0;
  for (const b of meta.blocks) {
    assert(b.virtOffsetBytes % CLUSTER_BYTES === 0, `finish: block ${b.id} not cluster aligned`);
    ramEndBytes = Math.max(ramEndBytes, b.virtOffsetBytes + roundUpToCluster(b.lengthBytes));
  }
  return ramEndBytes;
}

function isEinval(err: unknown): boolean {
  return (err as NodeJS.ErrnoException | undefined)?.code === 'EINVAL';
}

function noDirect(path: string): SnapPipeError {
  return new SnapPipeError('NO_DIRECT', `${path}: the file system refuses O_DIRECT; use --no-direct`);
}

/** Refuses to replace anything but a missing file, an empty file or an unfinished snap-pipe image (unless forced). */
function checkOverwrite(path: string, force: boolean): void {
  let st: fs.Stats;
  try {
    st = fs.statSync(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw ioError(`stat ${path}`, err);
  }
  // Even with --force: the writer relies on a regular file's holes reading as zeros (clusters written in part) and
  // on ftruncate, neither of which a device gives. Nothing else is opened, let alone removed or truncated: a FIFO
  // opened for writing could wait for a reader forever.
  const kind = nonRegularKind(st);
  if (kind !== undefined) throw notRegular(path, kind, 'writes');
  if (force) return;
  if (st.size === 0) return;
  const head = new Uint8Array(HEADER_AREA_BYTES);
  let got = 0;
  const fd = openImageFile(path, { direct: false });
  try {
    got = fs.readSync(fd, head, 0, head.byteLength, 0);
  } catch (err) {
    throw ioError(`read ${path}`, err);
  } finally {
    fs.closeSync(fd);
  }
  const decoded = decodeHeader(head.subarray(0, got));
  if (decoded.kind === 'ok' && decoded.snap !== undefined) {
    if ((decoded.snap.flags & SNAP_FLAG_COMPLETE) === 0) return; // an interrupted save: fine to replace
    throw new SnapPipeError('EXISTS', `${path} holds a complete snap-pipe image; use --force to overwrite`);
  }
  throw new SnapPipeError('EXISTS', `${path} exists and is not a snap-pipe image; use --force to overwrite`);
}

/** nonRegularKind of what `fd` is open on. */
function fstatKind(path: string, fd: number): string | undefined {
  try {
    return nonRegularKind(fs.fstatSync(fd));
  } catch (err) {
    fs.closeSync(fd);
    throw ioError(`stat ${path}`, err);
  }
}

/** nonRegularKind of what `path` names now (undefined when it cannot tell). */
function kindAt(path: string): string | undefined {
  try {
    return nonRegularKind(fs.statSync(path));
  } catch {
    return undefined;
  }
}

/** What a replaced file's successor takes over from it. */
interface Replaced {
  mode: number;
  uid: number;
  gid: number;
}

/**
 * Makes way for a new image where an old one may be replaced (checkOverwrite allowed it) by removing the old file's
 * name and letting its blocks go in the background, instead of truncating it (O_TRUNC) before the first byte is
 * read. Freeing a multi-GiB file is slow (here, with `/` mounted with `discard`: 0.69 s to truncate a 3.3 GB
 * image, 1.39 s to delete it, nearly all of it waiting on the device), and QEMU's migration thread waits for the
 * first read. The old inode stays alive through one descriptor, closed on the thread pool, so the freeing runs there
 * while the stream flows. Measured over a 3.3 GB image, 5 pairs: the first 128 MiB of the stream through 0.48–0.62 s
 * after the start instead of 1.12–1.26 s; the whole save 2.42–2.58 s instead of 2.75–2.98 s.
 *
 * Only for a plain file with one link, owned by this user (or any, for root: the owner is carried over), on a file
 * system with room for the old file's size again plus the writer's allocation ahead: until the old blocks are free,
 * the new image cannot use them. Otherwise (a symlink, which is written through; other hard links, which must see the
 * new image; another owner; little room; a directory this process may not change) the old file is truncated in
 * place, as before. Returns what the new file takes over (mode, owner), or undefined when nothing was removed.
 */
function removeForReplace(path: string, direct: boolean): Replaced | undefined {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(path);
  } catch {
    return undefined;
  }
  if (!st.isFile() || st.nlink !== 1 || st.size === 0) return undefined;
  const euid = process.geteuid?.() ?? -1;
  if (euid !== 0 && st.uid !== euid) return undefined;
  try {
    const fsStat = fs.statfsSync(dirname(path));
    if (fsStat.bavail * fsStat.bsize < st.blocks * 512 + SIZE_AHEAD_BYTES) return undefined;
  } catch {
    return undefined;
  }
  let fd: number;
  try {
    // With O_DIRECT this is also the probe: on a file system that refuses it, nothing has changed yet.
    fd = openImageFile(path, { direct });
  } catch (err) {
    if (err instanceof SnapPipeError && err.code === 'NO_DIRECT') throw err;
    return undefined;
  }
  try {
    fs.unlinkSync(path);
  } catch {
    fs.closeSync(fd);
    return undefined;
  }
  // The last reference to the old inode: its blocks are freed when this closes, on the thread pool.
  fs.close(fd, () => {});
  return { mode: st.mode & 0o7777, uid: st.uid, gid: st.gid };
}

export class ImageWriter {
  readonly path: string;
  readonly fd: number;
  readonly direct: boolean;
  /** One aligned cluster for everything the writer itself writes. */
  private readonly scratch: Uint8Array;
  /** Host cluster index per virtual cluster; 0 = not allocated (host cluster 0 is the header). */
  private hostClusterOfVirt: Int32Array;
  /** Virtual cluster index per allocation, in allocation order. */
  private allocOrder: Int32Array;
  private allocCount = 0;
  /** The file's length as last set ahead of the data (0: only what was written). */
  private sizedBytes = 0;
  /** False once fallocate was refused: the file is then sized sparse. */
  private preallocating = true;
  /** End of the furthest byte written or handed out for writing. */
  private endBytes = 0;
  private finished = false;
  private closed = false;

  private constructor(path: string, fd: number, direct: boolean, scratch: Uint8Array) {
    this.path = path;
    this.fd = fd;
    this.direct = direct;
    this.scratch = scratch;
    this.hostClusterOfVirt = new Int32Array(1024);
    this.allocOrder = new Int32Array(1024);
  }

  static create(path: string, opts: { direct: boolean; force: boolean }): ImageWriter {
    checkOverwrite(path, opts.force);
    const replaced = removeForReplace(path, opts.direct);
    const c = fs.constants;
    const flags = c.O_RDWR | c.O_CREAT | c.O_TRUNC | (opts.direct ? c.O_DIRECT : 0);
    const existed = fs.existsSync(path);
    let fd: number;
    try {
      fd = fs.openSync(path, flags, 0o644);
    } catch (err) {
      if (opts.direct && isEinval(err)) {
        // O_CREAT made the file before O_DIRECT was refused: leave nothing behind that was not there before.
        if (!existed) fs.rmSync(path, { force: true });
        // EINVAL speaks of the file system only for a regular file (the name may have been taken since the check).
        const kind = existed ? kindAt(path) : undefined;
        if (kind !== undefined) throw notRegular(path, kind, 'writes');
        throw noDirect(path);
      }
      throw ioError(`open ${path}`, err);
    }
    // checkOverwrite saw a regular file or none; whatever took the name since then is not written to.
    const kind = fstatKind(path, fd);
    if (kind !== undefined) {
      fs.closeSync(fd);
      throw notRegular(path, kind, 'writes');
    }
    if (replaced) {
      try {
        fs.fchmodSync(fd, replaced.mode);
        // Only root may give a file away; for anyone else the owner is already the same (removeForReplace).
        if (process.geteuid?.() === 0) fs.fchownSync(fd, replaced.uid, replaced.gid);
      } catch (err) {
        fs.closeSync(fd);
        throw ioError(`give ${path} the mode and owner of the image it replaces`, err);
      }
    }
    const scratch = new Uint8Array(alignedShared(CLUSTER_BYTES), 0, CLUSTER_BYTES);
    const writer = new ImageWriter(path, fd, opts.direct, scratch);
    try {
      // The header cluster, marked incomplete: also the O_DIRECT probe (first aligned write).
      scratch.fill(0);
      writer.encodeHeaderInto(scratch, undefined, 0, 0);
      try {
        writer.writeFull(scratch, CLUSTER_BYTES, 0);
      } catch (err) {
        if (opts.direct && err instanceof SnapPipeError && (err.code === 'NO_DIRECT' || err.message.includes('EINVAL'))) {
          throw noDirect(path);
        }
        throw err;
      }
      writer.sync();
    } catch (err) {
      writer.close();
      throw err;
    }
    return writer;
  }

  /** Clusters allocated so far. */
  get dataClusters(): number {
    return this.allocCount;
  }

  allocate(virtCluster: number): { hostOffsetBytes: number; fresh: boolean } {
    assert(!this.finished && !this.closed, 'allocate after finish/close');
    assert(Number.isInteger(virtCluster) && virtCluster >= 0 && virtCluster < VIRT_CLUSTER_MAX, `allocate: bad cluster ${virtCluster}`);
    if (virtCluster >= this.hostClusterOfVirt.length) {
      let n = this.hostClusterOfVirt.length;
      while (n <= virtCluster) n *= 2;
      const grown = new Int32Array(Math.min(n, VIRT_CLUSTER_MAX));
      grown.set(this.hostClusterOfVirt);
      this.hostClusterOfVirt = grown;
    }
    const existing = this.hostClusterOfVirt[virtCluster];
    if (existing !== 0) return { hostOffsetBytes: existing * CLUSTER_BYTES, fresh: false };
    assert(this.allocCount + 1 < VIRT_CLUSTER_MAX, 'allocate: host file too large');
    if (this.allocCount === this.allocOrder.length) {
      const grown = new Int32Array(this.allocOrder.length * 2);
      grown.set(this.allocOrder);
      this.allocOrder = grown;
    }
    const hostCluster = 1 + this.allocCount;
    this.allocOrder[this.allocCount] = virtCluster;
    this.allocCount++;
    this.hostClusterOfVirt[virtCluster] = hostCluster;
    const endBytes = (hostCluster + 1) * CLUSTER_BYTES;
    this.endBytes = Math.max(this.endBytes, endBytes);
    if (endBytes > this.sizedBytes) this.sizeAhead(endBytes + SIZE_AHEAD_BYTES);
    return { hostOffsetBytes: hostCluster * CLUSTER_BYTES, fresh: true };
  }

  /**
   * Queues on `io` a write of mem[off, off + len) at byte `at` of allocated virtual cluster `vc` (tagged `tag`):
   * the caller names clusters; where they lie in the file stays here.
   */
  queueWrite(io: IoBackend, mem: Uint8Array, off: number, len: number, vc: number, at: number, tag: number): void {
    io.write(this.fd, mem, off, len, this.hostBytesOf(vc, at, len), tag);
  }

  /** Queues on `io` a read of byte `at` of allocated virtual cluster `vc` into mem[off, off + len) (tagged `tag`). */
  queueRead(io: IoBackend, mem: Uint8Array, off: number, len: number, vc: number, at: number, tag: number): void {
    io.read(this.fd, mem, off, len, this.hostBytesOf(vc, at, len), tag);
  }

  private hostBytesOf(vc: number, at: number, len: number): number {
    const host = vc < this.hostClusterOfVirt.length ? this.hostClusterOfVirt[vc] : 0;
    assert(host !== 0, `cluster ${vc} was never allocated`);
    assert(at >= 0 && at + len <= CLUSTER_BYTES, `bytes [${at}, ${at + len}) outside a cluster`);
    return host * CLUSTER_BYTES + at;
  }

  /** Writes metadata and tables, makes them durable, then marks the header complete and makes that durable. */
  finish(meta: SnapshotMeta): void {
    assert(!this.finished && !this.closed, 'finish twice or after close');
    assert.equal(meta.formatVersion, FORMAT_VERSION, 'finish: meta.formatVersion');
    const metaVirtCluster = ramEndBytesOf(meta) / CLUSTER_BYTES;
    const l1IndicesWithData = this.l1IndicesWithData(metaVirtCluster);
    const metaBytes = encodeMeta(meta);
    const metaCrc32 = crc32(metaBytes) >>> 0;
    const layout = layoutTail({
      dataClusters: this.allocCount,
      metaVirtOffsetBytes: metaVirtCluster * CLUSTER_BYTES,
      metaBytes: metaBytes.byteLength,
      isL1IndexUsedByData: (i) => l1IndicesWithData.has(i),
    });
    this.writeMetadata(layout, metaBytes);
    this.writeL2Tables(layout, metaVirtCluster);
    this.writeL1Table(layout);
    this.writeRefcounts(layout);
    // The file ends at its last cluster, not at the size set ahead of the data.
    if (this.sizedBytes > this.endBytes) this.resize(this.endBytes);
    // Data, metadata and tables durable before the header can say "complete".
    this.sync();
    const s = this.scratch;
    s.fill(0, 0, HEADER_AREA_BYTES);
    this.encodeHeaderInto(s, layout, metaBytes.byteLength, metaCrc32);
    this.writeFull(s, HEADER_AREA_BYTES, 0);
    this.sync();
    this.finished = true;
  }

  /**
   * Writes why the save failed into the header of the image, which stays incomplete (`snap-pipe info` and `load`
   * show it): QEMU may already have reported the migration completed, so the image must say what went wrong.
   * Does nothing once finished or closed.
   */
  recordFailure(line: string): void {
    if (this.finished || this.closed) return;
    const s = this.scratch;
    this.encodeHeaderInto(s, undefined, 0, 0, line);
    this.writeFull(s, HEADER_AREA_BYTES, 0);
    this.sync();
  }

  /** Idempotent. An unfinished image stays marked incomplete. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    // An unfinished save ends at its last cluster too (best effort: it is already failing or abandoned).
    if (this.sizedBytes > this.endBytes) {
      try {
        this.resize(this.endBytes);
      } catch {
        // the file stays longer, still marked incomplete
      }
    }
    try {
      fs.closeSync(this.fd);
    } catch (err) {
      throw ioError(`close ${this.path}`, err);
    }
  }

  /** The L1 entries whose L2 tables map data clusters, all of which lie before the metadata's `metaVirtCluster`. */
  private l1IndicesWithData(metaVirtCluster: number): Set<number> {
    const used = new Set<number>();
    for (let i = 0; i < this.allocCount; i++) {
      const v = this.allocOrder[i];
      assert(v < metaVirtCluster, `finish: data cluster ${v} lies outside the RAM blocks`);
      used.add(Math.floor(v / ENTRIES_PER_TABLE_CLUSTER));
    }
    return used;
  }

  private writeMetadata(layout: TailLayout, metaBytes: Uint8Array): void {
    const s = this.scratch;
    const C = CLUSTER_BYTES;
    for (let i = 0; i < layout.metaClusters; i++) {
      s.fill(0);
      s.set(metaBytes.subarray(i * C, Math.min((i + 1) * C, metaBytes.byteLength)));
      this.writeFull(s, C, (layout.metaFirstCluster + i) * C);
    }
  }

  /** One L2 table per L1 entry that maps something: data clusters, then the metadata's. */
  private writeL2Tables(layout: TailLayout, metaVirtCluster: number): void {
    const s = this.scratch;
    const C = CLUSTER_BYTES;
    const virtualClusters = layout.virtualBytes / C;
    layout.l2ForL1Index.forEach((l1Index, k) => {
      s.fill(0);
      const first = l1Index * ENTRIES_PER_TABLE_CLUSTER;
      const end = Math.min(first + ENTRIES_PER_TABLE_CLUSTER, virtualClusters);
      for (let v = first; v < end; v++) {
        const host = this.hostClusterFor(v, layout, metaVirtCluster);
        if (host !== 0) writeEntry(s, v - first, tableEntry(host * C));
      }
      this.writeFull(s, C, (layout.l2FirstCluster + k) * C);
    });
  }

  private writeL1Table(layout: TailLayout): void {
    const s = this.scratch;
    const C = CLUSTER_BYTES;
    for (let i = 0; i < layout.l1Clusters; i++) {
      s.fill(0);
      layout.l2ForL1Index.forEach((l1Index, k) => {
        const slot = l1Index - i * ENTRIES_PER_TABLE_CLUSTER;
        if (slot >= 0 && slot < ENTRIES_PER_TABLE_CLUSTER) writeEntry(s, slot, tableEntry((layout.l2FirstCluster + k) * C));
      });
      this.writeFull(s, C, (layout.l1FirstCluster + i) * C);
    }
  }

  /** Refcount blocks (every cluster of the file used once), then the refcount table naming them. */
  private writeRefcounts(layout: TailLayout): void {
    const s = this.scratch;
    const C = CLUSTER_BYTES;
    for (let b = 0; b < layout.refcountBlocks; b++) {
      fillRefcountBlock(s, b, layout.totalClusters);
      this.writeFull(s, C, (layout.refcountBlockFirstCluster + b) * C);
    }
    for (let i = 0; i < layout.refcountTableClusters; i++) {
      s.fill(0);
      for (let slot = 0; slot < ENTRIES_PER_TABLE_CLUSTER; slot++) {
        const b = i * ENTRIES_PER_TABLE_CLUSTER + slot;
        if (b >= layout.refcountBlocks) break;
        writeEntry(s, slot, BigInt((layout.refcountBlockFirstCluster + b) * C));
      }
      this.writeFull(s, C, (layout.refcountTableFirstCluster + i) * C);
    }
  }

  private hostClusterFor(v: number, layout: TailLayout, metaVirtCluster: number): number {
    if (v >= metaVirtCluster) return layout.metaFirstCluster + (v - metaVirtCluster);
    return v < this.hostClusterOfVirt.length ? this.hostClusterOfVirt[v] : 0;
  }

  private encodeHeaderInto(dst: Uint8Array, layout: TailLayout | undefined, metaBytes: number, metaCrc32: number, failure?: string): void {
    const C = CLUSTER_BYTES;
    encodeHeader(
      dst,
      snapHeader({
        virtualBytes: layout ? layout.virtualBytes : 0,
        l1Entries: layout ? layout.l1Entries : 0,
        l1OffsetBytes: layout ? layout.l1FirstCluster * C : 0,
        refcountTableOffsetBytes: layout ? layout.refcountTableFirstCluster * C : 0,
        refcountTableClusters: layout ? layout.refcountTableClusters : 0,
      }),
      {
        formatVersion: FORMAT_VERSION,
        flags: layout ? SNAP_FLAG_COMPLETE : 0,
        metaVirtOffsetBytes: layout ? layout.metaVirtOffsetBytes : 0,
        metaBytes,
        metaCrc32,
      },
      failure,
    );
  }

  /** Writes `lengthBytes` from the start of `src` at `positionBytes`, resubmitting short writes. */
  private writeFull(src: Uint8Array, lengthBytes: number, positionBytes: number): void {
    assert(lengthBytes % 4096 === 0 && positionBytes % 4096 === 0, 'writeFull: unaligned');
    let done = 0;
    // Bounded: each round writes at least one byte or throws.
    while (done < lengthBytes) {
      let n: number;
      try {
        n = fs.writeSync(this.fd, src, done, lengthBytes - done, positionBytes + done);
      } catch (err) {
        throw ioError(`write ${this.path} at byte ${positionBytes + done} (${lengthBytes - done} bytes)`, err);
      }
      if (n <= 0) throw new SnapPipeError('IO', `write ${this.path} at byte ${positionBytes + done}: wrote nothing`);
      done += n;
    }
    this.endBytes = Math.max(this.endBytes, positionBytes + lengthBytes);
  }

  /** Makes the file `bytes` long, its new part allocated where the file system allows. */
  private sizeAhead(bytes: number): void {
    if (this.preallocating && bytes > this.sizedBytes) {
      if (preallocate(this.fd, this.sizedBytes, bytes - this.sizedBytes) === 0) {
        this.sizedBytes = bytes;
        return;
      }
      this.preallocating = false;
    }
    this.resize(bytes);
  }

  private resize(bytes: number): void {
    try {
      fs.ftruncateSync(this.fd, bytes);
    } catch (err) {
      throw ioError(`ftruncate ${this.path}`, err);
    }
    this.sizedBytes = bytes;
  }

  private sync(): void {
    try {
      fs.fdatasyncSync(this.fd);
    } catch (err) {
      throw ioError(`fdatasync ${this.path}`, err);
    }
  }
}
