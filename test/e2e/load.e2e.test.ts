// `snap-pipe load` behind a real QEMU: a guest saved with `migrate exec:snap-pipe save IMG` is brought back in a
// fresh QEMU (-incoming defer) with `migrate_incoming exec:snap-pipe load IMG`: its memory byte for byte equal to a
// pmemsave dump taken before the save, and it goes on running after `cont`. Also a background snapshot of a running
// guest, restored and running.
// Fails (never skips) when QEMU, the guest files (scripts/guest.sh) or the build (dist/main.js) are missing.
import { closeSync, copyFileSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, statSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, test } from 'vitest';
import { ImageReader } from '../../src/image/reader.js';
import { Guest, delayMs, guestFiles, snapPipeBin } from '../../tools/qemu/guest.js';
import { hasBackgroundSnapshot, qemuAtLeast, testedQemus, type Qemu } from '../../tools/qemu/versions.js';
import { info, runCli } from '../helpers/cli.js';
import { firstDifference, LEGACY_WINDOW, saveUri, loadUri } from '../helpers/e2e.js';

const MiB = 1024 * 1024;
const pageBytes = 4096;
const memMiB = 512;
const fillMiB = 150;




/** Saves `g` to `img` with `migrate exec:snap-pipe save`; returns the milliseconds it took. */
async function saveGuest(g: Guest, img: string): Promise<number> {
  const t0 = Date.now();
  await g.migrate(saveUri(img));
  const m = await g.waitMigration(180_000);
  if (m.status !== 'completed') throw g.failure(`migration to snap-pipe save ${m.status}: ${m['error-desc'] ?? '?'}`);
  return Date.now() - t0;
}

/**
 * Starts a fresh QEMU (same machine, memory and kernel; -S -incoming defer) and loads `img` into it with
 * `migrate_incoming exec:snap-pipe load IMG`; returns the guest (paused) and the milliseconds until query-migrate
 * said completed.
 */
async function restore(qemu: Qemu, name: string, img: string, args: string[] = [], mem = memMiB, fill = fillMiB): Promise<{ guest: Guest; ms: number }> {
  const g = await Guest.start({ qemu, name, memMiB: mem, fillMiB: fill, incoming: true });
  try {
    expect(await g.queryStatus()).toMatchObject({ running: false });
    const t0 = Date.now();
    await g.migrateIncoming(loadUri(img, args));
    const m = await g.waitMigration(180_000);
    const ms = Date.now() - t0;
    if (m.status !== 'completed') throw g.failure(`incoming migration from snap-pipe load ${m.status}: ${m['error-desc'] ?? '?'}`);
    // -S: loaded, not running until cont.
    expect(await g.queryStatus()).toMatchObject({ running: false });
    expect(g.stderrText()).not.toMatch(/snap-pipe:/); // snap-pipe's stderr lands in QEMU's log
    return { guest: g, ms };
  } catch (err) {
    await g.quit();
    throw err;
  }
}

describe.each(testedQemus())('snap-pipe load behind a real QEMU incoming migration: $label', (qemu) => {
  let dir: string;
  let source: Guest | null = null;
  let dest: Guest | null = null;

  beforeAll(() => {
    guestFiles();
    snapPipeBin();
    dir = mkdtempSync(join(tmpdir(), 'snap-pipe-load-e2e-'));
  });

  afterEach(async () => {
    await source?.quit();
    await dest?.quit();
    source = dest = null;
  });

  afterAll(async () => {
    await source?.quit();
    await dest?.quit();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  test('a stopped 512 MiB guest comes back byte for byte, and runs on after cont', async () => {
    const img = join(dir, 'stopped.qcow2');
    const before = join(dir, 'before.pmem');
    const after = join(dir, 'after.pmem');

    source = await Guest.start({ qemu, name: 'load-src', memMiB, fillMiB });
    await source.waitReady(180_000);
    await source.stop();
    await source.pmemsave(0, memMiB * MiB, before, 120_000);
    expect(statSync(before).size).toBe(memMiB * MiB);
    await source.unthrottle();
    const saveMs = await saveGuest(source, img);
    console.log(`${qemu.label} save (stopped, ${memMiB} MiB): ${saveMs} ms`);
    // From QEMU 10 the image carries SWITCHOVER_START, which load replays before the device state.
    expect((await info(img)).switchoverStarts).toBe(qemuAtLeast(qemu, 10, 0) ? 1 : 0);
    await source.quit();
    source = null;

    const statsPath = join(dir, 'load-stats.json');
    const r = await restore(qemu, 'load-dst', img, [`--stats=${statsPath}`]);
    dest = r.guest;
    const st = JSON.parse(readFileSync(statsPath, 'utf8')) as Record<string, number>;
    console.log(
      `${qemu.label} load (stopped, ${memMiB} MiB, image ${(statSync(img).size / MiB).toFixed(0)} MiB): migrate_incoming ${r.ms} ms ` +
        `(${((memMiB / r.ms) * 1000).toFixed(0)} MiB/s of guest RAM); snap-pipe: ${(st.bytesOut / MiB).toFixed(0)} MiB of stream ` +
        `in ${(st.seconds * 1000).toFixed(0)} ms (${st.outMBps.toFixed(0)} MB/s), reading ${st.readMs.toFixed(0)} ms, ` +
        `verifying ${st.verifyMs.toFixed(0)} ms, writing to QEMU ${st.writeMs.toFixed(0)} ms`,
    );

    await dest.pmemsave(0, memMiB * MiB, after, 120_000);
    const diff = await firstDifference(before, after, memMiB * MiB, [LEGACY_WINDOW]);
    expect(
      diff,
      diff < 0 ? '' : `restored RAM differs from the saved guest at 0x${diff.toString(16)} (page 0x${(diff - (diff % pageBytes)).toString(16)})`,
    ).toBe(-1);

    expect(dest.consoleText()).not.toMatch(/SNAPPIPE-READY/); // it did not boot: it was restored
    const from = dest.consoleBytes();
    await dest.cont();
    expect(await dest.queryStatus()).toMatchObject({ status: 'running', running: true });
    const tick = await dest.waitTick(30_000, from);
    expect(tick).toMatch(/SNAPPIPE-TICK \d+/);
    await dest.waitTick(30_000); // and another after that one
  }, 600_000);

  // background-snapshot came in QEMU 6.0: older QEMUs have no such test.
  if (hasBackgroundSnapshot(qemu)) {
    test('a background snapshot of a running guest: verify passes, and restored, the guest reads back the content it had', async () => {
      const img = join(dir, 'background.qcow2');

      source = await Guest.start({ qemu, name: 'load-bg-src', memMiB, fillMiB });
      await source.waitReady(180_000);
      // The guest's own account of what it wrote: its random fill and /init never change after READY.
      const before = await source.contentHash();
      await source.unthrottle();
      await source.setCapabilities({ 'background-snapshot': true });
      await source.waitTick(30_000);
      const saveMs = await saveGuest(source, img);
      console.log(`${qemu.label} save (background, ${memMiB} MiB): ${saveMs} ms`);
      await source.quit();
      source = null;
      const verified = await runCli(['verify', img]);
      expect(verified.code, verified.stderr).toBe(0);

      const r = await restore(qemu, 'load-bg-dst', img);
      dest = r.guest;
      console.log(`${qemu.label} load (background snapshot, ${memMiB} MiB): migrate_incoming ${r.ms} ms`);
      const from = dest.consoleBytes();
      await dest.cont();
      expect(await dest.queryStatus()).toMatchObject({ status: 'running', running: true });
      await dest.waitTick(30_000, from);
      // Judged by content, with zero tolerance: every byte of the fill and /init as the running guest had them.
      expect(await dest.contentHash()).toEqual(before);
      await dest.waitTick(30_000);
    }, 600_000);
  }

  test('a damaged cluster: snap-pipe stops before the device state, QEMU fails the incoming migration, nothing runs', async () => {
    const mem = 256;
    const fill = 32;
    const img = join(dir, 'small.qcow2');
    const bad = join(dir, 'damaged.qcow2');
    source = await Guest.start({ qemu, name: 'load-bad-src', memMiB: mem, fillMiB: fill });
    await source.waitReady(180_000);
    await source.stop();
    await source.unthrottle();
    await saveGuest(source, img);
    await source.quit();
    source = null;

    // Flip one byte in the first pc.ram cluster that holds data.
    copyFileSync(img, bad);
    const reader = ImageReader.open(bad);
    const meta = reader.meta!;
    const b = meta.blocks.findIndex((x) => x.id === 'pc.ram');
    const data = meta.pages[b].data;
    let chunk = 0;
    while (!data.subarray(chunk * 32, chunk * 32 + 32).some((x) => x !== 0)) chunk++;
    const host = reader.hostOffsetOf(meta.blocks[b].virtOffsetBytes / MiB + chunk)!;
    reader.close();
    const fd = openSync(bad, 'r+');
    const one = Buffer.alloc(1);
    readSync(fd, one, 0, 1, host + 12345);
    one[0] ^= 0x01;
    writeSync(fd, one, 0, 1, host + 12345);
    closeSync(fd);

    dest = await Guest.start({ qemu, name: 'load-bad-dst', memMiB: mem, fillMiB: fill, incoming: true });
    await dest.migrateIncoming(loadUri(bad));
    // QEMU exits when an incoming migration fails (7.2: migration.c process_incoming_migration_co; 9.1+: unless
    // migrate-incoming's exit-on-error is false).
    const deadline = Date.now() + 60_000;
    while (dest.alive && Date.now() < deadline) await delayMs(100);
    if (dest.alive) throw dest.failure('QEMU still running 60 s after loading a damaged image');
    const log = dest.stderrText();
    expect(log).toMatch(new RegExp(`snap-pipe: .*damaged\\.qcow2: block pc\\.ram offset 0x${(chunk * MiB).toString(16)} \\(1 MiB chunk ${chunk}\\): checksum mismatch`));
    expect(log).toMatch(/load of migration failed/);
    expect(dest.consoleText()).not.toMatch(/SNAPPIPE-TICK/);
    console.log(`damaged image: QEMU ${dest.exitStatus}: ${log.trim().split('\n').slice(-2).join(' | ')}`);
  }, 600_000);
});
