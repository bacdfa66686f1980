// snap-pipe load without QEMU: generated streams saved with the real CLI, loaded back with the real CLI into a file
// (or a pipe), and the output parsed with snap-pipe's own stream parser, single-threaded: the RAM it rebuilds, which
// pages it carries (each sent page exactly once, unsent pages never), the order QEMU needs (zero pages, then data,
// then the device state) and the verbatim parts. Then every refusal: nothing may reach stdout before the image is
// known good, and a damaged cluster stops the stream before the device state.
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, copyFileSync, existsSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, statSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SnapPipeError } from '../../src/errors.js';
import { ImageReader } from '../../src/image/reader.js';
import { BIN, runCli } from '../helpers/cli.js';
import { parseAll, parseUntilFailure, type Collected } from '../helpers/parse.js';
import { SMALL_PC_BLOCKS, buildStream, pulledForward, rng, sequentialOps, type BlockSpec, type ModelStream, type Op } from '../helpers/model.js';

const MiB = 1 << 20;
let dir: string;
beforeAll(() => {
  if (!existsSync(join(import.meta.dirname, '..', '..', 'dist', 'main.js'))) throw new Error('dist/ is missing: run npm run build');
  dir = mkdtempSync(join(tmpdir(), 'snap-pipe-load-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const BLOCKS = SMALL_PC_BLOCKS;

// ---------------------------------------------------------------------------------------------------------------
// Helpers

interface LoadRun {
  code: number | null;
  stderr: string;
  /** What went to stdout (the file's content when loading to a file). */
  out: Buffer;
  ms: number;
}

/** Runs `snap-pipe load ARGS` with stdout to `outPath` (a regular file) or to a pipe that is collected. */
function runLoad(args: string[], outPath?: string, env?: Record<string, string>): Promise<LoadRun> {
  return new Promise((resolve, reject) => {
    const t0 = Date.now();
    const outFd = outPath ? openSync(outPath, 'w') : undefined;
    const child = spawn(process.execPath, [BIN, 'load', ...args], {
      stdio: ['ignore', outFd ?? 'pipe', 'pipe'],
      env: { ...process.env, ...env },
    });
    if (outFd !== undefined) closeSync(outFd);
    const chunks: Buffer[] = [];
    let stderr = '';
    child.stdout?.on('data', (d: Buffer) => chunks.push(d));
    child.stderr!.on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code) => {
      const out = outPath ? readFileSync(outPath) : Buffer.concat(chunks);
      resolve({ code, stderr, out, ms: Date.now() - t0 });
    });
  });
}

type Parsed = Collected;

/** snap-pipe's parser in one thread over a stream in memory. */
function parseStream(bytes: Uint8Array): Parsed {
  return parseAll(bytes, 1, 1 << 20);
}

function firstDiff(a: Uint8Array, b: Uint8Array): number {
  if (Buffer.compare(a, b) === 0) return -1;
  let i = 0;
  while (i < a.length && a[i] === b[i]) i++;
  return i;
}

/** The loaded stream rebuilds exactly the model's RAM, carries each sent page once and nothing else. */
function expectFaithful(out: Uint8Array, m: ModelStream): Parsed {
  const orig = parseStream(m.bytes);
  const got = parseStream(out);
  expect(got.parsed.blocks).toEqual(orig.parsed.blocks);
  expect(Buffer.from(got.parsed.head).equals(Buffer.from(orig.parsed.head)), 'header + configuration verbatim').toBe(true);
  expect(Buffer.from(got.parsed.ramSetup).equals(Buffer.from(orig.parsed.ramSetup)), 'ram START verbatim').toBe(true);
  expect(Buffer.from(got.parsed.deviceState).equals(Buffer.from(m.deviceState)), 'device state verbatim').toBe(true);
  expect(Buffer.from(got.parsed.switchoverCommands).equals(Buffer.from(m.switchoverCommands)), 'switch-over commands').toBe(true);
  // They come right before the device state, after every page (QEMU sends them after its last RAM PART).
  const devAt = out.length - m.deviceState.length;
  expect(Buffer.from(out.subarray(devAt - m.switchoverCommands.length, devAt)).equals(Buffer.from(m.switchoverCommands))).toBe(true);
  expect(got.parsed.vmdescPresent).toBe(true);
  expect(got.parsed.streamBytes).toBe(out.length);
  m.blocks.forEach((b, i) => {
    const at = firstDiff(got.ram[i], m.ram[i]);
    expect(at, `${b.id}: first difference at byte ${at} (page ${Math.floor(at / 4096)})`).toBe(-1);
    for (let p = 0; p < m.sent[i].length; p++) {
      const want = m.sent[i][p] ? 1 : 0;
      if (got.records[i][p] !== want) throw new Error(`${b.id} page ${p}: ${got.records[i][p]} records, expected ${want}`);
      if (want && got.data[i][p] !== m.data[i][p]) throw new Error(`${b.id} page ${p}: sent as ${got.data[i][p] ? 'data' : 'zero'}`);
    }
  });
  // Zero pages first (no disk reads), then the data clusters.
  const hasZero = m.sent.some((s, i) => s.some((x, p) => x && !m.data[i][p]));
  expect(got.kindRuns).toEqual(hasZero ? ['z', 'd'] : ['d']);
  return got;
}

/** The chunks with data pages, as load sends them: in the order of their clusters in the file. */
function clustersInHostOrder(img: string, m: ModelStream): { block: number; chunk: number; host: number }[] {
  const reader = ImageReader.open(img);
  try {
    const meta = reader.meta!;
    const out: { block: number; chunk: number; host: number }[] = [];
    m.blocks.forEach((_, b) => {
      for (let chunk = 0; chunk * 256 < m.sent[b].length; chunk++) {
        if (!m.sent[b].slice(chunk * 256, chunk * 256 + 256).some((s, i) => s && m.data[b][chunk * 256 + i])) continue;
        const host = reader.hostOffsetOf(meta.blocks[b].virtOffsetBytes / MiB + chunk);
        expect(host, `block ${b} chunk ${chunk} has a cluster`).toBeDefined();
        out.push({ block: b, chunk, host: host! });
      }
    });
    return out.sort((x, y) => x.host - y.host);
  } finally {
    reader.close();
  }
}

async function save(name: string, m: ModelStream): Promise<string> {
  const img = join(dir, `${name}.qcow2`);
  const r = await runCli(['save', img], m.bytes);
  expect(r.code, r.stderr).toBe(0);
  return img;
}

/** Plain precopy: a first pass over everything, then dirty pages re-sent (data -> data, data -> zero, zero -> data). */
function resendOps(): Op[] {
  const first = sequentialOps(BLOCKS, 6);
  const r = rng(5);
  const pages = BLOCKS[0].lengthBytes / 4096;
  const again: Op[] = [];
  for (let i = 0; i < 3000; i++) {
    const page = Math.floor(r() * pages);
    again.push(r() < 0.3 ? { kind: 'zero', block: 0, page } : { kind: 'page', block: 0, page, seed: 5e6 + i });
  }
  // A whole chunk whose data all became zero: its cluster stays in the image but no page of it is data any more.
  for (let page = 256 * 5; page < 256 * 6; page++) again.push({ kind: 'zero', block: 0, page });
  return [...first, ...again];
}

/** Some pages never sent: a range in pc.ram, and all of the last block. */
function sparseOps(): Op[] {
  return pulledForward(sequentialOps(BLOCKS, 4), 0.01, 3).filter(
    (op) => !(op.block === 0 && op.page >= 1000 && op.page < 2100) && op.block !== 3,
  );
}

interface LoadStats {
  bytesOut: number;
  dataPages: number;
  zeroPages: number;
  unsentPages: number;
  dataClusters: number;
  bytesRead: number;
  outMBps: number;
  readMs: number;
  writeMs: number;
  verified: boolean;
  direct: boolean;
  readBackend: string;
}

// ---------------------------------------------------------------------------------------------------------------

describe('snap-pipe load: saved streams come back page for page', () => {
  const cases: { name: string; ops: () => Op[]; ramEnd?: boolean; perSection?: number; args?: string[]; switchoverStart?: boolean; bareFlushes?: boolean }[] = [
    { name: 'sequential', ops: () => sequentialOps(BLOCKS, 5), ramEnd: true },
    { name: 're-sent, as QEMU 10 sends it (SWITCHOVER_START before the ram END)', ops: resendOps, ramEnd: true, perSection: 700, switchoverStart: true },
    { name: 're-sent, as QEMU 8.1.0-8.1.2 send it (bare MULTIFD_FLUSH records), none of them loaded back', ops: resendOps, ramEnd: true, perSection: 700, bareFlushes: true },
    { name: 'pulled-forward', ops: () => pulledForward(sequentialOps(BLOCKS, 9), 0.002, 11) },
    { name: 're-sent', ops: resendOps, ramEnd: true, perSection: 700 },
    { name: 'unsent pages, buffered, queue depth 1', ops: sparseOps, args: ['--no-direct', '--queue-depth', '1'] },
    { name: 'no zero pages, deep queue', ops: () => sequentialOps(BLOCKS, 1e9), args: ['--queue-depth=64'] },
    { name: 'sync reads', ops: () => pulledForward(sequentialOps(BLOCKS, 4), 0.01, 5), args: ['--io', 'sync', '--queue-depth=4'] },
  ];
  for (const c of cases) {
    it(c.name, async () => {
      const slug = c.name.replace(/[^a-z0-9]+/gi, '-');
      const m = buildStream(BLOCKS, c.ops(), { ramEnd: c.ramEnd, perSection: c.perSection, switchoverStart: c.switchoverStart, bareFlushes: c.bareFlushes });
      const img = await save(slug, m);
      const outPath = join(dir, `${slug}.stream`);
      const statsPath = join(dir, `${slug}.json`);
      const r = await runLoad([img, `--stats=${statsPath}`, ...(c.args ?? [])], outPath);
      expect(r.code, r.stderr).toBe(0);
      expect(r.stderr).toBe('');
      expectFaithful(r.out, m);
      // A QEMU 7.2 destination fails on a MULTIFD_FLUSH record: load never sends one.
      expect(parseStream(m.bytes).parsed.bareFlushes > 0).toBe(c.bareFlushes === true);
      expect(parseStream(r.out).parsed.bareFlushes).toBe(0);
      const stats = JSON.parse(readFileSync(statsPath, 'utf8')) as LoadStats;
      const count = (rows: boolean[][]) => rows.reduce((a, row) => a + row.filter(Boolean).length, 0);
      const sent = count(m.sent);
      expect(stats.dataPages).toBe(count(m.data));
      expect(stats.zeroPages).toBe(sent - count(m.data));
      expect(stats.unsentPages).toBe(m.sent.reduce((a, row) => a + row.length, 0) - sent);
      expect(stats.bytesOut).toBe(r.out.length);
      expect(stats.bytesRead).toBe(stats.dataClusters * MiB);
      expect(stats.verified).toBe(true);
      expect(stats.readBackend).toBe((c.args ?? []).includes('sync') ? 'sync' : 'uring');
      rmSync(outPath);
    });
  }

  it('without the fastmem addon (SNAP_PIPE_NO_FASTMEM=1) the same image comes out, and each side reads the other\'s', async () => {
    const m = buildStream(BLOCKS, resendOps(), { ramEnd: true, perSection: 700 });
    const noAddon = { SNAP_PIPE_NO_FASTMEM: '1' };
    const js = join(dir, 'fallback-js.qcow2');
    const native = join(dir, 'fallback-native.qcow2');
    const stats = (p: string) => JSON.parse(readFileSync(p, 'utf8')) as { checksum: string };
    const s1 = await runCli(['save', js, `--stats=${js}.json`], m.bytes, 1, noAddon);
    expect(s1.code, s1.stderr).toBe(0);
    expect(stats(`${js}.json`).checksum).toBe('javascript');
    const s2 = await runCli(['save', native, `--stats=${native}.json`], m.bytes, 2);
    expect(s2.code, s2.stderr).toBe(0);
    expect(stats(`${native}.json`).checksum).toBe('hardware');
    const a = ImageReader.open(js);
    const b = ImageReader.open(native);
    expect(a.meta!.chunkCrc32c).toEqual(b.meta!.chunkCrc32c);
    expect(a.meta!.chunkCrc32c[0].some((c) => c !== 0)).toBe(true);
    a.close();
    b.close();
    const l1 = await runLoad([native, `--stats=${native}.load.json`], undefined, noAddon);
    expect(l1.code, l1.stderr).toBe(0);
    expect(stats(`${native}.load.json`).checksum).toBe('javascript');
    expectFaithful(l1.out, m);
    const l2 = await runLoad([js]);
    expect(l2.code, l2.stderr).toBe(0);
    expectFaithful(l2.out, m);
  });

  it('prints a summary with --stats, and measures a larger load to a file', async () => {
    const blocks: BlockSpec[] = [{ id: 'pc.ram', lengthBytes: 256 << 20 }, { id: 'pc.bios', lengthBytes: 256 << 10 }];
    const m = buildStream(blocks, sequentialOps(blocks, 3));
    const img = join(dir, 'big.qcow2');
    const s = await runCli(['save', img], m.bytes);
    expect(s.code, s.stderr).toBe(0);
    const outPath = join(dir, 'big.stream');
    const r = await runLoad([img, '--stats'], outPath);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/^snap-pipe load: .*big\.qcow2: [\d.]+ \w+ of stream in [\d.]+s \(\d+ MB\/s\)/);
    const data = m.data.reduce((a, row) => a + row.filter(Boolean).length, 0);
    const pages = m.sent.reduce((a, row) => a + row.length, 0);
    expect(r.stderr).toContain(`pages: ${data} data, ${pages - data} zero, 0 never sent`);
    expect(r.stderr).toMatch(/time: reading [\d.]+s, verifying [\d.]+s, writing to the pipe [\d.]+s/);
    expect(statSync(outPath).size).toBe(r.out.length);
    const mbps = /\((\d+) MB\/s\)/.exec(r.stderr)![1];
    console.log(`load of ${(r.out.length / 1e6).toFixed(0)} MB to a file: ${r.ms} ms including Node start-up; snap-pipe says ${mbps} MB/s`);
    const got = parseStream(r.out);
    expect(firstDiff(got.ram[0], m.ram[0])).toBe(-1);
    rmSync(outPath);
  });
});

describe('snap-pipe load: refusals write nothing to stdout', () => {
  let good: ModelStream;
  let goodImg: string;
  beforeAll(async () => {
    good = buildStream(BLOCKS, sequentialOps(BLOCKS, 7));
    goodImg = await save('good', good);
  });

  function expectRefused(r: LoadRun, pattern: RegExp, code = 1): void {
    expect(r.code, r.stderr).toBe(code);
    expect(r.out.length, 'bytes on stdout').toBe(0);
    const lines = r.stderr.trim().split('\n');
    expect(lines, r.stderr).toHaveLength(1);
    expect(lines[0]).toMatch(/^snap-pipe: /);
    expect(lines[0]).toMatch(pattern);
  }

  it('an image whose save never finished (truncated stream)', async () => {
    const img = join(dir, 'cut.qcow2');
    const s = await runCli(['save', img], good.bytes.subarray(0, Math.floor(good.bytes.length * 0.6)));
    expect(s.code).toBe(1);
    expectRefused(await runLoad([img]), /cut\.qcow2: the save that wrote this image failed: stream ended at byte \d+ while reading /);
  });

  it('an image file cut short', async () => {
    const img = join(dir, 'short.qcow2');
    copyFileSync(goodImg, img);
    truncateSync(img, Math.floor(statSync(img).size / 2 / 4096) * 4096);
    expectRefused(await runLoad([img]), /short\.qcow2: .*truncated image/);
  });

  it('not an image, a QCOW2 image that is not snap-pipe\'s, a missing file, a directory', async () => {
    const junk = join(dir, 'junk.bin');
    writeFileSync(junk, Buffer.alloc(3 * MiB, 0x41));
    expectRefused(await runLoad([junk]), /junk\.bin: not a QCOW2 image/);
    const plain = join(dir, 'plain.qcow2');
    const q = spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', plain, '64M'], { encoding: 'utf8' });
    expect(q.status, q.stderr).toBe(0);
    expectRefused(await runLoad([plain]), /plain\.qcow2: QCOW2 but not a snap-pipe image/);
    expectRefused(await runLoad([join(dir, 'nope.qcow2')]), /nope\.qcow2.*ENOENT/);
    expectRefused(await runLoad([dir, '--no-direct']), / is a directory, not an image file \(snap-pipe reads images from regular files only\)$/);
  });

  it('a flipped byte in a data cluster: CHECKSUM naming block and offset, stopped before that chunk and the device state', async () => {
    const img = join(dir, 'flipped.qcow2');
    copyFileSync(goodImg, img);
    const reader = ImageReader.open(img);
    const meta = reader.meta!;
    const chunk = 3;
    const host = reader.hostOffsetOf(meta.blocks[0].virtOffsetBytes / MiB + chunk);
    reader.close();
    expect(host).toBeDefined();
    // Page 1 of the chunk (769) is data (sequentialOps with zeroEvery 7: pages 770, 777, ... are zero).
    const pageInChunk = 1;
    const at = host! + pageInChunk * 4096 + 100;
    const fd = openSync(img, 'r+');
    const b = Buffer.alloc(1);
    readSync(fd, b, 0, 1, at);
    b[0] ^= 0x10;
    writeSync(fd, b, 0, 1, at);
    closeSync(fd);

    const outPath = join(dir, 'flipped.stream');
    const r = await runLoad([img], outPath);
    expect(r.code).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/flipped\.qcow2: block pc\.ram offset 0x300000 \(1 MiB chunk 3\): checksum mismatch/);
    // What did go out is the verified part, cut short: no device state, so QEMU fails the migration. (Some bytes
    // must go out: QEMU 7.2 never starts an exec: incoming migration on a pipe that closes empty, it just waits.)
    expect(r.out.length).toBeGreaterThan(0);
    expect(r.out.subarray(0, 4).toString('latin1')).toBe('QEVM');
    const { got: partial, error } = parseUntilFailure(r.out);
    expect(error).toBeInstanceOf(SnapPipeError);
    expect((error as SnapPipeError).code).toBe('TRUNCATED');
    expect(r.out.includes(Buffer.from(good.deviceState.subarray(0, 64)))).toBe(false);
    // Page by page: every zero page (sent first, from no cluster); the data pages of exactly the clusters that come
    // before the damaged one in the output order (host-file order), each once and as saved; not one page of the
    // damaged cluster nor of any cluster after it. The order is worked out here from the image's L2 tables.
    const order = clustersInHostOrder(goodImg, good);
    const cut = order.findIndex((c) => c.block === 0 && c.chunk === chunk);
    expect(cut, 'the damaged cluster has clusters before and after it in the output').toBeGreaterThan(0);
    expect(cut).toBeLessThan(order.length - 1);
    const before = new Set(order.slice(0, cut).map((c) => `${c.block}/${c.chunk}`));
    good.blocks.forEach((bl, b) => {
      for (let p = 0; p < good.sent[b].length; p++) {
        const zero = good.sent[b][p] && !good.data[b][p];
        const dataOut = good.sent[b][p] && good.data[b][p] && before.has(`${b}/${Math.floor(p / 256)}`);
        const want = zero || dataOut ? 1 : 0;
        if (partial.records[b][p] !== want || partial.data[b][p] !== dataOut) {
          throw new Error(`${bl.id} page ${p} (chunk ${Math.floor(p / 256)}): ${partial.records[b][p]} records (data ${partial.data[b][p]}), expected ${want} (data ${dataOut})`);
        }
        if (dataOut && firstDiff(partial.ram[b].subarray(p * 4096, p * 4096 + 4096), good.ram[b].subarray(p * 4096, p * 4096 + 4096)) !== -1) {
          throw new Error(`${bl.id} page ${p}: content differs from the saved page`);
        }
      }
    });

    const r2 = await runLoad([img, '--no-verify'], outPath);
    expect(r2.code, r2.stderr).toBe(0);
    const got = parseStream(r2.out);
    const off = (chunk * 256 + pageInChunk) * 4096 + 100;
    expect(firstDiff(got.ram[0], good.ram[0])).toBe(off);
    expect(got.ram[0][off] ^ good.ram[0][off]).toBe(0x10);
    got.ram[0][off] ^= 0x10;
    expect(firstDiff(got.ram[0], good.ram[0])).toBe(-1);
  });

  it('the reader going away (EPIPE): non-zero exit at once, one line', async () => {
    const t0 = Date.now();
    const sh = spawnSync(
      'bash',
      ['-c', `set -o pipefail; ${JSON.stringify(process.execPath)} ${JSON.stringify(BIN)} load ${JSON.stringify(goodImg)} | head -c 1000 > /dev/null`],
      { encoding: 'utf8', timeout: 30_000 },
    );
    const ms = Date.now() - t0;
    expect(sh.error).toBeUndefined();
    expect(sh.status).toBe(1);
    expect(sh.stderr.trim().split('\n')).toHaveLength(1);
    expect(sh.stderr).toMatch(/^snap-pipe: QEMU closed the stream before it was complete \(EPIPE\)/);
    expect(ms).toBeLessThan(10_000);
  });

  it('bad arguments exit 2 with one line; --help goes to stdout', async () => {
    for (const args of [[], ['a', 'b'], [goodImg, '--bogus'], [goodImg, '--queue-depth', '0'], [goodImg, '--queue-depth', 'x'], [goodImg, '--no-verify=1']]) {
      expectRefused(await runLoad(args), /^snap-pipe: load: /, 2);
    }
    for (const args of [['load', '--help'], ['--help']]) {
      const r = await runCli(args);
      expect(r.code).toBe(0);
      expect(r.stdout).toMatch(args[0] === 'load' ? /usage: snap-pipe load IMG/ : /load IMG +write the migration stream/);
    }
  });

  it('refuses to write the stream to a terminal', () => {
    const cmd = `${JSON.stringify(process.execPath)} ${JSON.stringify(BIN)} load ${JSON.stringify(goodImg)}; echo "exit=$?"`;
    const r = spawnSync('script', ['-qec', cmd, '/dev/null'], { encoding: 'utf8', timeout: 30_000 });
    expect(r.error).toBeUndefined();
    expect(r.stdout).toMatch(/stdout is a terminal; redirect it or run under QEMU/);
    expect(r.stdout).toMatch(/exit=2/);
    expect(r.stdout).not.toMatch(/QEVM/);
  });
});
