// Crafted images: an image saved here by the real CLI, then edited byte by byte the way someone hostile would (the
// QCOW2 header, snap-pipe's header extension, the metadata with its checksums made to match, L1 and L2 entries,
// refcounts, the device state, the file's length). `load` (to a file), `verify` and `info` run on each under a
// time cap and an address-space cap, and each must:
//   - refuse with exit 1 and exactly one line on stderr naming the image and the cause (no stack trace), or, when
//     the edit is harmless to it, exit 0 (load: with the RAM the original stream meant);
//   - finish within TIME_CAP_MS and within AS_CAP_BYTES of address space;
// and on every crafted image: verify exit 0 => load exit 0, its output rebuilds the RAM of the original stream,
// and qemu-img check is clean.
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, copyFileSync, existsSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, statSync, truncateSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { crc32 } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { VIRTUAL_BYTES_MAX } from '../../src/format/image/limits.js';
import { decodeHeader } from '../../src/format/image/qcow2.js';
import { StreamBuilder } from '../../src/format/stream/encoder.js';
import { BIN, ROOT, runCli } from '../helpers/cli.js';
import { SMALL_PC_BLOCKS, buildStream, pageContent, sequentialOps, type ModelStream } from '../helpers/model.js';
import { parseAll } from '../helpers/parse.js';

const MiB = 1 << 20;
const GiB = 2 ** 30;
/**
 * Address space each command may take. Node reserves far more than it touches: measured here, load, verify and
 * info of the sound images below pass every time at 1000 MiB and fail now and then at 900 MiB (thread stacks, malloc
 * arenas, V8's heap reservation). Run with --disable-wasm-trap-handler, or each WebAssembly.Memory (snap-pipe's
 * aligned buffers) reserves 10 GiB of guard region. A table sized from a hostile header (gigabytes) fails at this cap.
 */
const AS_CAP_BYTES = 1280 * MiB;
const TIME_CAP_MS = 10_000;

let dir: string;
/** The small image: SMALL_PC_BLOCKS (28 virtual clusters, one L2 table). */
let model: ModelStream;
let small: string;
/** A sparse 200 GiB block with two data clusters: two L1 entries, two L2 tables. */
let big: string;
let bigLoadOut: Buffer;

interface Run {
  code: number | null;
  signal: NodeJS.Signals | null;
  stderr: string;
  ms: number;
  timedOut: boolean;
}

/**
 * `snap-pipe ARGS` under the time cap and (unless `input` is given: save's three stage threads need more) the
 * address-space cap; stdout to `outPath` or discarded; `input` on stdin.
 */
function runCapped(args: string[], outPath?: string, input?: Uint8Array): Promise<Run> {
  return new Promise((resolve, reject) => {
    const t0 = Date.now();
    const outFd = openSync(outPath ?? '/dev/null', 'w');
    const node = [process.execPath, '--disable-wasm-trap-handler', BIN, ...args];
    const child = spawn(input ? node[0] : 'prlimit', input ? node.slice(1) : [`--as=${AS_CAP_BYTES}`, ...node], {
      stdio: [input ? 'pipe' : 'ignore', outFd, 'pipe'],
    });
    closeSync(outFd);
    child.stdin?.on('error', () => undefined);
    child.stdin?.end(input);
    let stderr = '';
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, TIME_CAP_MS);
    child.stderr!.on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stderr, ms: Date.now() - t0, timedOut });
    });
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Where things are in a saved image

interface Layout {
  fileBytes: number;
  l1: number;
  /** L2 table offset per L1 entry. */
  l2: number[];
  refcountTable: number;
  refcountBlock: number;
  /** Host offset of the metadata (one cluster here) and its length. */
  meta: number;
  metaBytes: number;
  metaVirtCluster: number;
  virtualClusters: number;
}

function readAt(img: string, pos: number, len: number): Buffer {
  const fd = openSync(img, 'r');
  const b = Buffer.alloc(len);
  readSync(fd, b, 0, len, pos);
  closeSync(fd);
  return b;
}

function writeAt(img: string, pos: number, bytes: Uint8Array): void {
  const fd = openSync(img, 'r+');
  writeSync(fd, bytes, 0, bytes.length, pos);
  closeSync(fd);
}

function be64(v: bigint | number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(v));
  return b;
}

function be32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
}

function layoutOf(img: string): Layout {
  const d = decodeHeader(readAt(img, 0, 4096));
  if (d.kind !== 'ok' || !d.snap) throw new Error('not a snap-pipe image');
  const h = d.header;
  const l1 = readAt(img, h.l1OffsetBytes, h.l1Entries * 8);
  const l2: number[] = [];
  for (let i = 0; i < h.l1Entries; i++) l2.push(Number(l1.readBigUInt64BE(i * 8) & 0x00ff_ffff_ffff_fe00n));
  const metaVirtCluster = d.snap.metaVirtOffsetBytes / MiB;
  const l2Index = Math.floor(metaVirtCluster / 131072);
  const meta = Number(readAt(img, l2[l2Index] + (metaVirtCluster % 131072) * 8, 8).readBigUInt64BE(0) & 0x00ff_ffff_ffff_fe00n);
  return {
    fileBytes: statSync(img).size,
    l1: h.l1OffsetBytes,
    l2,
    refcountTable: h.refcountTableOffsetBytes,
    refcountBlock: Number(readAt(img, h.refcountTableOffsetBytes, 8).readBigUInt64BE(0)),
    meta,
    metaBytes: d.snap.metaBytes,
    metaVirtCluster,
    virtualClusters: h.virtualBytes / MiB,
  };
}

/** Offset of snap-pipe's extension data in the header (after the 104-byte header and the extension's own 8). */
const SNAP_EXT = 104 + 8;

// ---------------------------------------------------------------------------------------------------------------
// Metadata edits, with every checksum made to match (section CRC-32s, the container length, the header's CRC-32)

interface Section {
  tag: number;
  data: Buffer;
}

const TAG = { Json: 1, Head: 2, RamSetup: 3, DeviceState: 4, SentBitmaps: 5, DataBitmaps: 6, ChunkCrcs: 7 } as const;

function sectionsOf(meta: Buffer): Section[] {
  const out: Section[] = [];
  let pos = 24;
  for (let i = 0; i < meta.readUInt32LE(12); i++) {
    const len = Number(meta.readBigUInt64LE(pos + 8));
    out.push({ tag: meta.readUInt32LE(pos), data: Buffer.from(meta.subarray(pos + 24, pos + 24 + len)) });
    pos += 24 + Math.ceil(len / 8) * 8;
  }
  return out;
}

function containerOf(sections: Section[]): Buffer {
  const total = 24 + sections.reduce((n, s) => n + 24 + Math.ceil(s.data.length / 8) * 8, 0);
  const out = Buffer.alloc(total);
  out.write('SNPMETA\0', 0, 'latin1');
  out.writeUInt32LE(2, 8);
  out.writeUInt32LE(sections.length, 12);
  out.writeBigUInt64LE(BigInt(total), 16);
  let pos = 24;
  for (const s of sections) {
    out.writeUInt32LE(s.tag, pos);
    out.writeBigUInt64LE(BigInt(s.data.length), pos + 8);
    out.writeUInt32LE(crc32(s.data) >>> 0, pos + 16);
    s.data.copy(out, pos + 24);
    pos += 24 + Math.ceil(s.data.length / 8) * 8;
  }
  return out;
}

/** Replaces the metadata with `bytes` (which must fit its cluster) and puts its length and CRC-32 in the header. */
function putMeta(img: string, L: Layout, bytes: Buffer): void {
  expect(bytes.length).toBeLessThanOrEqual(MiB);
  writeAt(img, L.meta, Buffer.alloc(MiB));
  writeAt(img, L.meta, bytes);
  writeAt(img, SNAP_EXT + 16, be64(bytes.length));
  writeAt(img, SNAP_EXT + 24, be32(crc32(bytes)));
}

function editSections(edit: (s: Section[]) => void) {
  return (img: string, L: Layout) => {
    const sections = sectionsOf(readAt(img, L.meta, L.metaBytes));
    edit(sections);
    putMeta(img, L, containerOf(sections));
  };
}

function editJson(edit: (j: Record<string, any>) => void) {
  return editSections((s) => {
    const sec = s.find((x) => x.tag === TAG.Json)!;
    const j = JSON.parse(sec.data.toString('utf8'));
    edit(j);
    sec.data = Buffer.from(JSON.stringify(j));
  });
}

/** Edits the raw container (its header fields), then fixes only the header's CRC-32 of it. */
function editContainer(edit: (meta: Buffer) => void) {
  return (img: string, L: Layout) => {
    const meta = readAt(img, L.meta, L.metaBytes);
    edit(meta);
    putMeta(img, L, meta);
  };
}

/** The per-block list (bitmaps, CRCs) of a section, as [u32 count, (u32 length, bytes padded to 4)...]. */
function listItems(data: Buffer): Buffer[] {
  const items: Buffer[] = [];
  let pos = 4;
  for (let i = 0; i < data.readUInt32LE(0); i++) {
    const len = data.readUInt32LE(pos);
    items.push(Buffer.from(data.subarray(pos + 4, pos + 4 + len)));
    pos += 4 + Math.ceil(len / 4) * 4;
  }
  return items;
}

function listOf(items: Buffer[]): Buffer {
  return Buffer.concat([be32le(items.length), ...items.map((it) => Buffer.concat([be32le(it.length), it, Buffer.alloc(Math.ceil(it.length / 4) * 4 - it.length)]))]);
}

function be32le(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v);
  return b;
}

/** A device state built to be slow to search for its VM description (see test/unit/json.test.ts). */
function candidateFlood(bytes: number, valid: boolean): Buffer {
  const unit = Buffer.from('{"page_size":4096}');
  const step = 6 + unit.length;
  const count = Math.floor(bytes / step);
  const dev = Buffer.alloc(1 + count * step);
  dev[0] = 0x04;
  for (let i = 0; i < count; i++) {
    const k = 1 + i * step;
    dev[k + 1] = 6;
    dev.writeUInt32BE(dev.length - k - 6, k + 2);
    unit.copy(dev, k + 6);
  }
  if (!valid) dev[dev.length - 1] = 0x2c;
  return dev;
}

// ---------------------------------------------------------------------------------------------------------------
// The cases

/**
 * Who refuses: 'reader' (the image cannot be opened: load, verify and info all refuse), 'load' (load and verify
 * refuse, info describes it), 'verify' (only verify refuses: load sends the right RAM), 'none' (harmless to all).
 */
type Refused = 'reader' | 'load' | 'verify' | 'none';

interface Case {
  name: string;
  base?: 'small' | 'big';
  edit: (img: string, L: Layout) => void;
  refused: Refused;
  /** The cause, as the refusing commands' line names it. */
  cause?: RegExp;
}

const COPIED = 1n << 63n;
const l2e = (L: Layout, v: number) => L.l2[0] + v * 8;
const entryAt = (img: string, pos: number) => readAt(img, pos, 8).readBigUInt64BE(0);
const poke = (pos: number | ((L: Layout) => number), bytes: Buffer | ((img: string, L: Layout) => Buffer)) => (img: string, L: Layout) => {
  const at = typeof pos === 'number' ? pos : pos(L);
  writeAt(img, at, typeof bytes === 'function' ? bytes(img, L) : bytes);
};
const refcountOf = (cluster: number, value: number) => poke((L) => L.refcountBlock + 2 * cluster, Buffer.from([value >> 8, value & 0xff]));

const CASES: Case[] = [
  // The QCOW2 header
  { name: 'virtual size 1 PiB', edit: poke(24, be64(2n ** 50n)), refused: 'reader', cause: /virtual size 1125899906842624 is more than snap-pipe writes/ },
  // A table per virtual cluster sized from this header would take 4 GiB; 8192 L1 entries fit the file.
  { name: 'virtual size 1 PiB, 8192 L1 entries', edit: (img) => (writeAt(img, 24, be64(2n ** 50n)), writeAt(img, 36, be32(8192))), refused: 'reader', cause: /virtual size 1125899906842624 is more than snap-pipe writes/ },
  {
    name: 'virtual size 1 PiB, 8192 L1 entries all naming the one L2 table',
    edit: (img, L) => {
      writeAt(img, 24, be64(2n ** 50n));
      writeAt(img, 36, be32(8192));
      const e = readAt(img, L.l1, 8);
      writeAt(img, L.l1, Buffer.concat(Array.from({ length: 8192 }, () => e)));
    },
    refused: 'reader',
    cause: /virtual size 1125899906842624 is more than snap-pipe writes/,
  },
  { name: 'virtual size at the limit, L1 to match', edit: (img) => (writeAt(img, 24, be64(VIRTUAL_BYTES_MAX)), writeAt(img, 36, be32(129))), refused: 'reader', cause: /virtual size is \d+, snap-pipe's layout for this image has 29360128/ },
  { name: 'L1 entries 2^32-1', edit: poke(36, be32(0xffff_ffff)), refused: 'reader', cause: /L1 table has 4294967295 entries, the virtual size needs 1/ },
  { name: 'L1 table past the end', edit: poke(40, be64(2n ** 40n)), refused: 'reader', cause: /shorter than its L1 table \(truncated image\)/ },
  { name: 'L1 table unaligned', edit: poke(40, (_, L) => be64(L.l1 + 512)), refused: 'reader', cause: /L1 table offset \d+/ },
  { name: 'refcount table past the end', edit: poke(48, be64(2n ** 45n)), refused: 'reader', cause: /shorter than its refcount table \(truncated image\)/ },
  { name: 'refcount table of 2^32-1 clusters', edit: poke(56, be32(0xffff_ffff)), refused: 'reader', cause: /refcount table of 4294967295 clusters/ },
  { name: 'incompatible feature: dirty', edit: poke(72, be64(1)), refused: 'reader', cause: /QCOW2 incompatible features 0x1/ },
  { name: 'compatible feature: lazy refcounts', edit: poke(80, be64(1)), refused: 'reader', cause: /QCOW2 compatible features 0x1 \(snap-pipe writes none\)/ },
  { name: 'autoclear feature: raw external data', edit: poke(88, be64(2)), refused: 'reader', cause: /QCOW2 autoclear features 0x2/ },
  { name: 'an internal snapshot', edit: poke(60, be32(1)), refused: 'reader', cause: /internal snapshots/ },
  // The extensions are looked for after the header's length: past the 4 KiB snap-pipe reads, none is found.
  { name: 'header length 4096', edit: poke(100, be32(4096)), refused: 'reader', cause: /QCOW2 but not a snap-pipe image/ },
  { name: 'header length 112', edit: poke(100, be32(112)), refused: 'reader', cause: /QCOW2 but not a snap-pipe image|QCOW2 header length 112/ },
  { name: 'cluster_bits 16', edit: poke(20, be32(16)), refused: 'reader', cause: /cluster_bits 16/ },
  { name: 'a foreign header extension', edit: poke(SNAP_EXT + 32, Buffer.concat([be32(0x23852875), be32(8), Buffer.alloc(8, 0xab)])), refused: 'reader', cause: /header extensions 0x534e5031 \(32 bytes\), 0x23852875 \(8 bytes\)/ },
  // QEMU checks the end marker's length as any extension's ("Header extension too large"): found by the image fuzz.
  { name: 'an end marker with a length', edit: poke(SNAP_EXT + 32 + 4, be32(0x534e5031)), refused: 'reader', cause: /and no end marker \(type 0, length 0\)/ },
  // snap-pipe's header extension
  { name: 'metadata offset 2^52', edit: poke(SNAP_EXT + 8, be64(2n ** 52n)), refused: 'reader', cause: /metadata region \(\d+ bytes at 4503599627370496\) outside the virtual disk/ },
  { name: 'metadata length 1 TiB', edit: poke(SNAP_EXT + 16, be64(2n ** 40n)), refused: 'reader', cause: /metadata region \(1099511627776 bytes/ },
  { name: 'metadata length 0', edit: poke(SNAP_EXT + 16, be64(0)), refused: 'reader', cause: /metadata region \(0 bytes/ },
  { name: 'metadata offset unaligned', edit: poke(SNAP_EXT + 8, be64(27 * MiB + 4096)), refused: 'reader', cause: /metadata offset \d+ not cluster aligned/ },
  { name: 'metadata CRC', edit: poke(SNAP_EXT + 24, be32(0x1234)), refused: 'reader', cause: /metadata damaged \(checksum mismatch\)/ },
  { name: 'marked incomplete', edit: poke(SNAP_EXT + 4, be32(0)), refused: 'load', cause: /never finished/ },
  // The metadata, checksums matching
  { name: 'metadata container length', edit: editContainer((m) => m.writeBigUInt64LE(m.readBigUInt64LE(16) + 8n, 16)), refused: 'reader', cause: /metadata damaged: length/ },
  { name: 'metadata section count 2^32-1', edit: editContainer((m) => m.writeUInt32LE(0xffff_ffff, 12)), refused: 'reader', cause: /metadata damaged: 4294967295 sections/ },
  { name: 'metadata section length 2^60', edit: editContainer((m) => m.writeBigUInt64LE(2n ** 60n, 24 + 8)), refused: 'reader', cause: /metadata damaged: section 1 out of bounds/ },
  { name: 'metadata JSON not JSON', edit: editSections((s) => (s.find((x) => x.tag === TAG.Json)!.data = Buffer.from('{"x":'))), refused: 'reader', cause: /scalar section is not JSON/ },
  { name: 'block table of 5000 blocks', edit: editJson((j) => (j.blocks = Array.from({ length: 5000 }, () => j.blocks[0]))), refused: 'reader', cause: /5000 RAM blocks \(at most 4096\)/ },
  { name: 'block length 2^50', edit: editJson((j) => (j.blocks[0].lengthBytes = 2 ** 50)), refused: 'reader', cause: /bitmaps of pc\.ram too short/ },
  { name: 'block moved in the virtual disk', edit: editJson((j) => (j.blocks[1].virtOffsetBytes += MiB)), refused: 'reader', cause: /block \/rom@etc\/acpi\/tables at virtual byte 26214400, where snap-pipe puts it at 25165824/ },
  { name: 'chunk CRC list short', edit: editSections((s) => { const sec = s.find((x) => x.tag === TAG.ChunkCrcs)!; const items = listItems(sec.data); items[0] = items[0].subarray(0, 4); sec.data = listOf(items); }), refused: 'reader', cause: /chunk CRCs of pc\.ram/ },
  {
    name: 'data pages in a chunk with no cluster',
    edit: editSections((s) => {
      // rsdp (block 3) was sent as one zero page: its chunk has no cluster. Make that page data.
      for (const tag of [TAG.SentBitmaps, TAG.DataBitmaps]) {
        const sec = s.find((x) => x.tag === tag)!;
        const items = listItems(sec.data);
        items[3][0] |= 1;
        sec.data = listOf(items);
      }
    }),
    refused: 'load',
    cause: /block \/rom@etc\/acpi\/rsdp chunk 0 has 1 data pages but no cluster in the image/,
  },
  { name: 'data cluster count in the counters', edit: editJson((j) => (j.counters.dataClusters = 99)), refused: 'verify', cause: /metadata says 99 data clusters, the L2 tables map 26/ },
  { name: 'stream header magic', edit: editSections((s) => (s.find((x) => x.tag === TAG.Head)!.data[0] ^= 1)), refused: 'load', cause: /stream header is not QEVM version 3/ },
  // The device state
  { name: 'device state: 900 KiB of VM description look-alikes, the last one real', edit: editSections((s) => (s.find((x) => x.tag === TAG.DeviceState)!.data = candidateFlood(900 << 10, true))), refused: 'none' },
  { name: 'device state: 900 KiB of VM description look-alikes, none real', edit: editSections((s) => (s.find((x) => x.tag === TAG.DeviceState)!.data = candidateFlood(900 << 10, false))), refused: 'load', cause: /device state does not end with EOF/ },
  { name: 'device state cut short', edit: editSections((s) => { const sec = s.find((x) => x.tag === TAG.DeviceState)!; sec.data = sec.data.subarray(0, sec.data.length - 10); }), refused: 'load', cause: /device state does not end with EOF/ },
  // L1 and L2 entries
  { name: 'L2: one data cluster mapped twice', edit: poke((L) => l2e(L, 0), (img, L) => be64(entryAt(img, l2e(L, 1)))), refused: 'reader', cause: /virtual clusters 0 and 1 both map to the cluster at byte 2097152/ },
  { name: 'L2: reserved bit 1', edit: poke((L) => l2e(L, 1), (img, L) => be64(entryAt(img, l2e(L, 1)) | 2n)), refused: 'reader', cause: /L2 entry for virtual cluster 1 is 0x8000000000200002: reserved bits set/ },
  { name: 'L2: reserved bit 56', edit: poke((L) => l2e(L, 1), (img, L) => be64(entryAt(img, l2e(L, 1)) | (1n << 56n))), refused: 'reader', cause: /L2 entry for virtual cluster 1 is 0x8100000000200000: reserved bits set/ },
  { name: 'L2: COPIED cleared', edit: poke((L) => l2e(L, 1), (img, L) => be64(entryAt(img, l2e(L, 1)) & ~COPIED)), refused: 'reader', cause: /L2 entry for virtual cluster 1 is 0x200000: the COPIED flag clear/ },
  { name: 'L2: compressed flag', edit: poke((L) => l2e(L, 1), (img, L) => be64(entryAt(img, l2e(L, 1)) | (1n << 62n))), refused: 'reader', cause: /virtual cluster 1 .*a compressed cluster/ },
  { name: 'L2: zero flag', edit: poke((L) => l2e(L, 1), (img, L) => be64(entryAt(img, l2e(L, 1)) | 1n)), refused: 'reader', cause: /virtual cluster 1 .*the zero flag set/ },
  { name: 'L2: an entry past the virtual size', edit: poke((L) => l2e(L, 40), be64(COPIED)), refused: 'reader', cause: /L2 entry for virtual cluster 40 is 0x8000000000000000: past the virtual size of 28 clusters/ },
  { name: 'L2: a data cluster on the L1 table', edit: poke((L) => l2e(L, 1), (_, L) => be64(BigInt(L.l1) | COPIED)), refused: 'reader', cause: /data cluster of virtual cluster 1 at byte \d+ is also the L1 table/ },
  { name: 'L2: a data cluster past the end', edit: poke((L) => l2e(L, 1), be64(2n ** 40n | COPIED)), refused: 'reader', cause: /shorter than its data cluster at byte 1099511627776 \(truncated image\)/ },
  { name: 'L2: a data cluster unmapped (refcount left behind)', edit: poke((L) => l2e(L, 1), be64(0)), refused: 'reader', cause: /cluster 2 has refcount 1, expected 0/ },
  { name: 'L1: COPIED cleared', edit: poke((L) => L.l1, (img, L) => be64(entryAt(img, L.l1) & ~COPIED)), refused: 'reader', cause: /L1 entry 0 is 0x[0-9a-f]+: the COPIED flag clear/ },
  { name: 'L1: reserved bit 0', edit: poke((L) => L.l1, (img, L) => be64(entryAt(img, L.l1) | 1n)), refused: 'reader', cause: /L1 entry 0 is 0x[0-9a-f]+: reserved bits set/ },
  { name: 'L1: the L2 table on a refcount block', edit: poke((L) => L.l1, (_, L) => be64(BigInt(L.refcountBlock) | COPIED)), refused: 'reader', cause: /the L2 table at byte \d+ \(L1 entry 0\) is also a refcount block/ },
  { name: 'L1: two entries name one L2 table', base: 'big', edit: poke((L) => L.l1 + 8, (_, L) => be64(BigInt(L.l2[0]) | COPIED)), refused: 'reader', cause: /L1 entries 0 and 1 both name the L2 table at byte \d+/ },
  { name: 'L1: the virtual size of the sparse image made 1 PiB', base: 'big', edit: poke(24, be64(2n ** 50n)), refused: 'reader', cause: /more than snap-pipe writes/ },
  // Refcounts
  { name: 'refcount 2', edit: refcountOf(3, 2), refused: 'reader', cause: /cluster 3 has refcount 2, expected 1 \(damaged refcount block\)/ },
  { name: 'refcount 0 for a used cluster', edit: refcountOf(5, 0), refused: 'reader', cause: /cluster 5 has refcount 0, expected 1/ },
  { name: 'refcount for a cluster past the end', edit: refcountOf(40, 1), refused: 'reader', cause: /cluster 40 has refcount 1, expected 0/ },
  { name: 'refcount table: the block on the L1 table', edit: poke((L) => L.refcountTable, (_, L) => be64(L.l1)), refused: 'reader', cause: /refcount block 0 at byte \d+ is also the L1 table/ },
  { name: 'refcount table: reserved bit', edit: poke((L) => L.refcountTable, (_, L) => be64(L.refcountBlock + 1)), refused: 'reader', cause: /refcount table entry 0 of 131072 is 0x[0-9a-f]+ \(damaged refcount table: reserved bits set\)/ },
  { name: 'refcount table: no refcount block', edit: poke((L) => L.refcountTable, be64(0)), refused: 'reader', cause: /cluster 0 has no refcount block/ },
  // The file
  { name: 'cut in half', edit: (img, L) => truncateSync(img, L.fileBytes / 2), refused: 'reader', cause: /truncated image/ },
  { name: 'cut by 4 KiB', edit: (img, L) => truncateSync(img, L.fileBytes - 4096), refused: 'reader', cause: /truncated image/ },
  { name: 'a cluster appended', edit: (img, L) => truncateSync(img, L.fileBytes + MiB), refused: 'verify', cause: /the file is \d+ bytes, its tables account for \d+/ },
  { name: 'a data byte flipped', edit: poke(3 * MiB + 4096 + 5, Buffer.from([0x55])), refused: 'load', cause: /checksum/ },
];

/** The load output rebuilds the RAM the original stream meant. */
function expectModelRam(out: Uint8Array, what: string): void {
  const got = parseAll(out, 1, 1 << 20);
  model.blocks.forEach((b, i) => {
    expect(Buffer.compare(got.ram[i], model.ram[i]), `${what}: ${b.id}`).toBe(0);
    for (let p = 0; p < model.sent[i].length; p++) if (model.sent[i][p] !== got.sent[i][p]) throw new Error(`${what}: ${b.id} page ${p} sent ${got.sent[i][p]}`);
  });
}

function qemuImgCheck(img: string): { code: number | null; out: string } {
  const r = spawnSync('qemu-img', ['check', img], { encoding: 'utf8' });
  return { code: r.status, out: r.stdout + r.stderr };
}

// ---------------------------------------------------------------------------------------------------------------

beforeAll(async () => {
  if (!existsSync(join(ROOT, 'dist', 'main.js'))) throw new Error('dist/ is missing: run npm run build');
  dir = mkdtempSync(join(tmpdir(), 'snap-pipe-crafted-'));
  model = buildStream(SMALL_PC_BLOCKS, sequentialOps(SMALL_PC_BLOCKS, 6), { ramEnd: true });
  small = join(dir, 'small.qcow2');
  const s = await runCli(['save', small], model.bytes);
  expect(s.code, s.stderr).toBe(0);
  const b = new StreamBuilder().header().configuration('pc-i440fx-7.2').ramSetup(2, [{ id: 'pc.ram', lengthBytes: 200 * GiB }]);
  b.ramPart(2).page('pc.ram', 0, pageContent(1)).page('pc.ram', 150 * GiB, pageContent(2)).zero('pc.ram', 4096).ramEos(2);
  b.ramEnd(2).ramEos(2).device(3, 'timer', new Uint8Array(100)).eof();
  big = join(dir, 'big.qcow2');
  const sb = await runCli(['save', big], b.build());
  expect(sb.code, sb.stderr).toBe(0);
  const out = join(dir, 'big.stream');
  const lb = await runCapped(['load', big], out);
  expect(lb.code, lb.stderr).toBe(0);
  bigLoadOut = readFileSync(out);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('crafted images', () => {
  it(`the sound images pass load, verify and info under the caps (${AS_CAP_BYTES / MiB} MiB of address space, ${TIME_CAP_MS / 1000} s), and qemu-img check`, async () => {
    expect(layoutOf(small)).toMatchObject({ virtualClusters: 28, l2: [28 * MiB], l1: 29 * MiB, refcountBlock: 30 * MiB, refcountTable: 31 * MiB, meta: 27 * MiB });
    expect(layoutOf(big).l2).toHaveLength(2);
    for (const img of [small, big]) {
      const out = join(dir, 'sound.stream');
      for (const [cmd, o] of [['load', out], ['verify'], ['info']] as const) {
        const r = await runCapped([cmd, img], o);
        expect(r.code, `${cmd} ${img}: ${r.stderr}`).toBe(0);
        expect(r.stderr).toBe('');
      }
      if (img === small) expectModelRam(readFileSync(out), 'sound image');
      expect(qemuImgCheck(img).code).toBe(0);
    }
  });

  it('save: a stream whose device state is 900 KiB of VM description look-alikes is saved, or refused, at once', async () => {
    for (const valid of [true, false]) {
      const b = new StreamBuilder().header().configuration('pc-i440fx-7.2').ramSetup(2, [{ id: 'pc.ram', lengthBytes: MiB }]);
      b.ramPart(2).page('pc.ram', 0, pageContent(1)).ramEos(2).ramEnd(2).ramEos(2);
      const img = join(dir, `flood-${valid}.qcow2`);
      const r = await runCapped(['save', img], undefined, Buffer.concat([b.build(), candidateFlood(900 << 10, valid)]));
      expect(r.timedOut, `save did not finish within ${TIME_CAP_MS} ms`).toBe(false);
      if (valid) {
        expect(r.code, r.stderr).toBe(0);
      } else {
        expect(r.code).toBe(1);
        expect(r.stderr.trimEnd().split('\n'), r.stderr).toHaveLength(1);
        expect(r.stderr).toMatch(/does not end with EOF and a VM description: the stream was cut short/);
      }
    }
  });

  for (const c of CASES) {
    it(`${c.name}: ${c.refused === 'none' ? 'harmless' : `refused by ${c.refused === 'reader' ? 'all' : c.refused}`}`, async () => {
      const base = c.base === 'big' ? big : small;
      const img = join(dir, `${c.name.replace(/[^a-z0-9]+/gi, '-')}.qcow2`);
      copyFileSync(base, img);
      c.edit(img, layoutOf(base));
      const out = join(dir, 'crafted.stream');
      const runs = { load: await runCapped(['load', img], out), verify: await runCapped(['verify', img]), info: await runCapped(['info', img]) };
      const refuses = {
        load: c.refused === 'reader' || c.refused === 'load',
        verify: c.refused !== 'none',
        info: c.refused === 'reader',
      };
      for (const [cmd, r] of Object.entries(runs)) {
        const what = `${cmd}: ${r.stderr}`;
        expect(r.timedOut, `${cmd} did not finish within ${TIME_CAP_MS} ms`).toBe(false);
        expect(r.signal, what).toBe(null);
        expect(r.stderr, what).not.toMatch(/internal error|\n\s+at |RangeError|heap out of memory/);
        if (refuses[cmd as keyof typeof refuses]) {
          expect(r.code, what).toBe(1);
          const lines = r.stderr.trimEnd().split('\n');
          expect(lines, what).toHaveLength(1);
          expect(lines[0].startsWith(`snap-pipe: ${img}: `), what).toBe(true);
          if (c.cause) expect(lines[0], what).toMatch(c.cause);
        } else {
          expect(r.code, what).toBe(0);
        }
      }
      if (runs.load.code === 0 && c.base !== 'big') expectModelRam(readFileSync(out), c.name);
      // What verify passes, load sends whole and right, and qemu-img check finds clean.
      if (runs.verify.code === 0) {
        expect(runs.load.code, 'verify passed it: load must too').toBe(0);
        if (c.base === 'big') expect(Buffer.compare(readFileSync(out), bigLoadOut), 'verify passed it: load sends what it did before').toBe(0);
        else expectModelRam(readFileSync(out), c.name);
        const check = qemuImgCheck(img);
        expect(check.code, `verify passed it: qemu-img check must too: ${check.out}`).toBe(0);
      }
    });
  }
});
