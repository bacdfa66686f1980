// I/O errors from the disk, for real: the image lives on an ext4 file system on a loop device made by the test
// (test/helpers/loopfs.ts), which the test shuts down (EXT4_IOC_SHUTDOWN) in the middle of a save, once the image
// has grown past a few MiB; from then on ext4 answers every write, read and open with EIO. A save then fails with
// one line naming the image, the offset and EIO, with either I/O backend, exit 1, and the image (looked at after
// the file system is mounted again) is marked incomplete. load, verify and info of an image on a shut-down file
// system fail with one line naming the image and EIO (load writes its refusal marker to a pipe, nothing more).
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BIN, info, ROOT, runCli, type RunResult } from '../helpers/cli.js';
import { mountLoopFs, type LoopFs } from '../helpers/loopfs.js';
import { buildStream, sequentialOps, type BlockSpec } from '../helpers/model.js';

const MiB = 1 << 20;
const BLOCKS: BlockSpec[] = [
  { id: 'pc.ram', lengthBytes: 48 << 20 },
  { id: 'pc.bios', lengthBytes: 256 << 10 },
];
/** Stream bytes fed before the shutdown; the rest only after it, so the save cannot finish first. */
const FIRST_PART_BYTES = 16 * MiB;
/** The image must hold this much on disk before the shutdown: the save is well under way. */
const GROWN_BYTES = 4 * MiB;
/** Bound on the wait for the image to grow, and on each command. */
const WAIT_MS_MAX = 20_000;

const made: LoopFs[] = [];
let m: ReturnType<typeof buildStream>;

beforeAll(() => {
  if (!existsSync(join(ROOT, 'dist', 'main.js'))) throw new Error('dist/ is missing: run npm run build');
  m = buildStream(BLOCKS, sequentialOps(BLOCKS, 1e9));
  expect(m.bytes.length).toBeGreaterThan(FIRST_PART_BYTES + 16 * MiB);
});

afterAll(() => {
  const problems: string[] = [];
  for (const fs of made) {
    try {
      fs.cleanup();
    } catch (err) {
      problems.push((err as Error).message);
    }
  }
  if (problems.length > 0) throw new Error(problems.join('\n'));
});

function loopFs(): LoopFs {
  const fs = mountLoopFs(128);
  made.push(fs);
  return fs;
}

function oneLine(r: RunResult | { stderr: string }): string {
  const lines = r.stderr.trim().split('\n');
  expect(lines, r.stderr).toHaveLength(1);
  expect(lines[0]).toMatch(/^snap-pipe: /);
  return lines[0];
}

const escaped = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
/** Opening the image is the first thing that fails. */
const openFailed = (img: string) => new RegExp(`^snap-pipe: open ${escaped(img)}( with O_DIRECT)?: EIO \\(i/o error\\)$`);

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * `snap-pipe save IMG ARGS` fed the first part of the stream; once IMG holds GROWN_BYTES on disk, `midway()` runs
 * (the shutdown), then the rest of the stream follows.
 */
async function saveWithFault(img: string, args: string[], midway: () => void): Promise<{ code: number | null; stderr: string }> {
  const child = spawn(process.execPath, [BIN, 'save', img, ...args], { stdio: ['pipe', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += d));
  child.stdin.on('error', () => undefined); // the save stops reading once it failed
  const closed = new Promise<number | null>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', resolve);
  });
  let exited = false;
  void closed.then(() => (exited = true));
  const killer = setTimeout(() => child.kill('SIGKILL'), 2 * WAIT_MS_MAX);
  try {
    child.stdin.write(m.bytes.subarray(0, FIRST_PART_BYTES));
    const t0 = Date.now();
    // Bounded: the image grows as the writer catches up with the part fed.
    for (;;) {
      const onDisk = existsSync(img) ? statSync(img).blocks * 512 : 0;
      if (onDisk >= GROWN_BYTES) break;
      if (exited) throw new Error(`the save ended before the fault (image ${onDisk} bytes on disk): ${stderr}`);
      if (Date.now() - t0 > WAIT_MS_MAX) throw new Error(`the image did not reach ${GROWN_BYTES} bytes on disk in ${WAIT_MS_MAX} ms (${onDisk})`);
      await sleep(20);
    }
    midway();
    child.stdin.end(m.bytes.subarray(FIRST_PART_BYTES));
    return { code: await closed, stderr };
  } finally {
    clearTimeout(killer);
    if (!exited) child.kill('SIGKILL');
  }
}

describe('the disk fails (EIO) in the middle of a save', () => {
  for (const io of ['uring', 'sync'] as const) {
    it(`--io ${io}: one line naming the image, the offset and EIO; exit 1; the image is left incomplete`, async () => {
      const fs = loopFs();
      const img = join(fs.dir, `vm-${io}.qcow2`);
      const r = await saveWithFault(img, ['--io', io], () => fs.shutdown('sync'));
      expect(r.code, r.stderr).toBe(1);
      // The stream's rest goes in only after the shutdown, so the first thing to fail is a cluster write.
      expect(oneLine(r)).toMatch(new RegExp(`^snap-pipe: save ${escaped(img)} failed \\(the image stays incomplete\\): write of \\d+ bytes at offset \\d+( \\(\\d+ done\\))?: EIO \\(i/o error\\)$`));
      // What reached the disk before the shutdown: an image marked incomplete.
      fs.remount();
      expect((await info(img)).complete).toBe(false);
    });
  }

  it('the disk dying at once (NOLOGFLUSH, the journal lost): the same line; nothing complete after a remount', async () => {
    const fs = loopFs();
    const img = join(fs.dir, 'vm.qcow2');
    const r = await saveWithFault(img, [], () => fs.shutdown('nologflush'));
    expect(r.code, r.stderr).toBe(1);
    expect(oneLine(r)).toMatch(new RegExp(`^snap-pipe: save ${escaped(img)} failed \\(the image stays incomplete\\): write of \\d+ bytes at offset \\d+( \\(\\d+ done\\))?: EIO \\(i/o error\\)$`));
    // The image's creation may have been in the lost journal transaction: either no image, or an incomplete one.
    fs.remount();
    if (existsSync(img)) expect((await info(img)).complete).toBe(false);
  });
});

describe('an image on a file system that failed (EIO)', () => {
  let fs: LoopFs;
  let img: string;
  beforeAll(async () => {
    fs = loopFs();
    img = join(fs.dir, 'vm.qcow2');
    const r = await runCli(['save', img], m.bytes);
    expect(r.code, r.stderr).toBe(0);
    fs.shutdown('sync');
  });

  it('load: one line naming the image and EIO, exit 1, only the refusal marker on its pipe (as under QEMU)', () => {
    // stdout a real pipe (`| cat`), as QEMU's exec: gives; the refusal marker goes to pipes only.
    const r = spawnSync('bash', ['-c', '"$@" | od -An -tx1; exit ${PIPESTATUS[0]}', 'sh', process.execPath, BIN, 'load', img], {
      encoding: 'utf8',
      timeout: WAIT_MS_MAX,
    });
    expect(r.error).toBeUndefined();
    expect(r.status).toBe(1);
    expect(oneLine(r)).toMatch(openFailed(img));
    expect(r.stdout.trim()).toBe('00 00 00 00');
  });

  it('load --postcopy, verify and info: the same', async () => {
    for (const args of [['load', img, '--postcopy'], ['verify', img], ['info', img]]) {
      const r = await runCli(args);
      expect(r.code, args.join(' ')).toBe(1);
      expect(oneLine(r), args.join(' ')).toMatch(openFailed(img));
    }
  });
});
