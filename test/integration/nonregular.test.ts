// Paths that are not regular files, through the real CLI (built dist/): a FIFO no one writes to, a directory, a unix
// socket, a character device (/dev/null), a block device (a loop device), and a symlink to a FIFO. Every command
// that opens an image ends at once with exit 1 and one line naming the path and what it is, and leaves the thing as
// it was. A FIFO must never be opened in a way that waits for a writer: before, info, verify and load hung there.
import { spawnSync } from 'node:child_process';
import { lstatSync, mkdirSync, mkdtempSync, readFileSync, readlinkSync, rmSync, statSync, symlinkSync, truncateSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BIN, ROOT } from '../helpers/cli.js';
import { buildStream, sequentialOps, type BlockSpec } from '../helpers/model.js';

/** The whole command, start to exit: far more than a refusal takes (~0.1-0.2 s), far less than a hang. */
const PROMPT_MS_MAX = 5_000;
const BLOCKS: BlockSpec[] = [{ id: 'pc.ram', lengthBytes: 1 << 20 }];

let dir: string;
let server: Server | undefined;
let loopDevice: string | undefined;
const kinds: { name: string; path: string; kind: string }[] = [];

function run(cmd: string, args: string[]): { ok: boolean; out: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 30_000 });
  return { ok: r.status === 0, out: (r.stdout || r.stderr || r.error?.message || '').trim() };
}

beforeAll(async () => {
  if (!statSync(join(ROOT, 'dist', 'main.js'), { throwIfNoEntry: false })) throw new Error('dist/ is missing: run npm run build');
  dir = mkdtempSync(join(tmpdir(), 'snap-pipe-nonregular-'));
  const fifo = join(dir, 'fifo.qcow2');
  const mkfifo = run('mkfifo', [fifo]);
  if (!mkfifo.ok) throw new Error(`mkfifo: ${mkfifo.out}`);
  const directory = join(dir, 'dir.qcow2');
  mkdirSync(directory);
  const socket = join(dir, 'socket.qcow2');
  server = createServer();
  await new Promise<void>((resolve, reject) => server!.once('error', reject).listen(socket, resolve));
  const link = join(dir, 'link-to-fifo.qcow2');
  symlinkSync(fifo, link);
  // A loop device over a small file: needs root, as CI has; without it the test fails with the reason.
  if (process.getuid?.() !== 0) throw new Error('this test attaches a loop device and needs root');
  const backing = join(dir, 'loop-backing');
  writeFileSync(backing, '');
  truncateSync(backing, 4 << 20);
  const losetup = run('losetup', ['--find', '--show', backing]);
  if (!losetup.ok) throw new Error(`losetup --find --show: ${losetup.out}`);
  loopDevice = losetup.out;
  kinds.push(
    { name: 'a FIFO', path: fifo, kind: 'a FIFO (named pipe)' },
    { name: 'a directory', path: directory, kind: 'a directory' },
    { name: 'a unix socket', path: socket, kind: 'a socket' },
    { name: '/dev/null', path: '/dev/null', kind: 'a character device' },
    { name: 'a loop device', path: loopDevice, kind: 'a block device' },
    { name: 'a symlink to a FIFO', path: link, kind: 'a FIFO (named pipe)' },
  );
});

afterAll(async () => {
  if (loopDevice) run('losetup', ['--detach', loopDevice]);
  if (server) await new Promise((resolve) => server!.close(resolve));
  if (dir) rmSync(dir, { recursive: true, force: true });
});

interface Refusal {
  code: number | null;
  stderr: string;
  out: Buffer;
  ms: number;
}

/**
 * `snap-pipe ARGS` under bash, stdout to a regular file or into a pipe (`| cat > out`), stdin from `input` (a file:
 * a refusal need not read it) or an empty pipe.
 */
function runShell(args: string[], stdout: 'file' | 'pipe', input?: string): Refusal {
  const out = join(dir, `out-${process.hrtime.bigint()}`);
  const stdin = input === undefined ? '' : ' < "$IN"';
  const cmd = stdout === 'pipe' ? `"$@"${stdin} | cat > "$OUT"; exit \${PIPESTATUS[0]}` : `"$@"${stdin} > "$OUT"`;
  const t0 = performance.now();
  const r = spawnSync('bash', ['-c', cmd, 'sh', process.execPath, BIN, ...args], {
    encoding: 'utf8',
    env: { ...process.env, OUT: out, IN: input ?? '' },
    timeout: PROMPT_MS_MAX,
  });
  const ms = performance.now() - t0;
  expect(r.error, `snap-pipe ${args.join(' ')} did not end within ${PROMPT_MS_MAX} ms`).toBeUndefined();
  const bytes = readFileSync(out);
  rmSync(out);
  return { code: r.status, stderr: r.stderr, out: bytes, ms };
}

function expectRefused(r: Refusal, what: string, line: string): void {
  expect(r.ms, `${what}: took ${r.ms.toFixed(0)} ms`).toBeLessThan(PROMPT_MS_MAX);
  expect(r.code, `${what}: exit status; stderr: ${r.stderr}`).toBe(1);
  expect(r.stderr.split('\n'), `${what}: exactly one line on stderr`).toEqual([line, '']);
}

/** What the path is, to check it is left as it was. */
function shape(path: string): string {
  const l = lstatSync(path);
  const s = statSync(path);
  return `${l.mode.toString(8)} ${l.isSymbolicLink() ? readlinkSync(path) : ''} ${s.mode.toString(8)} ${s.rdev} ${s.ino}`;
}

describe('an image path that is not a regular file', () => {
  let stream: string;
  beforeAll(() => {
    stream = join(dir, 'stream.bin');
    writeFileSync(stream, buildStream(BLOCKS, sequentialOps(BLOCKS)).bytes);
  });

  for (const name of ['a FIFO', 'a directory', 'a unix socket', '/dev/null', 'a loop device', 'a symlink to a FIFO']) {
    it(`${name}: every command refuses it at once, with one line naming it`, () => {
      const k = kinds.find((x) => x.name === name)!;
      const before = shape(k.path);
      const reads = `snap-pipe: ${k.path} is ${k.kind}, not an image file (snap-pipe reads images from regular files only)`;
      const writes = `snap-pipe: ${k.path} is ${k.kind}, not an image file (snap-pipe writes images to regular files only)`;
      const times: string[] = [];

      for (const args of [['load'], ['load', '--postcopy']]) {
        // To a file: nothing written. Into a pipe (QEMU's exec:): the refusal marker, so QEMU fails instead of waiting.
        const toFile = runShell([...args, k.path], 'file');
        expectRefused(toFile, `${args.join(' ')} > file`, reads);
        expect(toFile.out.length, `${args.join(' ')}: bytes written to a regular file`).toBe(0);
        const toPipe = runShell([...args, k.path], 'pipe');
        expectRefused(toPipe, `${args.join(' ')} | cat`, reads);
        expect([...toPipe.out], `${args.join(' ')}: the refusal marker on a pipe`).toEqual([0, 0, 0, 0]);
        times.push(`${args.join(' ')} ${toFile.ms.toFixed(0)}/${toPipe.ms.toFixed(0)} ms`);
      }
      for (const args of [['verify'], ['verify', '--json'], ['info'], ['info', '--json']]) {
        const r = runShell([args[0], k.path, ...args.slice(1)], 'pipe');
        expectRefused(r, args.join(' '), reads);
        expect(r.out.length, `${args.join(' ')}: stdout`).toBe(0);
        times.push(`${args.join(' ')} ${r.ms.toFixed(0)} ms`);
      }
      for (const args of [['save'], ['save', '--force']]) {
        // A whole stream on stdin: the refusal is the only thing that can go wrong.
        const r = runShell([args[0], k.path, ...args.slice(1)], 'file', stream);
        expectRefused(r, args.join(' '), writes);
        times.push(`${args.join(' ')} ${r.ms.toFixed(0)} ms`);
      }
      expect(shape(k.path), 'left as it was').toBe(before);
      console.log(`${name}: ${times.join(', ')}`);
    });
  }
});
