// snap-pipe save end to end without QEMU: generated streams through the real CLI, real worker threads, real
// O_DIRECT files, checked with qemu-img.
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { expectImageMatches, info, runCli, runOnTerminal } from '../helpers/cli.js';
import { mountSmallFs } from '../helpers/smallfs.js';
import { SMALL_PC_BLOCKS, buildStream, pulledForward, rng, sequentialOps, type Op } from '../helpers/model.js';

let dir: string;
beforeAll(() => {
  if (!existsSync(join(import.meta.dirname, '..', '..', 'dist', 'main.js'))) throw new Error('dist/ is missing: run npm run build');
  dir = mkdtempSync(join(tmpdir(), 'snap-pipe-save-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const BLOCKS = SMALL_PC_BLOCKS;

interface Stats {
  dataPages: number;
  zeroPages: number;
  resentPages: number;
  rewrittenClusters: number;
  oldContentReads: number;
  oldContentBytes: number;
  partialChunks: number;
  writeCalls: number;
  bytesWritten: number;
  dataClusters: number;
  streamBytes: number;
  io: string;
  seconds: number;
  startup: { stagesReadyMs: number; firstReadMs: number; firstWriteMs: number };
}

async function saveAndCheck(name: string, ops: Op[], args: string[] = [], opts: { ramEnd?: boolean; perSection?: number } = {}) {
  const m = buildStream(BLOCKS, ops, opts);
  const img = join(dir, `${name}.qcow2`);
  const statsPath = join(dir, `${name}.json`);
  const r = await runCli(['save', img, `--stats=${statsPath}`, ...args], m.bytes);
  expect(r.code, r.stderr).toBe(0);
  expect(r.stdout).toBe(''); // save never writes to stdout: QEMU reads it as the return path
  const inf = await expectImageMatches(img, m, join(dir, `${name}.raw`));
  const stats = JSON.parse(readFileSync(statsPath, 'utf8')) as Stats;
  expect(stats.streamBytes).toBe(m.bytes.length);
  rmSync(join(dir, `${name}.raw`));
  return { m, img, inf, stats };
}

describe('snap-pipe save (generated streams, real workers and files)', () => {
  it('stores an ascending stream: whole 1 MiB writes, zero pages unallocated', async () => {
    const { stats, inf } = await saveAndCheck('seq', sequentialOps(BLOCKS, 5), [], { ramEnd: true });
    expect(inf.sawRamEnd).toBe(true);
    expect(stats.rewrittenClusters).toBe(0);
    expect(stats.writeCalls).toBe(stats.dataClusters); // one write per cluster
    expect(stats.partialChunks).toBe(0);
    // Start-up, from the process's start: the stream is read once the reader has loaded (maybe before the last of
    // the three stage threads), and written once every stage has loaded and the first bytes have been read.
    const { stagesReadyMs, firstReadMs, firstWriteMs } = stats.startup;
    expect(firstReadMs).toBeGreaterThan(0);
    expect(firstWriteMs).toBeGreaterThan(Math.max(stagesReadyMs, firstReadMs));
    expect(firstWriteMs).toBeLessThan(stagesReadyMs + stats.seconds * 1000);
  });

  it('keeps writes whole when background-snapshot pages arrive out of order, with a 4 MiB ring (2 open chunks)', async () => {
    const ops = pulledForward(sequentialOps(BLOCKS, 9), 0.002, 11);
    const { stats } = await saveAndCheck('bg', ops, ['--ring-size', '4M']);
    expect(stats.resentPages).toBe(0);
    // Pages pulled ahead wait in the park pool until the walk reaches their chunk: every cluster is written once, whole.
    expect(stats.rewrittenClusters).toBe(0);
    expect(stats.writeCalls).toBe(stats.dataClusters);
  });

  it('lets the last version win when plain migration re-sends pages (data -> data, data -> zero, zero -> data), their clusters\' checksums updated from the old content read before each overwrite', async () => {
    const first = sequentialOps(BLOCKS, 6);
    const r = rng(5);
    const pages = BLOCKS[0].lengthBytes / 4096;
    const again: Op[] = [];
    for (let i = 0; i < 3000; i++) {
      const page = Math.floor(r() * pages);
      again.push(r() < 0.3 ? { kind: 'zero', block: 0, page } : { kind: 'page', block: 0, page, seed: 5e6 + i });
    }
    // Queue depth 1 and a 4 MiB ring (one old-content unit): reads and writes wait for each other at every step.
    // Buffered: the old content comes through the page cache.
    for (const args of [[], ['--io', 'sync'], ['--queue-depth', '1', '--ring-size', '4M'], ['--no-direct']]) {
      const { stats } = await saveAndCheck(`resend${args.join('')}`, [...first, ...again], args, { ramEnd: true, perSection: 700 });
      expect(stats.resentPages).toBe(3000);
      expect(stats.rewrittenClusters).toBeGreaterThan(0);
      expect(stats.oldContentReads).toBeGreaterThan(0);
      expect(stats.oldContentBytes % 4096).toBe(0);
      expect(stats.oldContentBytes).toBeGreaterThanOrEqual(stats.oldContentReads * 4096);
    }
  });

  it('gives the same image with either I/O backend and any queue depth', async () => {
    const ops = pulledForward(sequentialOps(BLOCKS, 3), 0.005, 21);
    for (const args of [['--io', 'sync'], ['--io', 'uring', '--queue-depth', '1'], ['--io=uring', '--queue-depth=64', '--ring-size=8M']]) {
      const { stats } = await saveAndCheck(`io-${args.join('')}`, ops, args);
      expect(stats.io).toBe(args.join(' ').includes('uring') ? 'uring' : 'sync');
    }
  });

  it('works with buffered writes (--no-direct) and a tiny ring', async () => {
    await saveAndCheck('buffered', pulledForward(sequentialOps(BLOCKS, 4), 0.01, 3), ['--no-direct', '--ring-size=4M']);
  });

  it('prints a summary with --stats', async () => {
    const m = buildStream(BLOCKS, sequentialOps(BLOCKS).slice(0, 500));
    const r = await runCli(['save', join(dir, 'summary.qcow2'), '--stats'], m.bytes);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/pages: 428 data, 72 zero, 0 re-sent/);
    expect(r.stderr).toMatch(/reader: +busy/);
    expect(r.stderr).toMatch(/writer: +busy .* in disk writes/);
    expect(r.stderr).toMatch(/overwritten pages: .* read in 0 reads/);
    expect(r.stderr).toMatch(/finish: +[\d.]+s \(metadata/);
    expect(r.stderr).toMatch(/start-up: +stage threads ready [\d.]+s, first byte read [\d.]+s, first write [\d.]+s after the process started/);
  });
});

describe('snap-pipe save: refusals and failures', () => {
  it('bad flags and arguments exit 2 with one line', async () => {
    for (const args of [['save'], ['save', 'a', 'b'], ['save', 'x.qcow2', '--bogus'], ['save', 'x.qcow2', '--ring-size', '3M'], ['save', 'x.qcow2', '--ring-size', 'lots'], ['save', 'x.qcow2', '--queue-depth', '0'], ['save', 'x.qcow2', '--io', 'aio'], ['frobnicate']]) {
      const r = await runCli(args);
      expect(r.code, args.join(' ')).toBe(2);
      expect(r.stderr.trim().split('\n'), args.join(' ')).toHaveLength(1);
      expect(r.stderr).toMatch(/^snap-pipe: /);
    }
  });

  it('--help for every command', async () => {
    for (const args of [['--help'], ['save', '--help'], ['info', '--help'], ['help', 'save']]) {
      const r = await runCli(args);
      expect(r.code).toBe(0);
      expect(r.stdout).toMatch(/usage: snap-pipe/);
    }
  });

  it('a truncated stream fails, and the image says incomplete', async () => {
    const m = buildStream(BLOCKS, sequentialOps(BLOCKS));
    const img = join(dir, 'cut.qcow2');
    const r = await runCli(['save', img], m.bytes.subarray(0, Math.floor(m.bytes.length * 0.6)));
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(new RegExp(`^snap-pipe: save ${img} failed \\(the image stays incomplete\\): stream ended at byte \\d+ while reading`));
    const inf = await info(img);
    expect(inf.complete).toBe(false);
    expect(inf.failure).toMatch(/^stream ended at byte \d+ while reading/);
    expect(r.stderr.trim()).toBe(`snap-pipe: save ${img} failed (the image stays incomplete): ${inf.failure}`);
    const again = await runCli(['save', img], new Uint8Array(0));
    expect(again.code).toBe(1);
    expect(again.stderr).toMatch(/empty/);
  });

  it('a full disk fails the save with ENOSPC and leaves the image incomplete, with either backend', async () => {
    const fs8 = mountSmallFs(8);
    try {
      const m = buildStream(BLOCKS, sequentialOps(BLOCKS, 1e9));
      for (const io of ['uring', 'sync']) {
        const img = join(fs8.dir, `full-${io}.qcow2`);
        const r = await runCli(['save', img, '--io', io], m.bytes);
        expect(r.code, r.stderr).toBe(1);
        expect(r.stderr.trim().split('\n')).toHaveLength(1);
        expect(r.stderr).toMatch(/^snap-pipe: save \S*full-.*qcow2 failed \(the image stays incomplete\): write of \d+ bytes at offset \d+: ENOSPC/);
        const inf = await info(img);
        expect(inf.complete).toBe(false);
        // The disk is full, but the header is rewritten in place: the cause is in the image.
        expect(inf.failure).toMatch(/^write of \d+ bytes at offset \d+: ENOSPC/);
        rmSync(img);
      }
    } finally {
      fs8.unmount();
    }
  });

  it('not a migration stream', async () => {
    const r = await runCli(['save', join(dir, 'junk.qcow2')], new TextEncoder().encode('hello, this is not QEMU\n'.repeat(100)));
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/not a QEMU migration stream .* at byte 0/);
  });

  it('refuses a terminal on stdin: one line, exit 2, no image', () => {
    // A real pty on stdin (and stderr): someone typed `snap-pipe save IMG` at a shell instead of piping QEMU into it.
    const img = join(dir, 'tty.qcow2');
    const t = runOnTerminal(['save', img]);
    expect(t.lines).toEqual(['snap-pipe: save: stdin is a terminal; pipe a QEMU migration stream into it (see snap-pipe save --help)']);
    expect(t.code).toBe(2);
    expect(existsSync(img), 'an image was created').toBe(false);
  });

  it('never overwrites a complete image or another file without --force', async () => {
    const m = buildStream(BLOCKS, sequentialOps(BLOCKS).slice(0, 100));
    const img = join(dir, 'keep.qcow2');
    expect((await runCli(['save', img], m.bytes)).code).toBe(0);
    const r = await runCli(['save', img], m.bytes);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/complete snap-pipe image; use --force/);
    expect((await info(img)).complete).toBe(true);
    expect((await runCli(['save', img, '--force'], m.bytes)).code).toBe(0);
    const other = join(dir, 'notes.txt');
    writeFileSync(other, 'precious');
    const r2 = await runCli(['save', other], m.bytes);
    expect(r2.code).toBe(1);
    expect(readFileSync(other, 'utf8')).toBe('precious');
    // Not even --force writes to something that is not a regular file (a device keeps stale bytes where a file
    // has holes, and cannot be sized).
    const r3 = await runCli(['save', '/dev/null', '--force'], m.bytes);
    expect(r3.code).toBe(1);
    expect(r3.stderr.trim()).toBe('snap-pipe: /dev/null is a character device, not an image file (snap-pipe writes images to regular files only)');
  });
});
