// The stream parser and save on streams recorded from each real QEMU during this run (`exec:cat > FILE`), so the
// format is checked against what QEMU 7.2 and 10.0 really send, not only against our own encoder.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { recordStream } from '../../tools/qemu/record.js';
import { hasBackgroundSnapshot, qemuAtLeast, testedQemus } from '../../tools/qemu/versions.js';
import { info, qemuImg, runCli } from '../helpers/cli.js';
import { parseAll } from '../helpers/parse.js';

const MEM_MIB = 256;
const LEGACY_START = 0xa0000;
const LEGACY_END = 0x100000;
let dir: string;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'snap-pipe-recorded-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Compares pc.ram with a pmemsave dump, outside the legacy VGA/ROM window that pmemsave reads through. */
function expectRamEqualsDump(ram: Uint8Array, dump: Uint8Array): void {
  expect(ram.length).toBe(dump.length);
  for (const [a, b] of [[0, LEGACY_START], [LEGACY_END, dump.length]]) {
    if (Buffer.compare(ram.subarray(a, b), dump.subarray(a, b)) !== 0) {
      let at = a;
      while (ram[at] === dump[at]) at++;
      throw new Error(`pc.ram differs from the pmemsave dump at offset 0x${at.toString(16)}`);
    }
  }
}

describe.each(testedQemus())('streams recorded from $label', (qemu) => {
  // One folder per QEMU: the same file names under each.
  const at = (name: string) => join(dir, `${qemu.major}.${qemu.minor}-${name}`);
  it('a stopped VM (plain precopy): parsed in random pieces, pc.ram equals pmemsave; save stores the same', async () => {
    const stream = at('stopped.bin');
    const dumpPath = at('stopped.dump');
    const rec = await recordStream({ qemu, memMiB: MEM_MIB, fillMiB: 64, mode: 'stopped', outPath: stream, pmemsavePath: dumpPath });
    const bytes = new Uint8Array(readFileSync(stream));
    const dump = new Uint8Array(readFileSync(dumpPath));

    const c = parseAll(bytes, 3, 1 << 20, 40000);
    expect(c.parsed.machineType).toMatch(/^pc-i440fx-/);
    expect(c.parsed.sawRamEnd).toBe(true);
    expect(c.parsed.vmdescPresent).toBe(true);
    expect(c.parsed.streamBytes).toBe(bytes.length);
    // QEMU 10 announces the switch-over (savevm.c qemu_savevm_maybe_send_switchover_start); 7.2 has no such command.
    expect(c.parsed.switchoverCommands.length).toBe(qemuAtLeast(qemu, 10, 0) ? 5 : 0);
    const ramIdx = c.parsed.blocks.findIndex((b) => b.id === 'pc.ram');
    expect(c.parsed.blocks[ramIdx].lengthBytes).toBe(MEM_MIB << 20);
    expectRamEqualsDump(c.ram[ramIdx], dump);
    // QEMU's own counters: pages sent as data ("normal") and as zero ("duplicate").
    const sentData = c.data.flat().filter(Boolean).length;
    const sentAll = c.sent.flat().filter(Boolean).length;
    expect(sentData).toBe(rec.migration.ram?.normal);
    expect(sentAll - sentData).toBe(rec.migration.ram?.duplicate);

    const img = at('stopped.qcow2');
    const r = await runCli(['save', img], bytes, 9);
    expect(r.code, r.stderr).toBe(0);
    expect(qemuImg(['check', img]).code).toBe(0);
    const inf = await info(img);
    const ramBlock = inf.blocks!.find((b) => b.id === 'pc.ram')!;
    const raw = at('stopped.raw');
    const conv = qemuImg(['convert', '-O', 'raw', '--image-opts', `driver=raw,offset=${ramBlock.virtOffsetBytes},size=${ramBlock.lengthBytes},file.driver=qcow2,file.file.filename=${img}`, raw]);
    expect(conv.code, conv.out).toBe(0);
    expectRamEqualsDump(new Uint8Array(readFileSync(raw)), dump);
  }, 300_000);

  // background-snapshot came in QEMU 6.0: older QEMUs have no such test.
  if (hasBackgroundSnapshot(qemu)) {
    it('a background snapshot of a running VM: no ram END, every page of every block exactly once; save stores it, verify passes', async () => {
      const stream = at('bg.bin');
      const rec = await recordStream({ qemu, memMiB: MEM_MIB, fillMiB: 64, mode: 'background', outPath: stream });
      const bytes = new Uint8Array(readFileSync(stream));
      const c = parseAll(bytes, 4, 1 << 20, 40000);
      expect(c.parsed.sawRamEnd).toBe(false);
      expect(c.parsed.vmdescPresent).toBe(true);
      expect(c.parsed.switchoverCommands.length).toBe(0);
      c.parsed.blocks.forEach((b, i) => {
        const notOnce = c.records[i].findIndex((n) => n !== 1);
        expect(notOnce, `${b.id}: page ${notOnce} came ${c.records[i][notOnce]} times`).toBe(-1);
      });

      const img = at('bg.qcow2');
      const r = await runCli(['save', img], bytes, 9);
      expect(r.code, r.stderr).toBe(0);
      expect(qemuImg(['check', img]).code).toBe(0);
      const inf = await info(img);
      expect(inf.complete).toBe(true);
      expect(inf.resentPages).toBe(0);
      expect(inf.dataPages! + inf.zeroPages!).toBe(inf.blocks!.reduce((n, b) => n + b.pages, 0));
      expect(inf.dataPages).toBe(rec.migration.ram?.normal);
      const v = await runCli(['verify', img]);
      expect(v.code, v.stderr).toBe(0);
    }, 300_000);
  }
});
