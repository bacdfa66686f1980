// Names an image carries (the machine type, RAM block names) come from whoever wrote the stream. Through the real CLI
// (built dist/): info, verify and load print them with every control character escaped (ESC, a newline, the C1
// CSI 0x9b), in their reports and in their error lines, which stay one line; --json escapes DEL and C1 too (JSON
// itself escapes only C0), parses, and gives the names back exactly.
import { closeSync, copyFileSync, mkdtempSync, openSync, readSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ImageInfo } from '../../src/image/info.js';
import { ImageReader } from '../../src/image/reader.js';
import type { VerifyReport } from '../../src/verify/verify.js';
import { printable } from '../../src/format/text.js';
import { runCli } from '../helpers/cli.js';
import { buildStream, sequentialOps, type BlockSpec } from '../helpers/model.js';

const MiB = 1 << 20;
/** As QEMU would send them: single bytes (the stream's names are bytes; snap-pipe reads them as latin1). */
const MACHINE = 'pc-i440fx-7.2\x1b[31m\nred\x9b2J\x7f';
const BLOCK = '/rom@etc/\x1b[31mred\nline\x9bq';
const BLOCKS: BlockSpec[] = [
  { id: 'pc.ram', lengthBytes: MiB },
  { id: BLOCK, lengthBytes: MiB },
];
/** Any raw control character but the newline that ends a line: C0, DEL, C1. */
const RAW_CONTROL = /[\u0000-\u0009\u000b-\u001f\u007f-\u009f]/;

let dir: string;
let img: string;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'snap-pipe-untrusted-'));
  // The encoder writes names as latin1, one byte per character, as QEMU's bytes read back.
  const stream = buildStream(BLOCKS, sequentialOps(BLOCKS, 5), { machineType: MACHINE, ramEnd: true });
  img = join(dir, 'names.qcow2');
  const saved = await runCli(['save', img], stream.bytes);
  expect(saved.code, saved.stderr).toBe(0);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function expectNoRawControl(text: string, what: string): void {
  const m = RAW_CONTROL.exec(text);
  expect(m, `${what}: raw control character ${m ? JSON.stringify(m[0]) : ''} in ${JSON.stringify(text.slice(0, 2000))}`).toBeNull();
}

/** A copy of the image with one byte of the block's first data cluster flipped. */
function damagedCopy(): string {
  const copy = join(dir, 'damaged.qcow2');
  copyFileSync(img, copy);
  const reader = ImageReader.open(copy);
  const block = reader.meta!.blocks.findIndex((b) => b.id === BLOCK);
  const host = reader.hostOffsetOf(reader.meta!.blocks[block].virtOffsetBytes / MiB)!;
  reader.close();
  const fd = openSync(copy, 'r+');
  const b = Buffer.alloc(1);
  readSync(fd, b, 0, 1, host + 4096 + 7);
  b[0] ^= 0x40;
  writeSync(fd, b, 0, 1, host + 4096 + 7);
  closeSync(fd);
  return copy;
}

describe('names from the stream, printed', () => {
  it('the image holds the names as QEMU sent them', () => {
    const reader = ImageReader.open(img);
    expect(reader.meta!.machineType).toBe(MACHINE);
    expect(reader.meta!.blocks.map((b) => b.id)).toEqual(['pc.ram', BLOCK]);
    reader.close();
  });

  it('info: escaped, one line each', async () => {
    const r = await runCli(['info', img]);
    expect(r.code, r.stderr).toBe(0);
    expectNoRawControl(r.stdout, 'info');
    const lines = r.stdout.split('\n');
    expect(lines).toContain('machine type:   pc-i440fx-7.2\\x1b[31m\\x0ared\\x9b2J\\x7f');
    expect(lines.filter((l) => l.startsWith('  /rom@etc/\\x1b[31mred\\x0aline\\x9bq ')), 'the block on one line').toHaveLength(1);
  });

  it('info --json and verify --json: JSON without raw DEL or C1, giving the names back exactly', async () => {
    const info = await runCli(['info', img, '--json']);
    expect(info.code, info.stderr).toBe(0);
    expectNoRawControl(info.stdout, 'info --json');
    expect(info.stdout).toContain('\\u001b[31m\\nred\\u009b2J\\u007f');
    const parsed = JSON.parse(info.stdout) as ImageInfo;
    expect(parsed.machineType).toBe(MACHINE);
    expect(parsed.blocks!.map((b) => b.id)).toEqual(['pc.ram', BLOCK]);

    const verify = await runCli(['verify', damagedCopy(), '--json']);
    expect(verify.code).toBe(1);
    expectNoRawControl(verify.stdout, 'verify --json');
    const report = JSON.parse(verify.stdout) as VerifyReport;
    expect(report.mismatches.map((m) => m.block)).toEqual([BLOCK]);
  });

  it('verify and load of a damaged cluster in that block: escaped in the report and in the one error line', async () => {
    const damaged = damagedCopy();
    const verify = await runCli(['verify', damaged]);
    expect(verify.code).toBe(1);
    expectNoRawControl(verify.stdout, 'verify report');
    expect(verify.stdout).toContain(`  bad: block ${printable(BLOCK)} offset 0x0 (chunk 0)`);
    expectNoRawControl(verify.stderr, 'verify stderr');
    expect(verify.stderr.split('\n')).toHaveLength(2);
    expect(verify.stderr).toContain(`(first: block ${printable(BLOCK)} offset 0x0,`);

    const load = await runCli(['load', damaged]);
    expect(load.code).toBe(1);
    expectNoRawControl(load.stderr, 'load stderr');
    expect(load.stderr.split('\n')).toHaveLength(2);
    expect(load.stderr).toContain(`: block ${printable(BLOCK)} offset 0x0 (1 MiB chunk 0): checksum mismatch`);
  });

  it('verify of the sound image: escaped', async () => {
    const r = await runCli(['verify', img]);
    expect(r.code, r.stderr).toBe(0);
    expectNoRawControl(r.stdout + r.stderr, 'verify');
  });
});
