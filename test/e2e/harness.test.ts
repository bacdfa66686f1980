// The real-QEMU harness itself: boot to READY, QMP, stop/cont, a migration to `exec:cat > FILE`, recordStream.
// Fails (never skips) when QEMU or the guest files (scripts/guest.sh) are missing.
import { mkdtempSync, openSync, readSync, closeSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { Guest, guestFiles, shellQuote } from '../../tools/qemu/guest.js';
import { hasBackgroundSnapshot, testedQemus } from '../../tools/qemu/versions.js';
import { recordStream } from '../../tools/qemu/record.js';

/** Each test fails (never skips) on a machine without the guest files (testedQemus() throws without a QEMU). */
function requirePrerequisites(): void {
  guestFiles();
}

function head(path: string, bytes: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const buf = Buffer.alloc(bytes);
    const n = readSync(fd, buf, 0, bytes, 0);
    return buf.subarray(0, n);
  } finally {
    closeSync(fd);
  }
}

describe.each(testedQemus())('QEMU harness: $label', (qemu) => {
  let dir: string;
  let guest: Guest | null = null;

  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'snap-pipe-harness-'));
  });

  afterAll(async () => {
    await guest?.quit();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  test('boots to READY, answers QMP, stops and continues, migrates to exec:cat', async () => {
    requirePrerequisites();
    const t0 = Date.now();
    guest = await Guest.start({ qemu, name: 'harness', memMiB: 256, fillMiB: 32 });
    expect(guest.qemu).toBe(qemu);
    const ready = await guest.waitReady(120_000);
    expect(ready).toMatch(/SNAPPIPE-READY fill=32MiB/);
    console.log(`harness (${qemu.label}): boot to READY in ${Date.now() - t0} ms`);

    expect(await guest.queryStatus()).toMatchObject({ status: 'running', running: true });
    await guest.waitTick(30_000);

    await guest.stop();
    expect(await guest.queryStatus()).toMatchObject({ status: 'paused', running: false });
    await guest.cont();
    expect(await guest.queryStatus()).toMatchObject({ status: 'running', running: true });
    await guest.waitTick(30_000); // a tick printed after cont: the guest goes on

    await expect(guest.execute('no-such-command')).rejects.toThrow(/no-such-command/);

    await guest.unthrottle();
    await guest.stop();
    const out = join(dir, 'stream with space.bin');
    const t1 = Date.now();
    await guest.migrate(`exec:cat > ${shellQuote(out)}`);
    const status = await guest.waitMigration(60_000);
    console.log(`harness: migration of 256 MiB to cat in ${Date.now() - t1} ms`);
    expect(status.status).toBe('completed');
    expect(status.ram?.total).toBeGreaterThanOrEqual(256 * 1024 * 1024);
    expect(guest.alive).toBe(true);

    const h = head(out, 8);
    expect(h.subarray(0, 4).toString('latin1')).toBe('QEVM');
    expect(h.readUInt32BE(4)).toBe(3);
    expect(statSync(out).size).toBeGreaterThan(32 * 1024 * 1024); // at least the random fill

    // A migration whose exec: child gives up early fails; the source goes on running.
    await guest.cont();
    await guest.migrate('exec:head -c 4096 > /dev/null');
    const failed = await guest.waitMigration(60_000);
    expect(failed.status).toBe('failed');
    expect(failed['error-desc']).toBeTruthy();
    expect(await guest.queryStatus()).toMatchObject({ status: 'running', running: true });
    await guest.waitTick(30_000);

    await guest.quit();
    expect(guest.alive).toBe(false);
    guest = null;
  }, 180_000);

  // background-snapshot came in QEMU 6.0: older QEMUs have no such test.
  if (hasBackgroundSnapshot(qemu)) {
    test('recordStream: a background snapshot of a running guest', async () => {
      requirePrerequisites();
      const out = join(dir, 'background.bin');
      const r = await recordStream({ qemu, memMiB: 256, fillMiB: 32, mode: 'background', outPath: out, name: 'harness-record' });
      expect(r.migration.status).toBe('completed');
      expect(r.streamBytes).toBe(statSync(out).size);
      const h = head(out, 8);
      expect(h.subarray(0, 4).toString('latin1')).toBe('QEVM');
      expect(h.readUInt32BE(4)).toBe(3);
      console.log(`harness: record (background, 256 MiB) boot ${r.bootMs} ms, migrate ${r.migrateMs} ms, ${r.streamBytes} bytes`);
    }, 180_000);
  }

  test('a guest that cannot start fails with QEMU\'s message', async () => {
    requirePrerequisites();
    await expect(
      Guest.start({ qemu, name: 'harness-bad', memMiB: 256, fillMiB: 0, extraArgs: ['-no-such-option'] }),
    ).rejects.toThrow(/QEMU exited at start.*no-such-option/s);
  }, 60_000);
});
