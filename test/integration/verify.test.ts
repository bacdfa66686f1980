// snap-pipe verify through the real CLI: a sound image passes (either CRC engine, either I/O backend); every damaged
// part fails with one line on stderr: data clusters (all of them counted and listed in the summary), the header,
// L1 and L2 tables, refcount table and blocks, metadata; incomplete, truncated and foreign files too.
// Also measures the CRC engines, the main thread alone vs a piscina pool of 2 threads, and checks that both find
// the same damaged clusters with the same CRCs.
import { closeSync, copyFileSync, existsSync, mkdtempSync, openSync, readSync, rmSync, statSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { decodeHeader, readEntry, OFFSET_MASK } from '../../src/format/image/qcow2.js';
import { ImageReader } from '../../src/image/reader.js';
import { crc32cJs } from '../../src/native/fastmem.js';
import type { VerifyReport } from '../../src/verify/verify.js';
import { ROOT, runCli } from '../helpers/cli.js';
import { buildStream, sequentialOps, type BlockSpec } from '../helpers/model.js';

const MiB = 1 << 20;
let dir: string;
let good: string;
const BLOCKS: BlockSpec[] = [
  { id: 'pc.ram', lengthBytes: 24 << 20 },
  { id: '/rom@etc/acpi/tables', lengthBytes: 128 << 10 },
  { id: 'pc.bios', lengthBytes: 256 << 10 },
];

beforeAll(async () => {
  if (!existsSync(join(ROOT, 'dist', 'main.js'))) throw new Error('dist/ is missing: run npm run build');
  dir = mkdtempSync(join(tmpdir(), 'snap-pipe-verify-'));
  good = join(dir, 'good.qcow2');
  const r = await runCli(['save', good], buildStream(BLOCKS, sequentialOps(BLOCKS, 6), { ramEnd: true }).bytes);
  expect(r.code, r.stderr).toBe(0);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function oneLine(stderr: string): string {
  const lines = stderr.trim().split('\n');
  expect(lines, stderr).toHaveLength(1);
  expect(lines[0]).toMatch(/^snap-pipe: /);
  return lines[0];
}

/** A copy of the good image with `bytes` written at `positionBytes`. */
function damagedCopy(name: string, positionBytes: number, bytes: Uint8Array): string {
  const img = join(dir, `${name}.qcow2`);
  copyFileSync(good, img);
  const fd = openSync(img, 'r+');
  writeSync(fd, bytes, 0, bytes.length, positionBytes);
  closeSync(fd);
  return img;
}

function xorByte(img: string, positionBytes: number, mask: number): void {
  const fd = openSync(img, 'r+');
  const b = Buffer.alloc(1);
  readSync(fd, b, 0, 1, positionBytes);
  b[0] ^= mask;
  writeSync(fd, b, 0, 1, positionBytes);
  closeSync(fd);
}

function readAt(img: string, positionBytes: number, length: number): Buffer {
  const fd = openSync(img, 'r');
  const b = Buffer.alloc(length);
  readSync(fd, b, 0, length, positionBytes);
  closeSync(fd);
  return b;
}

function be64(v: bigint): Uint8Array {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(v);
  return b;
}

/** Header fields and the first L2 table and refcount block of the good image. */
function layoutOf(img: string) {
  const fd = openSync(img, 'r');
  const head = Buffer.alloc(4096);
  readSync(fd, head, 0, 4096, 0);
  const d = decodeHeader(head);
  if (d.kind !== 'ok') throw new Error('not qcow2');
  const e = Buffer.alloc(8);
  readSync(fd, e, 0, 8, d.header.l1OffsetBytes);
  const l2 = Number(readEntry(e, 0) & OFFSET_MASK);
  readSync(fd, e, 0, 8, d.header.refcountTableOffsetBytes);
  const refBlock = Number(readEntry(e, 0));
  closeSync(fd);
  return { header: d.header, l2, refBlock };
}

describe('snap-pipe verify', () => {
  it('a sound image: exit 0 and a summary, with the main thread or the pool, either backend, buffered or direct', async () => {
    for (const args of [[], ['--threads', '2'], ['--threads=1', '--io', 'sync'], ['--no-direct', '--queue-depth', '1'], ['--threads', '4', '--queue-depth=64']]) {
      const r = await runCli(['verify', good, ...args]);
      expect(r.code, `${args.join(' ')}: ${r.stderr}`).toBe(0);
      expect(r.stderr).toBe('');
      expect(r.stdout).toMatch(/^snap-pipe verify: .*good\.qcow2: sound\n/);
      expect(r.stdout).toMatch(/clusters: +\d+ data clusters checked, 0 with a bad checksum/);
    }
    const j = await runCli(['verify', good, '--json']);
    expect(j.code, j.stderr).toBe(0);
    const rep = JSON.parse(j.stdout) as VerifyReport;
    const reader = ImageReader.open(good);
    expect(rep).toMatchObject({ sound: true, badClusters: 0, dataClusters: reader.dataClusters, threads: 0, blocks: 3, mismatches: [] });
    expect(rep.bytesRead).toBe(reader.dataClusters * MiB);
    reader.close();
  });

  it('flipped bits in two data clusters: both listed, exit 1, one line on stderr', async () => {
    const img = join(dir, 'flipped.qcow2');
    copyFileSync(good, img);
    const reader = ImageReader.open(img);
    const hosts = [2, 20].map((c) => reader.hostOffsetOf(c)!);
    reader.close();
    xorByte(img, hosts[0] + 5000, 0x01);
    xorByte(img, hosts[1] + MiB - 1, 0x80);
    for (const threads of ['0', '2']) {
      const r = await runCli(['verify', img, '--threads', threads]);
      expect(r.code).toBe(1);
      expect(oneLine(r.stderr)).toMatch(/flipped\.qcow2: 2 of \d+ data clusters fail their checksum \(first: block pc\.ram offset 0x200000, cluster at byte \d+\)/);
      expect(r.stdout).toMatch(/: DAMAGED\n/);
      const bad = r.stdout.split('\n').filter((l) => l.includes('bad: '));
      expect(bad).toHaveLength(2);
      expect(bad[0]).toMatch(new RegExp(`block pc\\.ram offset 0x200000 \\(chunk 2\\), cluster at byte ${hosts[0]}: stored 0x[0-9a-f]{8}, read 0x[0-9a-f]{8}`));
      expect(bad[1]).toMatch(new RegExp(`block pc\\.ram offset 0x1400000 \\(chunk 20\\), cluster at byte ${hosts[1]}`));
    }
  });

  it('damaged tables and metadata: one line each, nothing on stdout', async () => {
    const { header, l2, refBlock } = layoutOf(good);
    const reader = ImageReader.open(good);
    const chunk1Host = reader.hostOffsetOf(1)!;
    const metaVirt = reader.metaVirtOffsetBytes / MiB;
    const metaHost = reader.hostOffsetOf(metaVirt)!;
    reader.close();
    const l1Entry = readEntry(readAt(good, header.l1OffsetBytes, 8), 0);
    // Each damage has one diagnosis, the whole line. Zeroing L1 entry 0 unmaps every cluster (one L2 table maps them
    // all), the metadata among them: that is what is found first (before the refcounts that no longer match).
    const cases: [string, string, string][] = [
      ['l2-duplicate', damagedCopy('l2-duplicate', l2, be64(BigInt(chunk1Host) | (1n << 63n))), `virtual clusters 0 and 1 both map to the cluster at byte ${chunk1Host} (damaged L2 table)`],
      ['l2-unaligned', damagedCopy('l2-unaligned', l2 + 8 * 3, be64(BigInt(chunk1Host + 4096) | (1n << 63n))), `data cluster offset ${chunk1Host + 4096} not cluster aligned`],
      ['l1-zeroed', damagedCopy('l1-zeroed', header.l1OffsetBytes, be64(0n)), `metadata cluster 0 (virtual cluster ${metaVirt}) is not mapped (damaged L1 or L2 table)`],
      ['l1-not-copied', damagedCopy('l1-not-copied', header.l1OffsetBytes, be64(l1Entry & ~(1n << 63n))), `L1 entry 0 is 0x${(l1Entry & ~(1n << 63n)).toString(16)}: the COPIED flag clear, though every cluster has refcount 1 (damaged L1 table)`],
      ['refcount-block', damagedCopy('refcount-block', refBlock + 2 * 3, new Uint8Array([0, 2])), 'cluster 3 has refcount 2, expected 1 (damaged refcount block)'],
      ['refcount-table', damagedCopy('refcount-table', header.refcountTableOffsetBytes + 8, be64(BigInt(refBlock))), `refcount table entry 1 of ${header.refcountTableClusters * (MiB / 8)} is 0x${refBlock.toString(16)} (damaged refcount table: past the 1 refcount blocks the file needs)`],
      ['metadata', damagedCopy('metadata', metaHost + 100, new Uint8Array([0x5a, 0xa5])), 'metadata damaged (checksum mismatch)'],
      ['header-virtual-size', damagedCopy('header-virtual-size', 24, be64(BigInt(header.virtualBytes + 64 * MiB))), `virtual size is ${header.virtualBytes + 64 * MiB}, snap-pipe's layout for this image has ${header.virtualBytes} (damaged header)`],
    ];
    for (const [name, img, diagnosis] of cases) {
      const r = await runCli(['verify', img]);
      expect(r.code, `${name}: ${r.stderr}`).toBe(1);
      expect(r.stdout, name).toBe('');
      expect(oneLine(r.stderr), name).toBe(`snap-pipe: ${img}: ${diagnosis}`);
    }
  });

  it('incomplete, truncated, not QCOW2, trailing bytes, bad arguments', async () => {
    const cut = join(dir, 'cut.qcow2');
    const s = await runCli(['save', cut], buildStream(BLOCKS, sequentialOps(BLOCKS)).bytes.subarray(0, 5 * MiB));
    expect(s.code).toBe(1);
    const short = join(dir, 'short.qcow2');
    copyFileSync(good, short);
    truncateSync(short, Math.floor(statSync(good).size / 2 / 4096) * 4096);
    const junk = join(dir, 'junk.bin');
    writeFileSync(junk, Buffer.alloc(2 * MiB, 0x41));
    const longer = join(dir, 'longer.qcow2');
    copyFileSync(good, longer);
    truncateSync(longer, statSync(good).size + MiB);
    for (const [img, error] of [
      [cut, /cut\.qcow2: the save that wrote this image failed: stream ended at byte \d+ while reading /],
      [short, /short\.qcow2: .*truncated image/],
      [junk, /junk\.bin: not a QCOW2 image/],
      [longer, /longer\.qcow2: the file is \d+ bytes, its tables account for \d+/],
    ] as const) {
      const r = await runCli(['verify', img]);
      expect(r.code, r.stderr).toBe(1);
      expect(oneLine(r.stderr)).toMatch(error);
    }
    for (const args of [['verify'], ['verify', 'a', 'b'], ['verify', good, '--threads', '65'], ['verify', good, '--io', 'aio'], ['verify', good, '--bogus']]) {
      const r = await runCli(args);
      expect(r.code, args.join(' ')).toBe(2);
      oneLine(r.stderr);
    }
    const help = await runCli(['verify', '--help']);
    expect(help.stdout).toMatch(/usage: snap-pipe verify IMG/);
  });

  it('measures: CRCs on the main thread vs a piscina pool of 2 threads (256 MiB of data clusters); both find the same', async () => {
    const blocks: BlockSpec[] = [{ id: 'pc.ram', lengthBytes: 256 << 20 }];
    const img = join(dir, 'big.qcow2');
    const s = await runCli(['save', img], buildStream(blocks, sequentialOps(blocks, 1e9)).bytes);
    expect(s.code, s.stderr).toBe(0);
    const reader = ImageReader.open(img);
    expect(reader.dataClusters).toBe(256);
    const hostOf = (chunk: number) => reader.hostOffsetOf(chunk)!;
    reader.close();
    const verify = async (threads: string, code: number): Promise<VerifyReport> => {
      const r = await runCli(['verify', img, '--json', '--threads', threads]);
      expect(r.code, `--threads ${threads} exit status; stderr: ${r.stderr}`).toBe(code);
      const rep = JSON.parse(r.stdout) as VerifyReport;
      expect(rep.threads).toBe(Number(threads));
      // Every data cluster read and checked, by either engine.
      expect([rep.dataClusters, rep.bytesRead]).toEqual([256, 256 * MiB]);
      return rep;
    };
    const mbps: Record<string, number[]> = { '0': [], '2': [] };
    for (let round = 0; round < 3; round++) {
      for (const threads of ['0', '2']) {
        const rep = await verify(threads, 0);
        expect([rep.sound, rep.badClusters, rep.mismatches]).toEqual([true, 0, []]);
        mbps[threads].push(rep.readMBps);
      }
    }
    const best = (xs: number[]) => Math.max(...xs).toFixed(0);
    console.log(`verify of 256 MiB (O_DIRECT, io_uring): main thread ${best(mbps['0'])} MB/s, piscina x2 ${best(mbps['2'])} MB/s (best of 3)`);

    // One bit flipped in five clusters, first to last: both engines list exactly those, with the CRC-32C recorded
    // at save and the one of the bytes now on disk, both worked out here in JavaScript.
    const chunks = [0, 1, 97, 200, 255];
    const cluster = Buffer.alloc(MiB);
    const crcAt = (chunk: number) => {
      const fd = openSync(img, 'r');
      readSync(fd, cluster, 0, MiB, hostOf(chunk));
      closeSync(fd);
      return crc32cJs(cluster) >>> 0;
    };
    const stored = chunks.map(crcAt);
    chunks.forEach((c, i) => xorByte(img, hostOf(c) + 4096 * i + 7, 0x04));
    const want = chunks.map((chunk, i) => ({
      block: 'pc.ram',
      chunk,
      blockOffsetBytes: chunk * MiB,
      hostOffsetBytes: hostOf(chunk),
      storedCrc32: stored[i],
      readCrc32: crcAt(chunk),
    }));
    for (const threads of ['0', '2']) {
      const rep = await verify(threads, 1);
      expect([rep.sound, rep.badClusters], `--threads ${threads}`).toEqual([false, 5]);
      expect(rep.mismatches, `--threads ${threads}`).toEqual(want);
    }
    rmSync(img);
  });
});
