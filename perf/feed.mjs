#!/usr/bin/env node
// A stream source that behaves like QEMU's migration thread, for perf/bench.ts:
//
//   node perf/feed.mjs STREAM RESULT.json 'consumer shell command'
//
// Reads STREAM into memory first (not timed), then starts the consumer with its stdin on a pipe (a FIFO) and writes
// the stream into it from memory in 128 KiB writes: one copy per byte, as QEMU's writev() of guest RAM does, where
// `cat STREAM |` makes two (page cache -> cat -> pipe) and takes a share of a 2-core machine's CPU for itself.
// Writes { seconds, feedCpuSeconds, loadCpuSeconds, exitCode } to RESULT.json: seconds from starting the consumer to
// its exit (its start-up included, as under QEMU), the CPU this process spent writing the stream, and the CPU it
// spent reading STREAM beforehand (for the caller to subtract from a total that includes it).
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, fstatSync, mkdtempSync, openSync, readSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const WRITE_BYTES = 128 * 1024;
const [streamPath, resultPath, consumer] = process.argv.slice(2);
if (!streamPath || !resultPath || !consumer) {
  process.stderr.write('usage: node perf/feed.mjs STREAM RESULT.json \'consumer shell command\'\n');
  process.exit(2);
}

const cpu0 = process.cpuUsage();
const fd = openSync(streamPath, 'r');
const size = fstatSync(fd).size;
// In pieces of 1 GiB: one Buffer holds at most 4 GiB, and the --long bench's streams are 6 and 12 GB.
const PIECE_BYTES = 1 << 30;
const pieces = [];
for (let at = 0; at < size; at += PIECE_BYTES) {
  const piece = Buffer.allocUnsafe(Math.min(PIECE_BYTES, size - at));
  for (let got = 0; got < piece.length; ) {
    const n = readSync(fd, piece, got, piece.length - got, at + got);
    if (n <= 0) throw new Error(`${streamPath}: short read at ${at + got}`);
    got += n;
  }
  // Touch every page so that the copy into the pipe never faults memory in.
  for (let i = 0; i < piece.length; i += 4096) piece[i] |= 0;
  pieces.push(piece);
}
closeSync(fd);
const loadCpu = process.cpuUsage(cpu0);

const dir = mkdtempSync(join(tmpdir(), 'snap-pipe-feed-'));
const fifo = join(dir, 'stream');
if (spawnSync('mkfifo', [fifo]).status !== 0) throw new Error('mkfifo failed');

const t0 = performance.now();
const cpu1 = process.cpuUsage();
const child = spawn('bash', ['-o', 'pipefail', '-c', `exec < ${fifo}; ${consumer}`], { stdio: ['ignore', 'inherit', 'inherit'] });
const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve(code ?? 128 + (signal ? 1 : 0))));
// Blocks until the consumer's shell opens the FIFO; blocking writes from here on.
const out = openSync(fifo, 'w');
let written = 0;
try {
  for (const piece of pieces) {
    // 1 GiB is a multiple of WRITE_BYTES: writes never straddle two pieces.
    for (let at = 0; at < piece.length; ) {
      const n = writeSync(out, piece, at, Math.min(WRITE_BYTES, piece.length - at));
      at += n;
      written += n;
    }
  }
} catch (err) {
  if (err.code !== 'EPIPE') throw err;
}
closeSync(out);
const feedCpu = process.cpuUsage(cpu1);
const exitCode = await exited;
const seconds = (performance.now() - t0) / 1000;
rmSync(dir, { recursive: true, force: true });
const s = (u) => (u.user + u.system) / 1e6;
writeFileSync(resultPath, JSON.stringify({ seconds, feedCpuSeconds: s(feedCpu), loadCpuSeconds: s(loadCpu), exitCode, written }));
process.exit(exitCode === 0 && written === size ? 0 : 1);
