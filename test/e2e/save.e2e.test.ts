// `snap-pipe save` behind a real QEMU migration (`migrate exec:<repo>/bin/snap-pipe save IMG`), checked with
// independent tools: qemu-img check / info, qemu-img convert of the pc.ram region compared byte for byte with a
// pmemsave dump, and snap-pipe info's counters against what QEMU says it sent.
// Fails (never skips) when QEMU, the guest files (scripts/guest.sh) or the build (dist/main.js) are missing.
import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, test } from 'vitest';
import { Guest, guestFiles, snapPipeBin, type MigrationStatus } from '../../tools/qemu/guest.js';
import { hasBackgroundSnapshot, qemuAtLeast, testedQemus, type Qemu } from '../../tools/qemu/versions.js';
import { expectPcRamMatches, run, saveUri, snapPipeInfo, type Info } from '../helpers/e2e.js';

const MiB = 1024 * 1024;
const pageBytes = 4096;
const memMiB = 512;
const fillMiB = 200;


/** qemu-img check (of the QEMU under test) must exit 0 (no corruptions, no leaks). */
function qemuImgCheck(qemu: Qemu, img: string): string {
  return run(qemu.img, ['check', img], 120_000, qemu.env).stdout;
}



/** Each test fails (never skips) on a machine without QEMU, the guest files or the build. */
function requirePrerequisites(): void {
  guestFiles();
  snapPipeBin();
}


/** Checks that hold for every complete image of a `pc` guest. */
function expectCompleteImage(info: Info, img: string, migration: MigrationStatus): void {
  expect(info.complete).toBe(true);
  expect(info.clusterBytes).toBe(MiB);
  expect(info.machineType).toMatch(/^pc-i440fx-/);
  expect(info.fileBytes).toBe(statSync(img).size);
  expect(info.deviceStateBytes).toBeGreaterThan(0);

  const ram = info.blocks.find((b) => b.id === 'pc.ram');
  expect(ram, `blocks: ${info.blocks.map((b) => b.id).join(', ')}`).toBeDefined();
  expect(ram!.lengthBytes).toBe(memMiB * MiB);
  for (const id of ['pc.bios', 'pc.rom']) expect(info.blocks.map((b) => b.id)).toContain(id);

  // The block list is what QEMU migrated: same total size.
  const totalBytes = info.blocks.reduce((sum, b) => sum + b.lengthBytes, 0);
  expect(totalBytes).toBe(migration.ram?.total);

  for (const b of info.blocks) {
    expect(b.virtOffsetBytes % MiB, `${b.id} virtOffsetBytes`).toBe(0);
    expect(b.virtOffsetBytes + b.lengthBytes, `${b.id} end`).toBeLessThanOrEqual(info.virtualBytes);
    expect(b.pages, `${b.id} pages`).toBe(Math.ceil(b.lengthBytes / pageBytes));
  }
  // Blocks do not overlap in the virtual disk.
  const sorted = [...info.blocks].sort((x, y) => x.virtOffsetBytes - y.virtOffsetBytes);
  for (let i = 1; i < sorted.length; i++) {
    expect(sorted[i].virtOffsetBytes, `${sorted[i].id} after ${sorted[i - 1].id}`).toBeGreaterThanOrEqual(
      sorted[i - 1].virtOffsetBytes + sorted[i - 1].lengthBytes,
    );
  }
  // The guest's random fill is data, never zero pages.
  expect(ram!.dataPages).toBeGreaterThanOrEqual((fillMiB * MiB) / pageBytes);
}

describe.each(testedQemus())('snap-pipe save behind a real QEMU migration: $label', (qemu) => {
  let dir: string;
  let guest: Guest | null = null;

  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'snap-pipe-save-e2e-'));
  });

  afterEach(async () => {
    await guest?.quit();
    guest = null;
  });

  afterAll(async () => {
    await guest?.quit();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  test('a stopped 512 MiB guest: the image holds pc.ram byte for byte', async () => {
    requirePrerequisites();
    const img = join(dir, 'stopped.qcow2');
    const dump = join(dir, 'stopped.pmem');
    const raw = join(dir, 'stopped.pc-ram.raw');

    guest = await Guest.start({ qemu, name: 'save-stopped', memMiB, fillMiB });
    await guest.waitReady(180_000);
    await guest.stop();
    await guest.pmemsave(0, memMiB * MiB, dump, 120_000);
    expect(statSync(dump).size).toBe(memMiB * MiB);
    await guest.unthrottle();

    const t0 = Date.now();
    await guest.migrate(saveUri(img));
    const migration = await guest.waitMigration(180_000);
    const ms = Date.now() - t0;
    if (migration.status !== 'completed') {
      throw guest.failure(`migration to snap-pipe save ${migration.status}: ${migration['error-desc'] ?? '?'}`);
    }
    console.log(`${qemu.label} save (stopped, ${memMiB} MiB): ${ms} ms, ${((memMiB / ms) * 1000).toFixed(0)} MiB/s of guest RAM`);
    // QEMU survived and is done with the stream.
    expect(guest.alive).toBe(true);
    expect((await guest.queryStatus()).status).toBe('postmigrate');
    expect((await guest.queryMigrate()).status).toBe('completed');

    qemuImgCheck(qemu, img);
    const qinfo = JSON.parse(run(qemu.img, ['info', '--output=json', img], 60_000, qemu.env).stdout) as {
      format: string;
      'cluster-size': number;
      'virtual-size': number;
    };
    expect(qinfo.format).toBe('qcow2');
    expect(qinfo['cluster-size']).toBe(MiB);

    const info = snapPipeInfo(img);
    expectCompleteImage(info, img, migration);
    expect(qinfo['virtual-size']).toBe(info.virtualBytes);
    expect(info.sawRamEnd).toBe(true); // plain precopy ends RAM with a ram END section
    // QEMU 10 (machine types from 10.0 on) announces the switch-over with SWITCHOVER_START; the image keeps it.
    expect(info.switchoverStarts).toBe(qemuAtLeast(qemu, 10, 0) ? 1 : 0);
    for (const b of info.blocks) expect(b.unsentPages, `${b.id} unsentPages`).toBe(0);

    await expectPcRamMatches(qemu, img, info, dump, raw);
  }, 420_000);

  test('a plain migration of a running guest: pages re-sent over data, the last version stored, every checksum sound', async () => {
    requirePrerequisites();
    const img = join(dir, 'precopy.qcow2');
    const stats = join(dir, 'precopy.json');
    const dump = join(dir, 'precopy.pmem');
    const raw = join(dir, 'precopy.pc-ram.raw');

    guest = await Guest.start({ qemu, name: 'save-precopy', memMiB, fillMiB });
    await guest.waitReady(180_000);
    // Slow enough that the guest's ticks (256 KiB of tmpfs rewritten each) dirty pages sent earlier: QEMU sends
    // them again in its next pass, over what the image already holds.
    await guest.setMigrationParams({ 'max-bandwidth': 128 * MiB });
    await guest.waitTick(30_000);

    await guest.migrate(saveUri(img, [`--stats=${stats}`]));
    const migration = await guest.waitMigration(240_000);
    if (migration.status !== 'completed') {
      throw guest.failure(`plain migration to snap-pipe save ${migration.status}: ${migration['error-desc'] ?? '?'}`);
    }
    // Stopped at the switch-over: its memory now is what the stream's last versions say.
    expect((await guest.queryStatus()).status).toBe('postmigrate');
    await guest.pmemsave(0, memMiB * MiB, dump, 120_000);

    qemuImgCheck(qemu, img);
    const info = snapPipeInfo(img);
    expectCompleteImage(info, img, migration);
    expect(info.sawRamEnd).toBe(true);
    expect(info.switchoverStarts).toBe(qemuAtLeast(qemu, 10, 0) ? 1 : 0);
    expect(info.resentPages).toBeGreaterThan(0);
    const report = JSON.parse(readFileSync(stats, 'utf8')) as { oldContentReads: number; rewrittenClusters: number };
    console.log(`${qemu.label} save (plain migration of a running guest): ${info.resentPages} pages re-sent, ${report.rewrittenClusters} clusters rewritten, ${report.oldContentReads} old-content reads`);
    expect(report.oldContentReads).toBeGreaterThan(0);
    // Every cluster's recorded CRC-32C matches its bytes, the rewritten ones included.
    run(process.execPath, [snapPipeBin(), 'verify', img], 120_000);

    await expectPcRamMatches(qemu, img, info, dump, raw);
  }, 420_000);

  // background-snapshot came in QEMU 6.0: older QEMUs have no such test.
  if (hasBackgroundSnapshot(qemu)) {
    test('a background snapshot of a running guest: every page of every block stored exactly once', async () => {
      requirePrerequisites();
      const img = join(dir, 'background.qcow2');

      guest = await Guest.start({ qemu, name: 'save-background', memMiB, fillMiB });
      await guest.waitReady(180_000);
      await guest.unthrottle();
      await guest.setCapabilities({ 'background-snapshot': true });
      await guest.waitTick(30_000); // running and writing memory

      const t0 = Date.now();
      await guest.migrate(saveUri(img));
      const migration = await guest.waitMigration(180_000);
      const ms = Date.now() - t0;
      if (migration.status !== 'completed') {
        throw guest.failure(`background snapshot to snap-pipe save ${migration.status}: ${migration['error-desc'] ?? '?'}`);
      }
      console.log(`${qemu.label} save (background, ${memMiB} MiB): ${ms} ms, ${((memMiB / ms) * 1000).toFixed(0)} MiB/s of guest RAM`);
      // The guest went on running through the snapshot and after it.
      expect(guest.alive).toBe(true);
      expect(await guest.queryStatus()).toMatchObject({ status: 'running', running: true });
      expect((await guest.queryMigrate()).status).toBe('completed');
      await guest.waitTick(30_000);

      qemuImgCheck(qemu, img);
      const info = snapPipeInfo(img);
      expectCompleteImage(info, img, migration);
      for (const b of info.blocks) {
        expect(b.unsentPages, `${b.id} unsentPages`).toBe(0);
        expect(b.dataPages + b.zeroPages, `${b.id} dataPages + zeroPages`).toBe(b.pages);
      }
      const pages = info.blocks.reduce((sum, b) => sum + b.pages, 0);
      expect(info.dataPages + info.zeroPages).toBe(pages);
      expect(info.resentPages).toBe(0);
      expect(info.sawRamEnd).toBe(false); // a background snapshot sends no ram END section
      expect(info.switchoverStarts).toBe(0); // nor a SWITCHOVER_START (migration.c bg_migration_thread)
      expect(pages).toBe(migration.ram!.normal + migration.ram!.duplicate);
    // Every cluster's recorded CRC-32C matches its bytes (its content is compared with the guest's own in load's
    // background test, which restores such an image).
    run(process.execPath, [snapPipeBin(), 'verify', img], 120_000);
    }, 420_000);
  }
});
