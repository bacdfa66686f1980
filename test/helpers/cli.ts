// Runs the real bin/snap-pipe (built dist/, real worker threads) as QEMU would: the stream on a stdin pipe.
import { spawn, spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { expect } from 'vitest';
import type { ImageInfo } from '../../src/image/info.js';
import { rng, type ModelStream } from './model.js';

export const ROOT = join(import.meta.dirname, '..', '..');
export const BIN = join(ROOT, 'bin', 'snap-pipe');

export interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** A snap-pipe that has not exited by then is killed and the call fails (no process outlives a hung test). */
const RUN_TIMEOUT_MS = 90_000;

/**
 * Feeds `input` to `snap-pipe ARGS` in random-sized pieces (or not at all when undefined: stdin closed at once).
 * `env` adds variables to the child's environment.
 */
export function runCli(args: string[], input?: Uint8Array, seed = 1, env?: Record<string, string>): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [BIN, ...args], { stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, ...env } });
    let stdout = '';
    let stderr = '';
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`snap-pipe ${args.join(' ')} did not exit within ${RUN_TIMEOUT_MS} ms; killed. stderr: ${stderr}`));
    }, RUN_TIMEOUT_MS);
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
    child.stdin.on('error', () => undefined); // snap-pipe may exit before reading everything (error tests)
    if (!input) {
      child.stdin.end();
      return;
    }
    const r = rng(seed);
    let at = 0;
    const pump = () => {
      while (at < input.length) {
        const n = Math.min(input.length - at, 1 + Math.floor(r() * 200000));
        const ok = child.stdin.write(input.subarray(at, at + n));
        at += n;
        if (!ok) {
          child.stdin.once('drain', pump);
          return;
        }
      }
      child.stdin.end();
    };
    pump();
  });
}

/** What `snap-pipe load --no-direct IMG` writes to a pipe: the image as a stream, bytes unchanged (runCli keeps text). */
export function loadStream(img: string): Buffer {
  const r = spawnSync(process.execPath, [BIN, 'load', '--no-direct', img], { maxBuffer: 1 << 30, timeout: RUN_TIMEOUT_MS });
  if (r.status !== 0) throw new Error(`load ${img} exited ${r.status ?? r.signal}: ${r.stderr}`);
  return r.stdout;
}

/** `s` quoted for sh. */
function shQuote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

export interface TerminalRun {
  /** snap-pipe's exit code. */
  code: number;
  /** What it printed on the terminal (stderr, and stdout unless redirected), line by line. */
  lines: string[];
}

/**
 * Runs `snap-pipe ARGS` with a real terminal on stdin and stderr: a pty from util-linux `script`. stdout goes to
 * `stdoutPath` (a file) when given, else to the terminal as well. Fails, rather than passing for the wrong reason,
 * when stdin is not a terminal inside `script`.
 */
export function runOnTerminal(args: string[], stdoutPath?: string): TerminalRun {
  const cmd =
    'test -t 0 || { echo "stdin is not a terminal"; exit 99; }; ' +
    `${[process.execPath, BIN, ...args].map(shQuote).join(' ')}${stdoutPath ? ` > ${shQuote(stdoutPath)}` : ''}; ` +
    'echo "exit=$?"';
  const r = spawnSync('script', ['-qec', cmd, '/dev/null'], { encoding: 'utf8', timeout: 30_000 });
  if (r.error) throw new Error(`script (util-linux) failed: ${r.error.message}`);
  // A terminal ends lines with CR LF.
  const lines = r.stdout.split(/\r?\n/).filter((l) => l !== '');
  const exit = lines.pop() ?? '';
  const m = /^exit=(\d+)$/.exec(exit);
  if (!m) throw new Error(`snap-pipe ${args.join(' ')} on a terminal: no exit status (status ${r.status}): ${JSON.stringify(r.stdout)}`);
  return { code: Number(m[1]), lines };
}

export function qemuImg(args: string[]): { code: number | null; out: string } {
  const r = spawnSync('qemu-img', args, { encoding: 'utf8' });
  if (r.error) throw new Error(`qemu-img is missing (apt-get install qemu-utils): ${r.error.message}`);
  return { code: r.status, out: r.stdout + r.stderr };
}

export type InfoJson = ImageInfo;

export async function info(img: string): Promise<InfoJson> {
  const r = await runCli(['info', img, '--json']);
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as InfoJson;
}

/** The image, read by QEMU's own tools, holds exactly the RAM the stream meant, and qemu-img check is clean. */
export async function expectImageMatches(img: string, m: ModelStream, rawPath: string): Promise<InfoJson> {
  const check = qemuImg(['check', img]);
  expect(check.code, check.out).toBe(0);
  expect(check.out).toMatch(/No errors were found/);
  const conv = qemuImg(['convert', '-O', 'raw', img, rawPath]);
  expect(conv.code, conv.out).toBe(0);
  const raw = readFileSync(rawPath);
  const inf = await info(img);
  expect(inf.complete).toBe(true);
  // Every cluster's recorded CRC-32C matches its bytes (snap-pipe verify reads them all).
  const verified = await runCli(['verify', img]);
  expect(verified.code, verified.stderr).toBe(0);
  expect(inf.blocks!.map((b) => [b.id, b.lengthBytes])).toEqual(m.blocks.map((b) => [b.id, b.lengthBytes]));
  inf.blocks!.forEach((b, i) => {
    const got = raw.subarray(b.virtOffsetBytes, b.virtOffsetBytes + b.lengthBytes);
    if (Buffer.compare(got, m.ram[i]) !== 0) {
      let at = 0;
      while (got[at] === m.ram[i][at]) at++;
      throw new Error(`block ${b.id}: first difference at offset ${at} (page ${Math.floor(at / 4096)})`);
    }
    const sent = m.sent[i].filter(Boolean).length;
    const data = m.data[i].filter(Boolean).length;
    expect(b.dataPages, `${b.id} data pages`).toBe(data);
    expect(b.zeroPages, `${b.id} zero pages`).toBe(sent - data);
    expect(b.unsentPages, `${b.id} unsent pages`).toBe(m.sent[i].length - sent);
  });
  expect(inf.deviceStateBytes).toBe(m.deviceState.length);
  return inf;
}
