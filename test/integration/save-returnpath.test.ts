// snap-pipe save answering QEMU's return path, against a scripted source that speaks QEMU's side of it: OPEN_RETURN_PATH
// and PING 1 right after the configuration, then the stream, then (as QEMU does) the pipe kept open while it waits
// for the SHUT. Checked: the PONG comes at once (SWITCHOVER_ACK before it when the machine type is 8.1 or later),
// SHUT(0) comes only once the image is complete on disk, save then exits with stdin still open; a save that fails
// after the stream's last byte answers SHUT(1); a stream whose end never comes (no VM description) fails after
// --end-timeout with SHUT(1) instead of waiting forever.
import { spawn, spawnSync } from 'node:child_process';
import { createWriteStream, existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readInfo } from '../../src/image/info.js';
import { StreamBuilder } from '../../src/format/stream/encoder.js';
import { CMD_OPEN_RETURN_PATH, CMD_PING } from '../../src/format/stream/constants.js';
import { ReturnPathDecoder, type RpMessage } from '../../src/format/stream/returnpath.js';
import { BIN, ROOT } from '../helpers/cli.js';
import { SMALL_PC_BLOCKS, buildStream, sequentialOps } from '../helpers/model.js';

let dir: string;
beforeAll(() => {
  if (!existsSync(join(ROOT, 'dist', 'main.js'))) throw new Error('dist/ is missing: run npm run build');
  dir = mkdtempSync(join(tmpdir(), 'snap-pipe-save-rp-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const BLOCKS = SMALL_PC_BLOCKS;
/** Bound on each run; the ones that wait on --end-timeout take about that long. */
const RUN_MS_MAX = 30_000;

/** The stream as a source with the return-path capability sends it: the two commands right after the configuration. */
function withReturnPath(machineType: string, tail: (b: StreamBuilder) => void): Uint8Array {
  const m = buildStream(BLOCKS, sequentialOps(BLOCKS, 5), { ramEnd: true, machineType });
  const head = new StreamBuilder().header().configuration(machineType).build();
  const b = new StreamBuilder().bytes(head).command(CMD_OPEN_RETURN_PATH).command(CMD_PING, Uint8Array.of(0, 0, 0, 1));
  tail(b);
  const rest = b.build();
  const out = new Uint8Array(rest.length + m.bytes.length - head.length);
  out.set(rest);
  out.set(m.bytes.subarray(head.length), rest.length);
  return out;
}

interface Seen {
  messages: RpMessage[];
  /** The image's state when SHUT arrived. */
  completeAtShut: boolean | undefined;
  code: number | null;
  stderr: string;
  /** stdin was still open when save exited (as under QEMU, which waits for SHUT before closing it). */
  exitedWithStdinOpen: boolean;
}

/**
 * Runs save with the stream on stdin, never closing it before save exits; decodes what save writes to stdout.
 * stdin is a real pipe (a FIFO), as QEMU's exec: gives: Node's own 'pipe' stdio is a socket pair.
 */
function runSave(img: string, stream: Uint8Array, args: string[] = []): Promise<Seen> {
  const fifo = `${img}.fifo`;
  if (spawnSync('mkfifo', [fifo]).status !== 0) throw new Error(`mkfifo ${fifo} failed`);
  return new Promise((resolve, reject) => {
    const child = spawn('bash', ['-c', 'exec "$0" "$@" < "$FIFO"', process.execPath, BIN, 'save', img, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, FIFO: fifo },
    });
    // Opened for writing once bash has opened it for reading (both opens wait for each other).
    const stdin = createWriteStream(fifo);
    const decoder = new ReturnPathDecoder();
    const seen: Seen = { messages: [], completeAtShut: undefined, code: null, stderr: '', exitedWithStdinOpen: false };
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`save did not exit within ${RUN_MS_MAX} ms: ${seen.stderr}`));
    }, RUN_MS_MAX);
    child.stdout.on('data', (d: Buffer) => {
      decoder.push(d);
      for (let m = decoder.next(); m; m = decoder.next()) {
        seen.messages.push(m);
        if (m.type === 'shut') seen.completeAtShut = readInfo(img).complete;
      }
    });
    child.stderr.on('data', (d) => (seen.stderr += d));
    stdin.on('error', () => undefined);
    child.on('close', (code) => {
      clearTimeout(timer);
      seen.code = code;
      seen.exitedWithStdinOpen = !stdin.writableEnded && !stdin.destroyed;
      stdin.destroy();
      rmSync(fifo, { force: true });
      resolve(seen);
    });
    stdin.write(stream); // and no end(): QEMU keeps its side open until it has the SHUT
  });
}

describe('snap-pipe save with QEMU\'s return path open', () => {
  it('answers PING 1 with a PONG, SHUT(0) only once the image is complete, and exits with stdin still open', async () => {
    const img = join(dir, 'ok.qcow2');
    const seen = await runSave(img, withReturnPath('pc-i440fx-7.2', () => undefined));
    expect(seen.code, seen.stderr).toBe(0);
    expect(seen.stderr).toBe('');
    expect(seen.messages).toEqual([{ type: 'pong', value: 1 }, { type: 'shut', status: 0 }]);
    expect(seen.completeAtShut).toBe(true);
    expect(seen.exitedWithStdinOpen).toBe(true);
  });

  it('a machine type of 8.1 or later: SWITCHOVER_ACK first, as a destination with switchover-ack sends it', async () => {
    const img = join(dir, 'ack.qcow2');
    const seen = await runSave(img, withReturnPath('pc-q35-8.1', () => undefined));
    expect(seen.code, seen.stderr).toBe(0);
    expect(seen.messages).toEqual([{ type: 'switchover-ack' }, { type: 'pong', value: 1 }, { type: 'shut', status: 0 }]);
  });

  it('--switchover-ack: SWITCHOVER_ACK for an older machine type too (a newer QEMU running it with switchover-ack on)', async () => {
    const img = join(dir, 'forced-ack.qcow2');
    const seen = await runSave(img, withReturnPath('pc-i440fx-7.2', () => undefined), ['--switchover-ack']);
    expect(seen.code, seen.stderr).toBe(0);
    expect(seen.messages).toEqual([{ type: 'switchover-ack' }, { type: 'pong', value: 1 }, { type: 'shut', status: 0 }]);
  });

  it('a save that fails after the stream\'s last byte answers SHUT(1): QEMU fails the migration', async () => {
    const img = join(dir, 'late.qcow2');
    // The device state cut short by 3 bytes, then valid-looking bytes: the VM description never ends (no JSON), so
    // save waits out --end-timeout, then fails.
    const good = withReturnPath('pc-i440fx-7.2', () => undefined);
    const seen = await runSave(img, good.subarray(0, good.length - 3), ['--end-timeout', '1']);
    expect(seen.code).toBe(1);
    expect(seen.messages).toEqual([{ type: 'pong', value: 1 }, { type: 'shut', status: 1 }]);
    expect(seen.stderr.trim().split('\n')).toHaveLength(1);
    expect(seen.stderr).toMatch(/^snap-pipe: save \S+late\.qcow2 failed \(the image stays incomplete\): no end of the stream 1 s after its last byte: with QEMU's return path open/);
    expect(seen.exitedWithStdinOpen).toBe(true);
    const info = readInfo(img);
    expect(info.complete).toBe(false);
    expect(info.failure).toMatch(/^no end of the stream 1 s after its last byte/);
  });

  it('a stream refused after the return path opened: SHUT(1) and one line', async () => {
    const img = join(dir, 'refused.qcow2');
    const bad = new StreamBuilder()
      .header()
      .configuration('pc-i440fx-7.2')
      .command(CMD_OPEN_RETURN_PATH)
      .command(CMD_PING, Uint8Array.of(0, 0, 0, 1))
      .ramSetup(2, BLOCKS)
      .ramPart(2)
      .be64(4096 + 0x40)
      .str8('pc.ram')
      .build();
    const seen = await runSave(img, bad);
    expect(seen.code).toBe(1);
    expect(seen.messages.at(-1)).toEqual({ type: 'shut', status: 1 });
    expect(seen.stderr).toMatch(/xbzrle flag/);
  });

  it('a PING before OPEN_RETURN_PATH, or a second OPEN_RETURN_PATH, is a damaged stream', async () => {
    for (const [name, cmds] of [
      ['ping-first', [[CMD_PING, Uint8Array.of(0, 0, 0, 1)]]],
      ['open-twice', [[CMD_OPEN_RETURN_PATH, new Uint8Array(0)], [CMD_OPEN_RETURN_PATH, new Uint8Array(0)]]],
    ] as const) {
      const b = new StreamBuilder().header().configuration('pc-i440fx-7.2');
      for (const [cmd, payload] of cmds) b.command(cmd, payload);
      const seen = await runSave(join(dir, `${name}.qcow2`), b.ramSetup(2, BLOCKS).build());
      expect(seen.code, name).toBe(1);
      expect(seen.stderr.trim(), name).toMatch(name === 'ping-first' ? /a PING command before the return path was opened at byte 26$/ : /a second OPEN_RETURN_PATH command at byte 31$/);
    }
  });
});
