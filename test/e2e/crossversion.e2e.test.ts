// Snapshots outlive QEMU upgrades: a guest saved under QEMU 5.2 (Debian 11) or 7.2 (Debian 12) is restored by QEMU
// 10.0 (Debian 13) started with the machine type it was saved with (-machine pc-i440fx-5.2 / 7.2), by precopy and by
// postcopy, byte for byte equal to a pmemsave dump taken before the save, and runs on. The other way, a QEMU 7.2
// destination fails on an image from QEMU 10's own machine type with QEMU's own reason (the machine types differ),
// and runs nothing.
// Fails (never skips) when either QEMU, the guest files or the build are missing.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, test } from 'vitest';
import { Guest, delayMs, guestFiles, snapPipeBin } from '../../tools/qemu/guest.js';
import { cachedQemu, i440fxMachine, systemQemu, testedQemus, type Qemu } from '../../tools/qemu/versions.js';
import { info } from '../helpers/cli.js';
import { firstDifference, LEGACY_WINDOW, loadUri, saveUri } from '../helpers/e2e.js';

const MiB = 1024 * 1024;
const memMiB = 384;
const fillMiB = 120;

/** Every guest this file starts; each test quits its own at the end. */
const guests: Guest[] = [];

async function start(opts: Parameters<typeof Guest.start>[0]): Promise<Guest> {
  const g = await Guest.start(opts);
  guests.push(g);
  return g;
}

afterEach(async () => {
  for (const g of guests.splice(0)) await g.quit();
});
// And any left by a beforeAll that failed before a test ran.
afterAll(async () => {
  for (const g of guests.splice(0)) await g.quit();
});

/** Every tested QEMU older than 10.0, each restored by 10.0. */
const older = testedQemus().filter((q) => q.major < 10);

describe.each(older)('across QEMU versions: saved under $label, restored by QEMU 10.0', (old: Qemu) => {
  let dir: string;
  let current: Qemu;
  let img: string;
  let before: string;
  beforeAll(async () => {
    guestFiles();
    snapPipeBin();
    current = cachedQemu('10.0');
    dir = mkdtempSync(join(tmpdir(), 'snap-pipe-crossversion-'));
    img = join(dir, 'old.qcow2');
    before = join(dir, 'before.pmem');
    const src = await start({ qemu: old, name: 'xv-src', memMiB, fillMiB, machine: i440fxMachine(old) });
    await src.waitReady();
    await src.stop();
    await src.pmemsave(0, memMiB * MiB, before);
    await src.unthrottle();
    await src.migrate(saveUri(img));
    const m = await src.waitMigration(180_000);
    if (m.status !== 'completed') throw src.failure(`save ${m.status}: ${m['error-desc'] ?? '?'}`);
    expect((await info(img)).machineType).toBe(i440fxMachine(old));
  }, 300_000);

  afterAll(() => {
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  for (const mode of ['precopy', 'postcopy'] as const) {
    test(`restored with -machine of the old version (${mode}): byte for byte, and it runs`, async () => {
      const dst = await start({ qemu: current, name: `xv-${mode}`, memMiB, fillMiB, incoming: true, machine: i440fxMachine(old) });
      if (mode === 'postcopy') await dst.setCapabilities({ 'postcopy-ram': true });
      await dst.migrateIncoming(loadUri(img, mode === 'postcopy' ? ['--postcopy'] : []));
      const m = await dst.waitMigration(180_000);
      if (m.status !== 'completed') throw dst.failure(`${mode} load ${m.status}: ${m['error-desc'] ?? '?'}`);
      expect(dst.stderrText()).not.toMatch(/snap-pipe:/);
      const after = join(dir, `after-${mode}.pmem`);
      await dst.pmemsave(0, memMiB * MiB, after);
      const diff = await firstDifference(before, after, memMiB * MiB, [LEGACY_WINDOW]);
      expect(diff, diff < 0 ? '' : `restored RAM differs at 0x${diff.toString(16)}`).toBe(-1);
      rmSync(after);
      const from = dst.consoleBytes();
      await dst.cont();
      await dst.waitTick(30_000, from);
      console.log(`${old.label} -> ${current.label} (${mode}, -machine ${i440fxMachine(old)}): identical memory, running`);
    }, 300_000);
  }

});

describe('across QEMU versions: back to an older QEMU', () => {
  let dir: string;
  beforeAll(() => {
    guestFiles();
    snapPipeBin();
    dir = mkdtempSync(join(tmpdir(), 'snap-pipe-crossversion-down-'));
  });

  afterAll(() => {
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  test('an image of QEMU 10\'s own machine type into QEMU 7.2: QEMU refuses it, naming both machine types', async () => {
    const src = await start({ qemu: cachedQemu('10.0'), name: 'xv-new', memMiB: 256, fillMiB: 16, machine: 'pc-i440fx-10.0' });
    await src.waitReady();
    await src.stop();
    await src.unthrottle();
    const newer = join(dir, 'new.qcow2');
    await src.migrate(saveUri(newer));
    const m = await src.waitMigration(120_000);
    if (m.status !== 'completed') throw src.failure(`save ${m.status}: ${m['error-desc'] ?? '?'}`);
    expect((await info(newer)).machineType).toBe('pc-i440fx-10.0');

    const dst = await start({ qemu: systemQemu(), name: 'xv-down', memMiB: 256, fillMiB: 16, incoming: true });
    await dst.migrateIncoming(loadUri(newer));
    // QEMU 7.2 exits when an incoming migration fails (migration.c process_incoming_migration_co).
    for (const deadline = Date.now() + 60_000; dst.alive && Date.now() < deadline; ) await delayMs(100);
    if (dst.alive) throw dst.failure('QEMU 7.2 still running 60 s after an image of a newer machine type');
    const log = dst.stderrText();
    expect(log).toMatch(/Machine type received is 'pc-i440fx-10\.0' and local is 'pc-i440fx-7\.2'/);
    expect(dst.consoleText()).not.toMatch(/SNAPPIPE-TICK/);
    console.log(`QEMU 10.0 image into ${systemQemu().label}: ${log.trim().split('\n').filter((l) => /Machine type|load of migration/.test(l)).join(' | ')}`);
  }, 300_000);
});
