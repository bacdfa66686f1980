// Faults through the real CLI (built dist/, real worker threads, real files): every stream snap-pipe refuses leaves
// an image that info shows as incomplete and load refuses; a file system without O_DIRECT, a source killed
// mid-stream, SIGTERM/SIGINT, and a worker that throws, crashes or exits each end the command with one line, at
// once, leaving nothing but an incomplete image. And load's refusal marker: under a pipe (QEMU's exec:), a refused
// load writes 4 bytes that are not a migration stream, so QEMU fails instead of waiting; to a file, nothing.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { StreamBuilder } from '../../src/format/stream/encoder.js';
import { BIN, info, ROOT, runCli } from '../helpers/cli.js';
import { buildStream, pageContent, sequentialOps, type BlockSpec } from '../helpers/model.js';

const MiB = 1 << 20;
/** A command that fails must do so promptly: no stage may keep it waiting. */
const PROMPT_MS_MAX = 10_000;
let dir: string;
beforeAll(() => {
  if (!existsSync(join(ROOT, 'dist', 'main.js'))) throw new Error('dist/ is missing: run npm run build');
  dir = mkdtempSync(join(tmpdir(), 'snap-pipe-faults-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const BLOCKS: BlockSpec[] = [
  { id: 'pc.ram', lengthBytes: 24 << 20 },
  { id: 'pc.bios', lengthBytes: 256 << 10 },
];

/** What a failed save's line says after naming the image: the cause it also recorded in the image. */
function causeOf(img: string, saveLine: string): string {
  const prefix = `snap-pipe: save ${img} failed (the image stays incomplete): `;
  expect(saveLine.startsWith(prefix), saveLine).toBe(true);
  return saveLine.slice(prefix.length);
}

function oneLine(stderr: string): string {
  const lines = stderr.trim().split('\n');
  expect(lines, stderr).toHaveLength(1);
  expect(lines[0]).toMatch(/^snap-pipe: /);
  return lines[0];
}

/** `snap-pipe ARGS` under bash, its stdout to a pipe (`| cat > out`) or a regular file (`> out`); returns what came out. */
function runShell(args: string[], stdout: 'pipe' | 'file'): { code: number | null; stderr: string; out: Buffer } {
  const out = join(dir, `out-${process.hrtime.bigint()}`);
  const cmd = stdout === 'pipe' ? '"$@" | cat > "$OUT"; exit ${PIPESTATUS[0]}' : '"$@" > "$OUT"';
  const r = spawnSync('bash', ['-c', cmd, 'sh', process.execPath, BIN, ...args], {
    encoding: 'utf8',
    env: { ...process.env, OUT: out },
    timeout: PROMPT_MS_MAX,
  });
  expect(r.error).toBeUndefined();
  const bytes = readFileSync(out);
  rmSync(out);
  return { code: r.status, stderr: r.stderr, out: bytes };
}

/**
 * The image is there, marked incomplete, and load refuses it writing nothing to a file and the marker to a pipe.
 * `saveLine`: the failed save's line: the cause after it is what the image records, and what info and load show.
 * Without it (the save was stopped by a signal) the image records nothing and says it never finished.
 */
async function expectIncompleteAndRefused(img: string, saveLine?: string): Promise<void> {
  const inf = await info(img);
  expect(inf.complete).toBe(false);
  const cause = saveLine === undefined ? undefined : causeOf(img, saveLine);
  expect(inf.failure).toBe(cause);
  const toFile = runShell(['load', img], 'file');
  expect(toFile.code).toBe(1);
  const why =
    cause === undefined
      ? 'the save that wrote this image never finished (it was stopped, or is still running)'
      : `the save that wrote this image failed: ${cause}`;
  expect(oneLine(toFile.stderr)).toBe(`snap-pipe: ${img}: ${why}`);
  expect(toFile.out.length, 'bytes written to a regular file').toBe(0);
  const toPipe = runShell(['load', img], 'pipe');
  expect(toPipe.code).toBe(1);
  expect([...toPipe.out], 'the refusal marker on a pipe').toEqual([0, 0, 0, 0]);
}

// ---------------------------------------------------------------------------------------------------------------

describe('every stream save refuses leaves an incomplete image that load refuses', () => {
  const good = buildStream(BLOCKS, sequentialOps(BLOCKS, 5), { ramEnd: true }).bytes;
  const base = () => new StreamBuilder().header().configuration('pc-i440fx-7.2').ramSetup(2, BLOCKS).ramPart(2);
  const withFlags = (flags: number) => base().be64(4096 + flags).str8('pc.ram').bytes(pageContent(1)).build();
  const cases: { name: string; bytes: () => Uint8Array; error: RegExp }[] = [
    { name: 'wrong magic', bytes: () => Object.assign(good.slice(), { 1: 0x46 }), error: /not a QEMU migration stream .* at byte 0$/ },
    { name: 'wrong version', bytes: () => Object.assign(good.slice(), { 7: 2 }), error: /migration stream version 2 .* at byte 4$/ },
    { name: 'truncated in the header', bytes: () => good.subarray(0, 6), error: /stream ended at byte 6 while reading file version/ },
    { name: 'truncated in a page', bytes: () => good.subarray(0, 3 * MiB + 1234), error: new RegExp(`stream ended at byte ${3 * MiB + 1234} while reading page data`) },
    { name: 'truncated in the device state', bytes: () => good.subarray(0, good.length - 40), error: /device state .* was cut short/ },
    { name: 'unknown section type', bytes: () => base().ramEos(2).u8(0x42).build(), error: /unknown section type 0x42 at byte \d+$/ },
    { name: 'unknown RAM flags', bytes: () => withFlags(0x400), error: /RAM record with unknown flags 0x400 at byte \d+$/ },
    { name: 'xbzrle', bytes: () => withFlags(0x40), error: /xbzrle flag .*: disable xbzrle at byte \d+$/ },
    { name: 'compression', bytes: () => withFlags(0x100), error: /compress flag .* at byte \d+$/ },
    { name: 'multifd', bytes: () => withFlags(0x200), error: /multifd flag .* at byte \d+$/ },
    {
      name: 'a PING on a return path never opened',
      bytes: () => new StreamBuilder().header().configuration('pc').command(2, Uint8Array.of(0, 0, 0, 1)).ramSetup(2, BLOCKS).build(),
      error: /a PING command before the return path was opened at byte \d+$/,
    },
    {
      name: 'postcopy on the source (POSTCOPY_ADVISE)',
      bytes: () => new StreamBuilder().header().configuration('pc').ramSetup(2, BLOCKS).command(3, new Uint8Array(16)).build(),
      error: /a migration command \(3\) from the postcopy-ram capability.* at byte \d+$/,
    },
    {
      name: 'a non-RAM iterable section (block migration)',
      bytes: () => new StreamBuilder().header().configuration('pc').ramSetup(2, BLOCKS).sectionStart(1, 3, 'block', 0, 1).build(),
      error: /iterable section 'block' .* at byte \d+$/,
    },
    { name: 'a page for a block the setup never named', bytes: () => base().page('nope', 0, pageContent(1)).build(), error: /'nope', which the setup never named at byte \d+$/ },
    { name: 'a page beyond its block', bytes: () => base().page('pc.bios', 256 << 10, pageContent(1)).build(), error: /beyond RAM block 'pc\.bios' .* at byte \d+$/ },
    {
      name: 'a RAM setup whose sizes do not add up',
      bytes: () => new StreamBuilder().header().configuration('pc').sectionStart(1, 2, 'ram', 0, 4).be64(8192 + 4).str8('a').be64(16384).build(),
      error: /add up to more than the announced total of 8192 bytes at byte \d+$/,
    },
  ];
  for (const c of cases) {
    it(c.name, async () => {
      const img = join(dir, `refused-${c.name.replace(/[^a-z0-9]+/gi, '-')}.qcow2`);
      const r = await runCli(['save', img], c.bytes());
      expect(r.code, r.stderr).toBe(1);
      expect(r.stdout).toBe('');
      const line = oneLine(r.stderr);
      expect(line).toMatch(c.error);
      await expectIncompleteAndRefused(img, line);
      rmSync(img);
    });
  }
});

// ---------------------------------------------------------------------------------------------------------------

describe('save under faults', () => {
  const m = buildStream(BLOCKS, sequentialOps(BLOCKS, 1e9));

  it('a file system without O_DIRECT (ramfs): one line saying to use --no-direct, and --no-direct works', async () => {
    if (process.getuid?.() !== 0) throw new Error('this test mounts a ramfs and needs root');
    const mnt = mkdtempSync(join(tmpdir(), 'snap-pipe-ramfs-'));
    const mount = spawnSync('mount', ['-t', 'ramfs', 'ramfs', mnt], { encoding: 'utf8' });
    expect(mount.status, mount.stderr).toBe(0);
    try {
      const img = join(mnt, 'vm.qcow2');
      const r = await runCli(['save', img], m.bytes);
      expect(r.code).toBe(1);
      expect(oneLine(r.stderr)).toMatch(/vm\.qcow2: the file system refuses O_DIRECT; use --no-direct$/);
      expect(readdirSync(mnt).filter((f) => f !== 'vm.qcow2'), 'nothing else left beside the image').toEqual([]);
      if (existsSync(img)) expect((await info(img)).complete).toBe(false);

      const ok = await runCli(['save', img, '--no-direct'], m.bytes);
      expect(ok.code, ok.stderr).toBe(0);
      for (const cmd of ['load', 'verify']) {
        const refused = runShell([cmd, img], 'file');
        expect(refused.code, cmd).toBe(1);
        expect(oneLine(refused.stderr)).toMatch(/refuses O_DIRECT.*use --no-direct/);
      }
      expect(runShell(['verify', img, '--no-direct'], 'file').code).toBe(0);
    } finally {
      spawnSync('umount', [mnt]);
      rmSync(mnt, { recursive: true, force: true });
    }
  });

  it('the source killed mid-stream (SIGKILL, EOF on stdin): one line naming the byte, incomplete image', async () => {
    const streamPath = join(dir, 'stream.bin');
    writeFileSync(streamPath, m.bytes);
    const img = join(dir, 'killed.qcow2');
    const sentBytes = 9 * MiB + 777;
    // The producer writes part of the stream (synchronous writes to a pipe), says so, then waits to be killed.
    const producer = `const fs = require('fs'); const b = fs.readFileSync(process.argv[1]).subarray(0, Number(process.argv[2]));
      fs.writeSync(1, b); process.stderr.write('producer ' + process.pid + ' sent\\n'); setInterval(() => {}, 1e6);`;
    const child = spawn('bash', ['-c', `"$1" -e "$2" "$3" "$4" | exec "$1" "$5" save "$6"`, 'sh', process.execPath, producer, streamPath, String(sentBytes), BIN, img], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stderr = '';
    const pid = await new Promise<number>((resolve, reject) => {
      child.stderr!.on('data', (d) => {
        stderr += d;
        const found = /producer (\d+) sent/.exec(stderr);
        if (found) resolve(Number(found[1]));
      });
      child.on('exit', () => reject(new Error(`ended before the producer sent: ${stderr}`)));
    });
    const t0 = Date.now();
    process.kill(pid, 'SIGKILL');
    const code = await exitOf(child);
    expect(Date.now() - t0).toBeLessThan(PROMPT_MS_MAX);
    expect(code).toBe(1);
    const line = oneLine(stderr.replace(/producer \d+ sent\n/, ''));
    expect(line).toMatch(new RegExp(`stream ended at byte ${sentBytes} while reading page data`));
    await expectIncompleteAndRefused(img, line);
  });

  for (const sig of ['SIGTERM', 'SIGINT'] as const) {
    it(`${sig} mid-stream, the source stalled: stops at once, one line, exit ${sig === 'SIGINT' ? 130 : 143}, only an incomplete image left`, async () => {
      const sub = mkdtempSync(join(dir, `${sig}-`));
      const img = join(sub, 'vm.qcow2');
      // A real pipe (a FIFO), as QEMU's exec: gives: the test writes part of the stream, then stalls with it open,
      // so snap-pipe's reader is blocked in read(0) on an empty pipe when the signal comes.
      const fifo = join(dir, `${sig}.fifo`);
      expect(spawnSync('mkfifo', [fifo]).status).toBe(0);
      const child = spawn('bash', ['-c', 'exec "$0" "$@" < "$FIFO"', process.execPath, BIN, 'save', img], {
        stdio: ['ignore', 'pipe', 'pipe'],
        env: { ...process.env, FIFO: fifo },
      });
      let stderr = '';
      child.stderr!.on('data', (d) => (stderr += d));
      const exited = exitOf(child);
      const w = await open(fifo, 'w');
      try {
        // Once written, the pipe holds at most its 64 KiB buffer: the reader has taken the rest.
        await w.write(m.bytes.subarray(0, 8 * MiB));
        const t0 = Date.now();
        child.kill(sig);
        const code = await exited;
        expect(Date.now() - t0, 'exit delay').toBeLessThan(PROMPT_MS_MAX);
        expect(code).toBe(sig === 'SIGINT' ? 130 : 143);
      } finally {
        await w.close();
      }
      expect(stderr.trim().split('\n')).toEqual([`snap-pipe save: ${sig}: stopped; ${img} is left marked incomplete`]);
      expect(readdirSync(sub), 'no temporary files beside the image').toEqual(['vm.qcow2']);
      await expectIncompleteAndRefused(img);
    });
  }

  it('a worker failing while the source stalls: the save still ends at once (the blocked reader is woken)', async () => {
    const img = join(dir, 'stalled-fail.qcow2');
    const fifo = join(dir, 'stalled-fail.fifo');
    expect(spawnSync('mkfifo', [fifo]).status).toBe(0);
    const child = spawn('bash', ['-c', 'exec "$0" "$@" < "$FIFO"', process.execPath, BIN, 'save', img], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, FIFO: fifo, SNAP_PIPE_TEST_STAGE_DIR: join(ROOT, 'test', 'fixtures', 'stages', 'coalescer-throws') },
    });
    let stderr = '';
    child.stderr!.on('data', (d) => (stderr += d));
    const exited = exitOf(child);
    const w = await open(fifo, 'w');
    try {
      const t0 = Date.now();
      await w.write(m.bytes.subarray(0, 2 * MiB)).catch(() => undefined); // EPIPE if the save is already gone
      const code = await exited; // the coalescer throws at once; the reader then waits on the stalled pipe
      expect(Date.now() - t0, 'exit delay').toBeLessThan(PROMPT_MS_MAX);
      expect(code).toBe(1);
    } finally {
      await w.close();
    }
    const line = oneLine(stderr);
    expect(line).toMatch(/fixture coalescer: thrown on purpose/);
    await expectIncompleteAndRefused(img, line);
  });
});

// ---------------------------------------------------------------------------------------------------------------

describe('a worker that fails ends the save with its error, at once (fixture stages)', () => {
  const m = buildStream(BLOCKS, sequentialOps(BLOCKS, 1e9));
  const cases = [
    { mode: 'coalescer-throws', error: /^snap-pipe: save \S+ failed \(the image stays incomplete\): fixture coalescer: thrown on purpose$/, recorded: true },
    { mode: 'reader-crashes', error: /^snap-pipe: save \S+ failed \(the image stays incomplete\): snap-pipe reader worker crashed: fixture reader: uncaught on purpose$/, recorded: true },
    // A writer that exited cannot write the cause into the image, which then just never finished; the fixture
    // writers have no fail() at all, so the asserting one records nothing either.
    { mode: 'writer-exits', error: /^snap-pipe: save \S+ failed \(the image stays incomplete\): snap-pipe writer worker exited \(code 7\)$/, recorded: false },
    { mode: 'writer-asserts', error: /^snap-pipe: save \S+ failed \(the image stays incomplete\): fixture writer: assertion failed on purpose$/, recorded: false },
  ];
  for (const c of cases) {
    it(c.mode, async () => {
      const img = join(dir, `${c.mode}.qcow2`);
      const t0 = Date.now();
      const r = await runCliEnv(['save', img], m.bytes, { SNAP_PIPE_TEST_STAGE_DIR: join(ROOT, 'test', 'fixtures', 'stages', c.mode) });
      expect(Date.now() - t0).toBeLessThan(PROMPT_MS_MAX);
      expect(r.code, r.stderr).toBe(1);
      const line = oneLine(r.stderr);
      expect(line).toMatch(c.error);
      await expectIncompleteAndRefused(img, c.recorded ? line : undefined);
    });
  }
});

// ---------------------------------------------------------------------------------------------------------------

describe('load refusals: the marker goes to a pipe only', () => {
  it('not an image, a missing file, a bad command line: 4 zero bytes on a pipe, nothing to a file', () => {
    const junk = join(dir, 'junk.bin');
    writeFileSync(junk, Buffer.alloc(MiB, 0x41));
    for (const [args, code, error] of [
      [['load', junk], 1, /junk\.bin: not a QCOW2 image/],
      [['load', join(dir, 'missing.qcow2')], 1, /ENOENT/],
      [['load'], 2, /load: missing IMG/],
    ] as const) {
      const p = runShell([...args], 'pipe');
      expect(p.code, p.stderr).toBe(code);
      expect(oneLine(p.stderr)).toMatch(error);
      expect([...p.out]).toEqual([0, 0, 0, 0]);
      const f = runShell([...args], 'file');
      expect(f.code).toBe(code);
      expect(f.out.length).toBe(0);
    }
    expect(statSync(junk).size).toBe(MiB);
  });
});

// ---------------------------------------------------------------------------------------------------------------

function exitOf(child: ChildProcess): Promise<number | null> {
  return new Promise((resolve) => {
    if (child.exitCode !== null) resolve(child.exitCode);
    else child.once('exit', (code) => resolve(code));
  });
}

/** runCli with extra environment variables. */
function runCliEnv(args: string[], input: Uint8Array, env: Record<string, string>): Promise<{ code: number | null; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [BIN, ...args], { stdio: ['pipe', 'ignore', 'pipe'], env: { ...process.env, ...env } });
    let stderr = '';
    child.stderr!.on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stderr }));
    child.stdin!.on('error', () => undefined); // the save may stop before reading everything
    child.stdin!.end(input);
  });
}
