// Synthetic QEMU 7.2 migration streams of any size, for benchmarks: encoded with StreamBuilder (so the framing is
// QEMU's), produced in bounded batches and handed to a sink, never held whole in memory.
//
//   npx vite-node perf/generate.ts -- --ram 4G --zero 0.3 --order background --seed 1 > stream.bin
//   npx vite-node perf/generate.ts -- --ram 1G --out /tmp/s.bin --summary /tmp/s.json
//
// Orders:
//   ascending   every page of every block once, in block order then page order, like a stopped VM's migration
//               (PART sections, then an empty ram END)
//   background  ascending, but now and then a short run of pages further ahead is sent early and not again when the
//               walk reaches it, like QEMU's background-snapshot when the guest writes those pages (PARTs, no ram END:
//               background snapshots send the device state captured at start right after the RAM)
//   precopy     one ascending pass, then `passes` re-send passes over a share of the pages (clustered, like a guest's
//               working set), some of them re-sent as zero pages; the last pass goes in the ram END section
//
// Zero pages: a share `zero` of all pages, most of it in whole 2 MiB regions (memory the guest never touched), the
// rest scattered. Page content: a 4 KiB window of a pre-generated random pool at a hashed offset, stamped with the
// block, page and version, so it is cheap to make but not compressible and no two page versions are equal.
//
// Device state: FULL sections with the names, instance ids and typical sizes of a pc-i440fx-7.2 guest's devices,
// then EOF and a VM description. The payloads are opaque filler: snap-pipe keeps device state verbatim, but a real
// QEMU would reject these payloads when loading (the RAM part and the framing it would accept).
import { closeSync, openSync, writeFileSync } from 'node:fs';
import { isatty } from 'node:tty';
import { StreamBuilder } from '../src/format/stream/encoder.js';
import { writeAll } from '../src/output.js';

export type Order = 'ascending' | 'background' | 'precopy';
export const ORDERS: readonly Order[] = ['ascending', 'background', 'precopy'];

const PAGE_BYTES = 4096;
const MIB = 1 << 20;
const RAM_SECTION_ID = 2;
const REGION_PAGES = 512; // 2 MiB: the unit of "never touched" zero memory
const HOT_REGION_PAGES = 32; // 128 KiB: the unit of a precopy working set
const POOL_BYTES = 16 * MIB;

export interface GenerateOptions {
  /** pc.ram size; a multiple of 4 KiB. */
  ramBytes: number;
  /** Share of all pages that are zero pages (0..1). */
  zeroShare: number;
  order: Order;
  seed: number;
  /** background: chance, at each page of the walk, that a run of pages further ahead is pulled forward. */
  pullShare?: number;
  /** precopy: number of re-send passes after the first one. */
  passes?: number;
  /** precopy: share of pages re-sent in each pass. */
  resendShare?: number;
  /** precopy: share of re-sent pages that are re-sent as zero pages. */
  resendZeroShare?: number;
  /** Page records per ram PART section (QEMU's are time-bounded; a few hundred to thousands of pages). */
  pagesPerSection?: number;
}

export interface BlockSpec {
  id: string;
  lengthBytes: number;
}

export interface BlockSummary extends BlockSpec {
  pages: number;
  /** Pages whose last record was a data page. */
  dataPages: number;
  /** Pages whose last record was a zero page. */
  zeroPages: number;
  unsentPages: number;
}

export interface GenerateSummary {
  order: Order;
  seed: number;
  ramBytes: number;
  streamBytes: number;
  blocks: BlockSummary[];
  dataPages: number;
  zeroPages: number;
  dataRecords: number;
  zeroRecords: number;
  /** Records of a page already sent before. */
  resentRecords: number;
  deviceStateBytes: number;
  seconds: number;
  MBps: number;
}

/** The RAM blocks of a pc-i440fx-7.2 guest with -vga std and an e1000, in QEMU's order (largest first). */
export function blockList(ramBytes: number): BlockSpec[] {
  if (!Number.isSafeInteger(ramBytes) || ramBytes <= 0 || ramBytes % PAGE_BYTES !== 0) {
    throw new RangeError(`--ram must be a positive multiple of 4 KiB, not ${ramBytes}`);
  }
  return [
    { id: 'pc.ram', lengthBytes: ramBytes },
    { id: 'vga.vram', lengthBytes: 16 * MIB },
    { id: '/rom@etc/acpi/tables', lengthBytes: 128 << 10 },
    { id: 'pc.bios', lengthBytes: 256 << 10 },
    { id: '0000:00:03.0/e1000.rom', lengthBytes: 256 << 10 },
    { id: 'pc.rom', lengthBytes: 128 << 10 },
    { id: '/rom@etc/table-loader', lengthBytes: 4 << 10 },
    { id: '/rom@etc/acpi/rsdp', lengthBytes: 4 << 10 },
  ];
}

/** Device sections of a 2-vCPU pc-i440fx guest: [idstr, instance, version, payload bytes]. */
const DEVICES: [string, number, number, number][] = [
  ['timer', 0, 2, 25],
  ['cpu_common', 0, 1, 5],
  ['cpu', 0, 12, 1720],
  ['cpu_common', 1, 1, 5],
  ['cpu', 1, 12, 1720],
  ['apic', 0, 3, 310],
  ['apic', 1, 3, 310],
  ['kvmclock', 0, 1, 9],
  ['fw_cfg', 0, 2, 10],
  ['PCIBUS', 0, 1, 20],
  ['dma', 0, 1, 110],
  ['dma', 1, 1, 110],
  ['i8254', 0, 3, 190],
  ['pcspk', 0, 1, 16],
  ['mc146818rtc', 0, 3, 90],
  ['i8259', 0, 3, 30],
  ['i8259', 1, 3, 30],
  ['ioapic', 0, 3, 210],
  ['hpet', 0, 2, 130],
  ['0000:00:01.3/piix4_pm', 0, 3, 350],
  ['0000:00:00.0/I440FX', 0, 3, 300],
  ['0000:00:01.0/PIIX3', 0, 3, 300],
  ['0000:00:02.0/vga', 0, 2, 1300],
  ['0000:00:03.0/e1000', 0, 2, 1100],
  ['0000:00:01.1/ide', 0, 3, 600],
  ['i2c_bus', 0, 1, 4],
  ['ps2kbd', 0, 3, 280],
  ['ps2mouse', 0, 2, 280],
  ['serial', 0, 3, 60],
  ['fdc', 0, 2, 200],
  ['acpi_build', 0, 1, 5],
  ['globalstate', 0, 1, 16],
];

/** 32-bit hash of up to four 32-bit integers (murmur3's finaliser over a simple combine). */
function hash4(a: number, b: number, c: number, d: number): number {
  let h = Math.imul(a ^ 0x9e3779b9, 0x85ebca6b);
  h = Math.imul(h ^ (h >>> 13) ^ b, 0xc2b2ae35);
  h = Math.imul(h ^ (h >>> 16) ^ c, 0x85ebca6b);
  h = Math.imul(h ^ (h >>> 13) ^ d, 0xc2b2ae35);
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  return h >>> 0;
}

const U32 = 4294967296;
const TAG_REGION = 1;
const TAG_PAGE = 2;
const TAG_CONTENT = 3;
const TAG_HOT = 4;
const TAG_DIRTY = 5;
const TAG_RESEND_ZERO = 6;

/** xorshift32-filled pool; pages are windows of it. */
function makePool(seed: number): Uint8Array {
  const pool = new Uint8Array(POOL_BYTES + PAGE_BYTES);
  const words = new Uint32Array(pool.buffer);
  let x = hash4(seed, 0x706f6f6c, 0, 0) | 1;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x >>> 0;
  }
  return pool;
}

/** Bit set of pages, 1 bit each (16 GiB of RAM: 512 KiB). */
class Bits {
  readonly bytes: Uint8Array;
  constructor(readonly count: number) {
    this.bytes = new Uint8Array(Math.ceil(count / 8));
  }
  get(i: number): boolean {
    return (this.bytes[i >>> 3] & (1 << (i & 7))) !== 0;
  }
  set(i: number, v: boolean): void {
    if (v) this.bytes[i >>> 3] |= 1 << (i & 7);
    else this.bytes[i >>> 3] &= ~(1 << (i & 7));
  }
  countSet(): number {
    let n = 0;
    for (let i = 0; i < this.count; i++) if (this.get(i)) n++;
    return n;
  }
}

export type Sink = (chunk: Uint8Array) => void;

/**
 * Generates the stream into `sink` in pieces of about `pagesPerSection` pages; returns what the stream holds.
 * Memory: the 16 MiB pool, 2 bits per page of bookkeeping and one section's worth of output.
 */
export function generate(opts: GenerateOptions, sink: Sink): GenerateSummary {
  const t0 = performance.now();
  const { zeroShare, order, seed } = opts;
  if (!(zeroShare >= 0 && zeroShare <= 1)) throw new RangeError(`--zero must be within 0..1, not ${zeroShare}`);
  if (!ORDERS.includes(order)) throw new RangeError(`--order must be one of ${ORDERS.join(', ')}, not ${order}`);
  const pullShare = opts.pullShare ?? 0.01;
  const passes = opts.passes ?? 2;
  const resendShare = opts.resendShare ?? 0.1;
  const resendZeroShare = opts.resendZeroShare ?? 0.1;
  const perSection = opts.pagesPerSection ?? 512;
  const blocks = blockList(opts.ramBytes);
  const pool = makePool(seed);
  const poolOffsets = POOL_BYTES / 16;
  const scratch = new Uint8Array(PAGE_BYTES);

  // Zero pages: regions of 2 MiB that are entirely zero carry 80% of the zero share, single pages the rest.
  const regionZero = 0.8 * zeroShare;
  const pageZero = zeroShare >= 1 ? 1 : (0.2 * zeroShare) / (1 - regionZero);
  const isZero = (b: number, page: number): boolean =>
    hash4(seed, b * 8 + TAG_REGION, Math.floor(page / REGION_PAGES), 0) / U32 < regionZero ||
    hash4(seed, b * 8 + TAG_PAGE, page, 0) / U32 < pageZero;

  const sent = blocks.map((bl) => new Bits(bl.lengthBytes / PAGE_BYTES));
  const data = blocks.map((bl) => new Bits(bl.lengthBytes / PAGE_BYTES));
  let streamBytes = 0;
  let dataRecords = 0;
  let zeroRecords = 0;
  let resentRecords = 0;
  let inSection = 0;
  let sectionType: 'part' | 'end' = 'part';
  let b = new StreamBuilder();

  const flush = (): void => {
    const out = b.build();
    streamBytes += out.length;
    sink(out);
    b = new StreamBuilder();
  };
  const openSection = (): void => {
    if (sectionType === 'part') b.ramPart(RAM_SECTION_ID);
    else b.ramEnd(RAM_SECTION_ID);
  };
  const closeSection = (): void => {
    if (inSection === 0) return;
    b.ramEos(RAM_SECTION_ID);
    inSection = 0;
    flush();
  };
  /** One page record (data or zero); PART sections hold `perSection` records; END is one section of any length. */
  const emit = (blk: number, page: number, zero: boolean, version: number): void => {
    if (inSection === 0) openSection();
    const s = sent[blk];
    if (s.get(page)) resentRecords++;
    s.set(page, true);
    data[blk].set(page, !zero);
    const id = blocks[blk].id;
    if (zero) {
      b.zero(id, page * PAGE_BYTES);
      zeroRecords++;
    } else {
      const at = (hash4(seed, blk * 8 + TAG_CONTENT, page, version) % poolOffsets) * 16;
      scratch.set(pool.subarray(at, at + PAGE_BYTES));
      // Stamp: marker, block, version, page (little-endian), so every page version differs and none is all zero.
      scratch[0] = 0x5a;
      scratch[1] = blk;
      scratch[2] = version & 0xff;
      scratch[3] = (version >>> 8) & 0xff;
      scratch[4] = page & 0xff;
      scratch[5] = (page >>> 8) & 0xff;
      scratch[6] = (page >>> 16) & 0xff;
      scratch[7] = (page >>> 24) & 0xff;
      b.page(id, page * PAGE_BYTES, scratch);
      dataRecords++;
    }
    inSection++;
    if (sectionType === 'part' && inSection >= perSection) closeSection();
    else if (sectionType === 'end' && inSection % perSection === 0) flush(); // bound memory inside a long END
  };

  b.header().configuration('pc-i440fx-7.2');
  b.ramSetup(RAM_SECTION_ID, blocks);
  flush();

  // First pass: every page once.
  for (let blk = 0; blk < blocks.length; blk++) {
    const n = sent[blk].count;
    if (order !== 'background') {
      for (let page = 0; page < n; page++) emit(blk, page, isZero(blk, page), 0);
      continue;
    }
    let r = hash4(seed, blk, 0x62670000, 0) | 1; // xorshift state for the pulls
    const next = (): number => {
      r ^= r << 13;
      r ^= r >>> 17;
      r ^= r << 5;
      return (r >>> 0) / U32;
    };
    const s = sent[blk];
    for (let page = 0; page < n; page++) {
      if (next() < pullShare && page + 1 < n) {
        // The guest wrote a few pages somewhere ahead: they are saved now, out of order.
        const start = page + 1 + Math.floor(next() * (n - page - 1));
        const run = 1 + Math.floor(next() * 8);
        for (let q = start; q < Math.min(n, start + run); q++) if (!s.get(q)) emit(blk, q, isZero(blk, q), 0);
      }
      if (!s.get(page)) emit(blk, page, isZero(blk, page), 0);
    }
  }

  // Precopy: re-send passes over the pages the guest dirtied (clustered in hot 128 KiB regions), the last in END.
  if (order === 'precopy') {
    for (let pass = 1; pass <= passes; pass++) {
      closeSection();
      if (pass === passes) sectionType = 'end';
      for (let blk = 0; blk < blocks.length; blk++) {
        const n = sent[blk].count;
        for (let page = 0; page < n; page++) {
          if (hash4(seed, blk * 8 + TAG_HOT, Math.floor(page / HOT_REGION_PAGES), pass) / U32 >= 2 * resendShare) continue;
          if (hash4(seed, blk * 8 + TAG_DIRTY, page, pass) / U32 >= 0.5) continue;
          const zero = hash4(seed, blk * 8 + TAG_RESEND_ZERO, page, pass) / U32 < resendZeroShare;
          emit(blk, page, zero, pass);
        }
      }
    }
    if (inSection === 0) openSection();
    inSection = 1; // an END section even if the last pass happened to be empty
    closeSection();
  } else if (order === 'ascending') {
    closeSection();
    b.ramEnd(RAM_SECTION_ID).ramEos(RAM_SECTION_ID);
  } else {
    closeSection();
  }

  // Device state, EOF, VM description.
  const devStart = streamBytes + b.build().length;
  let id = RAM_SECTION_ID + 1;
  const vmdesc: { page_size: number; devices: object[] } = { page_size: PAGE_BYTES, devices: [] };
  for (const [idstr, instance, version, bytes] of DEVICES) {
    const payload = new Uint8Array(bytes);
    for (let i = 0; i < bytes; i++) payload[i] = hash4(seed, id, i, 0x64657673) & 0xff;
    b.device(id, idstr, payload, instance, version);
    vmdesc.devices.push({ name: idstr, instance_id: instance, vmsd_name: idstr, version, fields: [{ name: 'opaque', type: 'buffer', size: bytes }] });
    id++;
  }
  b.eof(vmdesc);
  flush();
  const deviceStateBytes = streamBytes - devStart;

  const summaries = blocks.map((bl, i): BlockSummary => {
    const pages = sent[i].count;
    const sentPages = sent[i].countSet();
    const dataPages = data[i].countSet();
    return { ...bl, pages, dataPages, zeroPages: sentPages - dataPages, unsentPages: pages - sentPages };
  });
  const seconds = (performance.now() - t0) / 1000;
  return {
    order,
    seed,
    ramBytes: opts.ramBytes,
    streamBytes,
    blocks: summaries,
    dataPages: summaries.reduce((a, s) => a + s.dataPages, 0),
    zeroPages: summaries.reduce((a, s) => a + s.zeroPages, 0),
    dataRecords,
    zeroRecords,
    resentRecords,
    deviceStateBytes,
    seconds,
    MBps: streamBytes / 1e6 / seconds,
  };
}

/** "4G", "512M", "64K", "4096" (binary units). */
export function parseSizeBytes(s: string): number {
  const m = /^(\d+(?:\.\d+)?)([KMGT]?)(i?B)?$/i.exec(s.trim());
  if (!m) throw new RangeError(`bad size '${s}' (e.g. 4G, 512M)`);
  const mult = { '': 1, K: 1 << 10, M: 1 << 20, G: 1 << 30, T: 2 ** 40 }[m[2].toUpperCase() as '' | 'K' | 'M' | 'G' | 'T'];
  return Math.round(Number(m[1]) * mult);
}

const USAGE = `usage: generate --ram SIZE [--zero SHARE] [--order ascending|background|precopy] [--seed N]
                [--passes N] [--resend SHARE] [--pull SHARE] [--out FILE] [--summary FILE]
Writes a QEMU 7.2 migration stream to stdout (or FILE); a summary (JSON) goes to stderr (or --summary FILE).`;

function main(argv: string[]): void {
  const args = new Map<string, string>();
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--') continue;
    if (a === '--help' || a === '-h') {
      process.stderr.write(USAGE + '\n');
      return;
    }
    if (!a.startsWith('--')) throw new RangeError(`unexpected argument '${a}'\n${USAGE}`);
    const eq = a.indexOf('=');
    if (eq > 0) args.set(a.slice(2, eq), a.slice(eq + 1));
    else if (i + 1 < argv.length) args.set(a.slice(2), argv[++i]);
    else throw new RangeError(`${a} needs a value\n${USAGE}`);
  }
  const known = ['ram', 'zero', 'order', 'seed', 'passes', 'resend', 'pull', 'out', 'summary', 'section-pages'];
  for (const k of args.keys()) if (!known.includes(k)) throw new RangeError(`unknown option --${k}\n${USAGE}`);
  if (!args.has('ram')) throw new RangeError(`--ram is required\n${USAGE}`);
  const num = (k: string, d: number) => (args.has(k) ? Number(args.get(k)) : d);
  const outPath = args.get('out');
  // isatty, not process.stdout: creating process.stdout could make fd 1 non-blocking.
  if (!outPath && isatty(1)) throw new RangeError('stdout is a terminal; redirect it or use --out FILE');
  const fd = outPath ? openSync(outPath, 'w') : 1;
  const summary = generate(
    {
      ramBytes: parseSizeBytes(args.get('ram')!),
      zeroShare: num('zero', 0.3),
      order: (args.get('order') ?? 'ascending') as Order,
      seed: num('seed', 1),
      passes: num('passes', 2),
      resendShare: num('resend', 0.1),
      pullShare: num('pull', 0.01),
      pagesPerSection: num('section-pages', 512),
    },
    (chunk) => writeAll(fd, chunk),
  );
  if (outPath) closeSync(fd);
  const json = JSON.stringify(summary, null, 2) + '\n';
  if (args.has('summary')) writeFileSync(args.get('summary')!, json);
  else process.stderr.write(json);
}

// Run as a script (`vite-node perf/generate.ts`, which leaves its own path in argv[1]), not when vitest imports it.
const entry = process.argv[1] ?? '';
if (!process.env.VITEST && (/generate\.[cm]?[tj]s$/.test(entry) || /vite-node(\.[cm]?js)?$/.test(entry))) {
  try {
    main(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`generate: ${(err as Error).message}\n`);
    process.exit(2);
  }
}
