// Fuzz of the image reader, as test/unit/fuzz.test.ts is of the stream reader: random mutations of a small image
// saved by the real CLI (bit flips and edge values in the header, the L1, L2 and refcount tables, the metadata
// with or without its checksums made to match, data clusters; entries copied over others; the file cut short),
// each run through snap-pipe's info, verify and load in a child process (test/fixtures/fuzz-image-child.js, over
// dist/) under an address-space cap, with a deadline per image. Every outcome must be a clean result or a
// SnapPipeError (one line naming the image), never a hang, a crash or an allocation failure; and when verify finds
// an image sound, load must send it (the RAM the original stream meant, unless the metadata was re-signed), and
// qemu-img check must find it clean. A failing image is kept in a directory named in the failure.
//
// Runs FUZZ_SECONDS seconds (default 3); FUZZ_SEED picks the run (default: fixed, so CI is repeatable).
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { copyFileSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { crc32 } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { decodeHeader } from '../../src/format/image/qcow2.js';
import { ROOT, runCli } from '../helpers/cli.js';
import { buildStream, rng, sequentialOps, type BlockSpec, type ModelStream } from '../helpers/model.js';
import { parseAll } from '../helpers/parse.js';

const CHILD = join(ROOT, 'test', 'fixtures', 'fuzz-image-child.js');
const FUZZ_SECONDS = Number(process.env.FUZZ_SECONDS ?? 3);
const FUZZ_SEED = Number(process.env.FUZZ_SEED ?? 20240601);
/** Info, verify and load of one 7 MiB image take a few ms; this is a hang. */
const CASE_MS_MAX = 10_000;
/** As in test/integration/crafted.test.ts: the sound image needs about 1000 MiB of address space. */
const AS_CAP_BYTES = 1280 << 20;
const CODES = new Set(['BAD_IMAGE', 'TRUNCATED', 'INCOMPLETE', 'CHECKSUM']);
const MiB = 1 << 20;

type Outcome<T> = { ok: true; result: T } | { ok: false; error: { name: string; code?: string; message: string; stack?: string } };
interface Reply {
  id: number;
  info: Outcome<{ complete: boolean }>;
  verify: Outcome<{ sound: boolean; badClusters: number }>;
  load: Outcome<{ bytesOut: number }>;
  crashed?: Outcome<never>;
}

/** The child process, one image at a time, each bounded in time; a child that dies or overruns is replaced. */
class Runner {
  private child!: ChildProcess;
  private ready!: Promise<void>;
  private nextId = 0;
  private pending: { id: number; resolve: (r: Reply) => void; reject: (e: Error) => void } | undefined;
  private stderr = '';

  constructor() {
    this.spawn();
  }

  private spawn(): void {
    this.stderr = '';
    this.child = spawn('prlimit', [`--as=${AS_CAP_BYTES}`, process.execPath, '--disable-wasm-trap-handler', CHILD], { stdio: ['ignore', 'ignore', 'pipe', 'ipc'] });
    this.child.stderr!.on('data', (d) => (this.stderr = (this.stderr + d).slice(-4000)));
    this.ready = new Promise((resolve, reject) => {
      this.child.once('message', () => resolve());
      this.child.once('exit', (code, signal) => reject(new Error(`the fuzz child exited at start (${code ?? signal}): ${this.stderr}`)));
    });
    this.child.on('message', (m: Reply) => {
      if (this.pending && m.id === this.pending.id) {
        const p = this.pending;
        this.pending = undefined;
        p.resolve(m);
      }
    });
    this.child.on('exit', (code, signal) => this.fail(new Error(`the child died (${code ?? signal}): ${this.stderr}`)));
  }

  private fail(err: Error): void {
    const p = this.pending;
    this.pending = undefined;
    p?.reject(err);
  }

  async run(path: string, outPath: string): Promise<Reply> {
    await this.ready;
    const id = this.nextId++;
    let timer: NodeJS.Timeout | undefined;
    try {
      return await new Promise<Reply>((resolve, reject) => {
        this.pending = { id, resolve, reject };
        timer = setTimeout(() => this.fail(new Error(`no answer within ${CASE_MS_MAX} ms (a hang)`)), CASE_MS_MAX);
        this.child.send({ id, path, outPath });
      });
    } catch (err) {
      this.child.removeAllListeners('exit');
      this.child.kill('SIGKILL');
      this.spawn();
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }

  close(): void {
    this.child.removeAllListeners('exit');
    this.child.kill('SIGKILL');
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The seed image and where its structures lie

interface Layout {
  bytes: Buffer;
  regions: { name: string; at: number; length: number }[];
  /** Host offset of the metadata and its length; offset of the header's metadata length and CRC fields. */
  meta: number;
  metaBytes: number;
}

function layoutOf(bytes: Buffer): Layout {
  const d = decodeHeader(bytes.subarray(0, 4096));
  if (d.kind !== 'ok' || !d.snap) throw new Error('not a snap-pipe image');
  const h = d.header;
  const entry = (at: number) => Number(bytes.readBigUInt64BE(at) & 0x00ff_ffff_ffff_fe00n);
  const l2 = entry(h.l1OffsetBytes);
  const virtualClusters = h.virtualBytes / MiB;
  const metaVirt = d.snap.metaVirtOffsetBytes / MiB;
  const meta = entry(l2 + metaVirt * 8);
  const refcountBlock = Number(bytes.readBigUInt64BE(h.refcountTableOffsetBytes));
  return {
    bytes,
    meta,
    metaBytes: d.snap.metaBytes,
    regions: [
      { name: 'header', at: 0, length: 104 + 8 + 32 + 16 },
      { name: 'L1', at: h.l1OffsetBytes, length: 16 },
      { name: 'L2', at: l2, length: virtualClusters * 8 + 32 },
      { name: 'refcount table', at: h.refcountTableOffsetBytes, length: 16 },
      { name: 'refcount block', at: refcountBlock, length: (bytes.length / MiB) * 2 + 16 },
      { name: 'metadata', at: meta, length: d.snap.metaBytes },
      { name: 'data', at: MiB, length: 3 * MiB },
    ],
  };
}

// ---------------------------------------------------------------------------------------------------------------
// Mutations

interface Mutation {
  what: string;
  bytes: Buffer;
  /** The metadata was changed with its checksums made to match: it may mean something else, consistently. */
  resigned: boolean;
}

const EDGE_U64 = [0n, 1n, 2n, 0x200n, 1n << 20n, 1n << 40n, 1n << 50n, 1n << 55n, 1n << 56n, 1n << 62n, 1n << 63n, (1n << 64n) - 1n, (1n << 63n) | (1n << 20n), (1n << 63n) | (5n << 20n)];
const EDGE_U32 = [0, 1, 2, 3, 4, 7, 8, 16, 20, 104, 4096, 0x7fff_ffff, 0xffff_ffff, 0x534e_5031];
const MAGIC_BYTES = [0x00, 0x01, 0x02, 0x04, 0x06, 0x7e, 0x7f, 0x80, 0xff];

/** The metadata's section CRCs and the header's length and CRC of it made to match its (changed) bytes. */
function resign(b: Buffer, L: Layout): void {
  const meta = b.subarray(L.meta, L.meta + L.metaBytes);
  let pos = 24;
  for (let i = 0; i < Math.min(meta.readUInt32LE(12), 16) && pos + 24 <= meta.length; i++) {
    const len = Number(meta.readBigUInt64LE(pos + 8));
    if (len > meta.length - pos - 24) break;
    meta.writeUInt32LE(crc32(meta.subarray(pos + 24, pos + 24 + len)) >>> 0, pos + 16);
    pos += 24 + Math.ceil(len / 8) * 8;
  }
  b.writeUInt32BE(crc32(meta) >>> 0, 104 + 8 + 24);
}

function mutate(L: Layout, r: () => number): Mutation {
  const b = Buffer.from(L.bytes);
  const region = L.regions[Math.floor(r() * L.regions.length)];
  const pos = () => region.at + Math.floor(r() * region.length);
  const kind = Math.floor(r() * 7);
  switch (kind) {
    case 0: {
      const at: number[] = [];
      for (let i = 0; i < 1 + Math.floor(r() * 3); i++) {
        const p = pos();
        b[p] ^= 1 << Math.floor(r() * 8);
        at.push(p);
      }
      return { what: `${region.name}: bits flipped at ${at.join(',')}`, bytes: b, resigned: false };
    }
    case 1: {
      const p = pos();
      b[p] = MAGIC_BYTES[Math.floor(r() * MAGIC_BYTES.length)];
      return { what: `${region.name}: byte ${p} set to 0x${b[p].toString(16)}`, bytes: b, resigned: false };
    }
    case 2: {
      const p = Math.min(pos() & ~7, b.length - 8);
      const v = EDGE_U64[Math.floor(r() * EDGE_U64.length)];
      b.writeBigUInt64BE(v, p);
      return { what: `${region.name}: be64 at ${p} set to 0x${v.toString(16)}`, bytes: b, resigned: false };
    }
    case 3: {
      const p = Math.min(pos() & ~3, b.length - 4);
      const v = EDGE_U32[Math.floor(r() * EDGE_U32.length)];
      b.writeUInt32BE(v, p);
      return { what: `${region.name}: be32 at ${p} set to 0x${v.toString(16)}`, bytes: b, resigned: false };
    }
    case 4: {
      // One table entry copied over another (a cluster named twice, a table entry past its end).
      const from = pos() & ~7;
      const to = pos() & ~7;
      b.copy(b, to, from, from + 8);
      return { what: `${region.name}: 8 bytes at ${from} copied to ${to}`, bytes: b, resigned: false };
    }
    case 5: {
      const cut = r() < 0.5 ? Math.floor(r() * (b.length / MiB)) * MiB : Math.floor(r() * b.length);
      return { what: `cut at ${cut}`, bytes: b.subarray(0, cut), resigned: false };
    }
    default: {
      // The metadata changed and re-signed: what decodeMeta and load's checks must catch on their own.
      const at: number[] = [];
      for (let i = 0; i < 1 + Math.floor(r() * 3); i++) {
        const p = L.meta + Math.floor(r() * L.metaBytes);
        b[p] = r() < 0.5 ? b[p] ^ (1 << Math.floor(r() * 8)) : MAGIC_BYTES[Math.floor(r() * MAGIC_BYTES.length)];
        at.push(p - L.meta);
      }
      resign(b, L);
      return { what: `metadata bytes ${at.join(',')} changed, checksums made to match`, bytes: b, resigned: true };
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Oracle

function clean<T>(o: Outcome<T>, path: string): string | undefined {
  if (o.ok) return undefined;
  const e = o.error;
  if (e.name !== 'SnapPipeError' || !e.code || !CODES.has(e.code)) return `not a clean error: ${e.name} ${e.code ?? ''}: ${e.message}\n${e.stack ?? ''}`;
  if (e.message.includes('\n') || e.message.length > 500) return `not one line: ${JSON.stringify(e.message)}`;
  if (!e.message.includes(path)) return `does not name the image: ${e.message}`;
  return undefined;
}

function sameRam(out: Uint8Array, m: ModelStream): string | undefined {
  let got;
  try {
    got = parseAll(out, 1, 1 << 20);
  } catch (err) {
    return `its output does not parse: ${(err as Error).message}`;
  }
  for (let i = 0; i < m.blocks.length; i++) {
    if (Buffer.compare(got.ram[i], m.ram[i]) !== 0) return `its output differs in ${m.blocks[i].id}`;
  }
  return undefined;
}

// ---------------------------------------------------------------------------------------------------------------

const BLOCKS: BlockSpec[] = [
  { id: 'pc.ram', lengthBytes: 2 << 20 },
  { id: 'pc.bios', lengthBytes: 128 << 10 },
  { id: '/rom@etc/acpi/rsdp', lengthBytes: 4096 },
];

describe(`image reader fuzz (${FUZZ_SECONDS} s, seed ${FUZZ_SEED})`, () => {
  let dir: string;
  let runner: Runner;
  let model: ModelStream;
  let L: Layout;
  beforeAll(async () => {
    if (!existsSync(join(ROOT, 'dist', 'load', 'precopy.js'))) throw new Error('dist/ is missing: run npm run build');
    dir = mkdtempSync(join(tmpdir(), 'snap-pipe-image-fuzz-'));
    model = buildStream(BLOCKS, sequentialOps(BLOCKS, 5), { ramEnd: true, deviceBytes: 2000 });
    const img = join(dir, 'seed.qcow2');
    const s = await runCli(['save', img], model.bytes);
    expect(s.code, s.stderr).toBe(0);
    L = layoutOf(readFileSync(img));
    runner = new Runner();
  });
  afterAll(() => {
    runner?.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it('every mutated image ends in a clean result or one clear error; none hangs, crashes or takes unbounded memory', async () => {
    const seedImg = join(dir, 'seed.qcow2');
    const out = join(dir, 'out.stream');
    const seedReply = await runner.run(seedImg, out);
    expect(seedReply.verify).toMatchObject({ ok: true, result: { sound: true } });
    expect(seedReply.load.ok).toBe(true);
    expect(sameRam(readFileSync(out), model)).toBeUndefined();

    const r = rng(FUZZ_SEED);
    const deadline = Date.now() + FUZZ_SECONDS * 1000;
    const tally = { cases: 0, sound: 0, refusedBy: {} as Record<string, number> };
    const failures: string[] = [];
    let keep: string | undefined;
    const img = join(dir, 'case.qcow2');
    while (Date.now() < deadline && failures.length < 5) {
      const m = mutate(L, r);
      writeFileSync(img, m.bytes);
      tally.cases++;
      let problem: string | undefined;
      try {
        const reply = await runner.run(img, out);
        if (reply.crashed) throw new Error(`the child's harness failed: ${JSON.stringify(reply.crashed)}`);
        const outcomes: [string, Outcome<unknown>][] = [['info', reply.info], ['verify', reply.verify], ['load', reply.load]];
        for (const [cmd, o] of outcomes) {
          const wrong = clean(o, img);
          if (wrong) problem ??= `${cmd}: ${wrong}`;
          if (!o.ok) tally.refusedBy[`${cmd} ${o.error.code}`] = (tally.refusedBy[`${cmd} ${o.error.code}`] ?? 0) + 1;
        }
        if (!problem && reply.verify.ok && reply.verify.result.sound) {
          tally.sound++;
          if (!reply.load.ok) problem = `verify found it sound, load refused it: ${reply.load.error.message}`;
          else if (!m.resigned) problem = sameRam(readFileSync(out), model);
          if (!problem) {
            const check = spawnSync('qemu-img', ['check', img], { encoding: 'utf8' });
            if (check.status !== 0) problem = `verify found it sound, qemu-img check did not: ${check.stdout}${check.stderr}`;
          }
        }
      } catch (err) {
        problem = (err as Error).message;
      }
      if (problem) {
        keep ??= mkdtempSync(join(tmpdir(), 'snap-pipe-image-fuzz-failed-'));
        const file = join(keep, `case-${tally.cases}.qcow2`);
        copyFileSync(img, file);
        failures.push(`${m.what} (image in ${file}): ${problem}`);
      }
    }
    console.log(`image fuzz: ${tally.cases} images in ${FUZZ_SECONDS} s, ${tally.sound} sound (all clean to qemu-img check), refused: ${JSON.stringify(tally.refusedBy)}`);
    expect(failures, failures.join('\n\n')).toEqual([]);
    expect(tally.cases).toBeGreaterThan(20);
  }, (FUZZ_SECONDS + 60) * 1000);
});
