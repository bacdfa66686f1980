// Fuzz of the stream reader: random mutations of generated migration streams (bit flips, bytes set to values that
// matter to the format, cuts, insertions, deletions, duplicated ranges, big-endian fields overwritten with edge
// values, splices of two streams), each parsed through a 64 KiB wrapping ring fed in random pieces. Every input must
// end with a clear error (SnapPipeError BAD_STREAM/UNSUPPORTED/TRUNCATED, one line, any byte offset inside the
// input) or a correct result (every page handed out is the 4 KiB at its stream offset, in range of its block). The
// parser runs in a worker (test/fixtures/fuzz-parse-worker.js, over dist/) so a hang is caught by a deadline and
// unbounded memory by the worker's heap limit; a failing input is written to a file to replay.
//
// Runs FUZZ_SECONDS seconds (default 3); FUZZ_SEED picks the run (default: fixed, so CI is repeatable).
import { existsSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Worker } from 'node:worker_threads';
import { crc32 } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { StreamBuilder } from '../../src/format/stream/encoder.js';
import { buildStream, pageContent, pulledForward, rng, sequentialOps, type BlockSpec } from '../helpers/model.js';

const ROOT = join(import.meta.dirname, '..', '..');
const WORKER = join(ROOT, 'test', 'fixtures', 'fuzz-parse-worker.js');
const FUZZ_SECONDS = Number(process.env.FUZZ_SECONDS ?? 3);
const FUZZ_SEED = Number(process.env.FUZZ_SEED ?? 20240601);
/** One input may take this long (inputs are < 1 MiB; the parser needs a few ms). */
const CASE_MS_MAX = 5_000;
const HEAP_MB_MAX = 192;
const CODES = new Set(['BAD_STREAM', 'UNSUPPORTED', 'TRUNCATED']);

interface Result {
  streamBytes: number;
  blocks: { id: string; lengthBytes: number }[];
  deviceStateBytes: number;
  vmdescPresent: boolean;
  pages: [number, number, number, number][];
}
type Reply = { id: number; ok: true; result: Result } | { id: number; ok: false; error: { name: string; code?: string; message: string; stack?: string } };

/** The parse worker, one request at a time, each bounded in time; a worker that dies or overruns is replaced. */
class Parser {
  private worker!: Worker;
  private nextId = 0;
  private pending: { id: number; resolve: (r: Reply) => void; reject: (e: Error) => void } | undefined;

  constructor() {
    this.spawn();
  }

  private spawn(): void {
    this.worker = new Worker(WORKER, { resourceLimits: { maxOldGenerationSizeMb: HEAP_MB_MAX, maxYoungGenerationSizeMb: 32 } });
    this.worker.on('message', (m: Reply) => {
      if (this.pending && m.id === this.pending.id) {
        const p = this.pending;
        this.pending = undefined;
        p.resolve(m);
      }
    });
    this.worker.on('error', (err) => this.fail(new Error(`the parser crashed its thread: ${err.message}${(err as NodeJS.ErrnoException).code === 'ERR_WORKER_OUT_OF_MEMORY' ? ' (unbounded memory)' : ''}`)));
    this.worker.on('exit', (code) => this.fail(new Error(`the parse worker exited (code ${code})`)));
  }

  private fail(err: Error): void {
    const p = this.pending;
    this.pending = undefined;
    p?.reject(err);
  }

  async parse(bytes: Uint8Array, seed: number, maxPiece: number): Promise<Reply> {
    const id = this.nextId++;
    let timer: NodeJS.Timeout | undefined;
    try {
      return await new Promise<Reply>((resolve, reject) => {
        this.pending = { id, resolve, reject };
        timer = setTimeout(() => this.fail(new Error(`no answer within ${CASE_MS_MAX} ms (a hang)`)), CASE_MS_MAX);
        this.worker.postMessage({ id, bytes, seed, maxPiece, ringBytes: 65536 });
      });
    } catch (err) {
      await this.worker.terminate();
      this.spawn();
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }

  async close(): Promise<void> {
    this.worker.removeAllListeners('exit');
    await this.worker.terminate();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Seed streams

interface Seed {
  name: string;
  bytes: Uint8Array;
  /** Stream offsets where a cut leaves a whole stream (after the device state's EOF, before the VM description). */
  wholeAt: Set<number>;
}

function seeds(): Seed[] {
  const blocks: BlockSpec[] = [
    { id: 'pc.ram', lengthBytes: 512 << 10 },
    { id: 'pc.bios', lengthBytes: 64 << 10 },
    { id: '/rom@etc/acpi/rsdp', lengthBytes: 4096 },
  ];
  const out: Seed[] = [];
  const withEof = (name: string, bytes: Uint8Array, vmdesc = true) => {
    // The device state ends EOF [VMDESCRIPTION len JSON]: cutting right after that EOF leaves a whole stream.
    let eofAt = bytes.length - 1;
    if (vmdesc) {
      const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      for (eofAt = bytes.length - 6; eofAt >= 0; eofAt--) {
        if (bytes[eofAt] === 0 && bytes[eofAt + 1] === 6 && view.getUint32(eofAt + 2) === bytes.length - eofAt - 6) break;
      }
    }
    expect(bytes[eofAt], name).toBe(0);
    out.push({ name, bytes, wholeAt: new Set([eofAt + 1, bytes.length]) });
  };
  const r = rng(3);
  const ops = pulledForward(sequentialOps(blocks, 3), 0.05, 7);
  for (let i = 0; i < 40; i++) {
    const page = Math.floor(r() * 128);
    ops.push(r() < 0.5 ? { kind: 'zero', block: 0, page } : { kind: 'page', block: 0, page, seed: 900 + i });
  }
  withEof('precopy with re-sent pages and RAM END', buildStream(blocks, ops, { ramEnd: true, perSection: 37, deviceBytes: 700 }).bytes);
  withEof('background-snapshot order', buildStream(blocks, pulledForward(sequentialOps(blocks, 5), 0.1, 9), { perSection: 300, deviceBytes: 300 }).bytes);
  const b = new StreamBuilder().header().configuration('pc-q35-7.2', ['x-ignore-shared']);
  b.ramSetup(5, [{ id: 'pc.ram', lengthBytes: 64 << 10, addr: 0x100000 }, { id: 'vga.vram', lengthBytes: 16 << 10, addr: 0xfd000000 }]);
  b.ramPart(5).page('pc.ram', 4096, pageContent(1)).zero('pc.ram', 0).page('vga.vram', 8192, pageContent(2)).ramEos(5);
  b.ramEnd(5).ramEos(5).device(6, 'cpu', new Uint8Array(200).fill(0x7e)).u8(0); // EOF, no VM description
  withEof('x-ignore-shared, no VM description', b.build(), false);
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Mutations

type Mutation = { what: string; bytes: Uint8Array; dataOnly: boolean; cutAt?: number };

/** Interesting byte values: section types, RAM flag bytes, footer, lengths at the edges. */
const MAGIC_BYTES = [0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x10, 0x20, 0x28, 0x40, 0x7e, 0x7f, 0x80, 0xff];
const EDGE_U32 = [0, 1, 0x7fffffff, 0x80000000, 0xffffffff, 4096, 4095, 0x1000_0000];

/** Stream offsets of page data in the seed (from its own parse), to mutate page contents only. */
function mutate(seed: Seed, dataRanges: number[], r: () => number, other: Seed): Mutation {
  const src = seed.bytes;
  const n = src.length;
  const pos = () => Math.floor(r() * n);
  const kind = Math.floor(r() * 10);
  switch (kind) {
    case 0: {
      const b = src.slice();
      const k = 1 + Math.floor(r() * 4);
      const at: number[] = [];
      for (let i = 0; i < k; i++) {
        const p = pos();
        b[p] ^= 1 << Math.floor(r() * 8);
        at.push(p);
      }
      return { what: `flip bits at ${at.join(',')}`, bytes: b, dataOnly: false };
    }
    case 1: {
      const b = src.slice();
      const p = pos();
      b[p] = MAGIC_BYTES[Math.floor(r() * MAGIC_BYTES.length)];
      return { what: `set byte ${p} to 0x${b[p].toString(16)}`, bytes: b, dataOnly: false };
    }
    case 2: {
      const cut = Math.floor(r() * n);
      return { what: `cut at ${cut}`, bytes: src.slice(0, cut), dataOnly: false, cutAt: cut };
    }
    case 3: {
      const p = pos();
      const extra = new Uint8Array(1 + Math.floor(r() * 64)).map(() => Math.floor(r() * 256));
      const b = new Uint8Array(n + extra.length);
      b.set(src.subarray(0, p));
      b.set(extra, p);
      b.set(src.subarray(p), p + extra.length);
      return { what: `insert ${extra.length} bytes at ${p}`, bytes: b, dataOnly: false };
    }
    case 4: {
      const p = pos();
      const len = Math.min(n - p, 1 + Math.floor(r() * 5000));
      const b = new Uint8Array(n - len);
      b.set(src.subarray(0, p));
      b.set(src.subarray(p + len), p);
      return { what: `delete ${len} bytes at ${p}`, bytes: b, dataOnly: false };
    }
    case 5: {
      const p = pos();
      const len = Math.min(n - p, 1 + Math.floor(r() * 9000));
      const b = new Uint8Array(n + len);
      b.set(src.subarray(0, p + len));
      b.set(src.subarray(p), p + len);
      return { what: `duplicate ${len} bytes at ${p}`, bytes: b, dataOnly: false };
    }
    case 6: {
      const b = src.slice();
      const p = Math.min(pos(), n - 8);
      const v = EDGE_U32[Math.floor(r() * EDGE_U32.length)];
      new DataView(b.buffer).setUint32(p + (r() < 0.5 ? 0 : 4), v);
      return { what: `be32 at ${p} set to 0x${v.toString(16)}`, bytes: b, dataOnly: false };
    }
    case 7: {
      const a = Math.floor(r() * n);
      const c = Math.floor(r() * other.bytes.length);
      const b = new Uint8Array(a + other.bytes.length - c);
      b.set(src.subarray(0, a));
      b.set(other.bytes.subarray(c), a);
      return { what: `splice ${seed.name}[0,${a}) + ${other.name}[${c},)`, bytes: b, dataOnly: false };
    }
    default: {
      // Page contents only: the parse must succeed and hand out the changed bytes.
      const b = src.slice();
      const at: number[] = [];
      for (let i = 0; i < 1 + Math.floor(r() * 8); i++) {
        const start = dataRanges[Math.floor(r() * dataRanges.length)];
        const p = start + Math.floor(r() * 4096);
        b[p] = Math.floor(r() * 256);
        at.push(p);
      }
      return { what: `page bytes set at ${at.join(',')}`, bytes: b, dataOnly: true };
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Oracle

function pagesKey(res: Result): string {
  return res.pages
    .map(([block, page, off]) => `${block}:${page}:${off}`)
    .sort()
    .join(' ');
}

/** Returns what is wrong with the outcome of one input, or undefined. */
function judge(m: Mutation, reply: Reply, seed: Seed, base: Result): string | undefined {
  const input = m.bytes;
  if (!reply.ok) {
    const e = reply.error;
    if (e.name !== 'SnapPipeError' || !e.code || !CODES.has(e.code)) return `not a clear error: ${e.name} ${e.code ?? ''}: ${e.message}\n${e.stack ?? ''}`;
    if (e.message.includes('\n') || e.message.length === 0 || e.message.length > 400) return `error message not one clear line: ${JSON.stringify(e.message)}`;
    for (const hit of e.message.matchAll(/(?:at|from) byte (\d+)/g)) {
      if (Number(hit[1]) > input.length) return `error names byte ${hit[1]}, beyond the input's ${input.length}: ${e.message}`;
    }
    if (m.dataOnly) return `page contents changed, yet refused: ${e.message}`;
    return undefined;
  }
  const res = reply.result;
  if (res.streamBytes !== input.length) return `parsed ${res.streamBytes} of ${input.length} bytes`;
  for (const [block, page, off, crc] of res.pages) {
    if (off < 0) continue;
    if (off + 4096 > input.length) return `page ${block}:${page} at ${off} runs past the input`;
    if ((crc32(input.subarray(off, off + 4096)) >>> 0) !== crc) return `page ${block}:${page} is not the 4 KiB at stream offset ${off}`;
  }
  if (m.cutAt !== undefined && !seed.wholeAt.has(m.cutAt)) return `a stream cut at ${m.cutAt} of ${seed.bytes.length} was accepted as whole`;
  if (m.dataOnly && pagesKey(res) !== pagesKey(base)) return 'page contents changed, and so did the set of pages';
  return undefined;
}

// ---------------------------------------------------------------------------------------------------------------

describe(`stream reader fuzz (${FUZZ_SECONDS} s, seed ${FUZZ_SEED})`, () => {
  let parser: Parser;
  beforeAll(() => {
    if (!existsSync(join(ROOT, 'dist', 'format', 'stream', 'parser.js'))) throw new Error('dist/ is missing: run npm run build');
    parser = new Parser();
  });
  afterAll(async () => parser?.close());

  it('every mutated stream ends in a clear error or a correct result; none hangs, crashes or runs out of memory', async () => {
    const all = seeds();
    const bases: Result[] = [];
    const dataRanges: number[][] = [];
    for (const s of all) {
      const reply = await parser.parse(s.bytes, 1, 70000);
      if (!reply.ok) throw new Error(`seed ${s.name} does not parse: ${reply.error.message}`);
      expect(reply.result.streamBytes).toBe(s.bytes.length);
      bases.push(reply.result);
      dataRanges.push(reply.result.pages.filter((p) => p[2] >= 0).map((p) => p[2]));
    }
    const r = rng(FUZZ_SEED);
    const deadline = Date.now() + FUZZ_SECONDS * 1000;
    const tally = { cases: 0, accepted: 0, byCode: {} as Record<string, number> };
    const failures: string[] = [];
    // Made on the first failure only, to keep its inputs for a look (a passing run leaves nothing in /tmp).
    let outDir: string | undefined;
    while (Date.now() < deadline && failures.length < 5) {
      const si = Math.floor(r() * all.length);
      const m = mutate(all[si], dataRanges[si], r, all[Math.floor(r() * all.length)]);
      const feedSeed = Math.floor(r() * 2 ** 31);
      const maxPiece = [1, 7, 4096, 70000][Math.floor(r() * 4)];
      let problem: string | undefined;
      try {
        const reply = await parser.parse(m.bytes, feedSeed, maxPiece);
        problem = judge(m, reply, all[si], bases[si]);
        if (reply.ok) tally.accepted++;
        else tally.byCode[reply.error.code ?? reply.error.name] = (tally.byCode[reply.error.code ?? reply.error.name] ?? 0) + 1;
      } catch (err) {
        problem = (err as Error).message;
      }
      tally.cases++;
      if (problem) {
        outDir ??= mkdtempSync(join(tmpdir(), 'snap-pipe-fuzz-'));
        const file = join(outDir, `case-${tally.cases}.bin`);
        writeFileSync(file, m.bytes);
        failures.push(`${all[si].name}: ${m.what} (pieces of up to ${maxPiece}, feed seed ${feedSeed}; input in ${file}): ${problem}`);
      }
    }
    console.log(`fuzz: ${tally.cases} inputs in ${FUZZ_SECONDS} s, ${tally.accepted} accepted, refused: ${JSON.stringify(tally.byCode)}`);
    expect(failures, failures.join('\n\n')).toEqual([]);
    expect(tally.cases).toBeGreaterThan(50);
  }, (FUZZ_SECONDS + 60) * 1000);

  it('every cut in the device state and VM description is refused (only a cut right after EOF leaves a whole stream)', async () => {
    const wrong: string[] = [];
    for (const s of seeds()) {
      const dev = s.bytes.length - Math.min(s.bytes.length - 1, 1500);
      for (let cut = dev; cut < s.bytes.length; cut++) {
        const reply = await parser.parse(s.bytes.subarray(0, cut), cut, 70000);
        if (reply.ok !== s.wholeAt.has(cut)) wrong.push(`${s.name}: cut at ${cut} of ${s.bytes.length} ${reply.ok ? 'accepted' : `refused: ${reply.error.message}`}`);
        else if (!reply.ok && reply.error.code !== 'TRUNCATED') wrong.push(`${s.name}: cut at ${cut}: ${reply.error.code} ${reply.error.message}`);
      }
    }
    expect(wrong, wrong.slice(0, 20).join('\n')).toEqual([]);
  });
});
