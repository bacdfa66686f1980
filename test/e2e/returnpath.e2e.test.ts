// What QEMU reports when a save fails after QEMU's last byte, with and without its return path, under each QEMU.
// QEMU never reads an exec: child's exit status (io/channel-command.c qio_channel_command_close); with the
// return-path capability it waits for the child's SHUT before it calls the migration completed.
//  - return-path on, a good save: QEMU completes only on snap-pipe's SHUT(0), sent once the image is on disk.
//  - return-path on, a save failing after QEMU's last byte (a filter between QEMU and snap-pipe holds back the
//    stream's last 3 bytes, so its end never comes): snap-pipe gives up after --end-timeout and answers SHUT(1), and
//    QEMU reports the migration failed.
//  - the same failure without return-path: QEMU reports it completed (it cannot know better), and the trace is what
//    is left: the line on QEMU's stderr names the image and the cause, and the image stays incomplete and says why.
// Fails (never skips) when a QEMU, the guest files or the build are missing.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, test } from 'vitest';
import { Guest, guestFiles, shellQuote, snapPipeBin } from '../../tools/qemu/guest.js';
import { qemuAtLeast, testedQemus } from '../../tools/qemu/versions.js';
import { info, runCli } from '../helpers/cli.js';
import { saveUri } from '../helpers/e2e.js';

const memMiB = 256;
const fillMiB = 32;

/** stdin -> stdout, always holding back the last 3 bytes seen; at end of input it drops them. */
const HOLD_BACK_JS = `
const fs = require('fs');
const buf = Buffer.alloc(1 << 20);
let held = Buffer.alloc(0);
for (;;) {
  let n;
  try { n = fs.readSync(0, buf, 0, buf.length, null); } catch (e) { if (e.code === 'EAGAIN') continue; throw e; }
  if (n === 0) break;
  const all = Buffer.concat([held, buf.subarray(0, n)]);
  const out = all.subarray(0, Math.max(0, all.length - 3));
  for (let at = 0; at < out.length; ) at += fs.writeSync(1, out, at, out.length - at);
  held = Buffer.from(all.subarray(out.length));
}
`;

describe.each(testedQemus())('QEMU\'s verdict on a save, with and without its return path: $label', (qemu) => {
  let dir: string;
  let holdBack: string;
  let guest: Guest | null = null;

  beforeAll(() => {
    guestFiles();
    snapPipeBin();
    dir = mkdtempSync(join(tmpdir(), 'snap-pipe-rp-e2e-'));
    holdBack = join(dir, 'hold-back.cjs');
    writeFileSync(holdBack, HOLD_BACK_JS);
  });

  afterEach(async () => {
    await guest?.quit();
    guest = null;
  });

  afterAll(async () => {
    await guest?.quit();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  /** A paused guest, unthrottled, with return-path as asked. */
  async function pausedGuest(name: string, returnPath: boolean): Promise<Guest> {
    guest = await Guest.start({ qemu, name, memMiB, fillMiB });
    await guest.waitReady();
    await guest.stop();
    await guest.unthrottle();
    if (returnPath) await guest.setCapabilities({ 'return-path': true });
    return guest;
  }

  /** `exec:node hold-back.cjs | snap-pipe save --end-timeout 2 IMG`: the stream's last 3 bytes never arrive. */
  function heldBackUri(img: string): string {
    const save = [snapPipeBin(), 'save', '--end-timeout', '2', img].map(shellQuote).join(' ');
    return `exec:${shellQuote(process.execPath)} ${shellQuote(holdBack)} | ${save}`;
  }

  test('return-path on: QEMU completes on snap-pipe\'s SHUT(0), sent once the image is complete on disk', async () => {
    const g = await pausedGuest('rp-ok', true);
    const img = join(dir, 'ok.qcow2');
    await g.migrate(saveUri(img));
    const m = await g.waitMigration(120_000);
    if (m.status !== 'completed') throw g.failure(`save with return-path ${m.status}: ${m['error-desc'] ?? '?'}`);
    expect(g.stderrText()).not.toMatch(/snap-pipe:/);
    expect((await info(img)).complete).toBe(true);
    const v = await runCli(['verify', img]);
    expect(v.code, v.stderr).toBe(0);
  }, 180_000);

  // switchover-ack came in 8.1: older QEMUs have no such test.
  if (qemuAtLeast(qemu, 8, 1)) {
    test('return-path and switchover-ack on, a running guest: snap-pipe\'s SWITCHOVER_ACK lets QEMU switch over', async () => {
      guest = await Guest.start({ qemu, name: 'rp-ack', memMiB, fillMiB });
      await guest.waitReady();
      await guest.unthrottle();
      // Without the ACK a source with switchover-ack keeps iterating over a running guest and never completes
      // (migration.c migration_can_switchover); snap-pipe sends it as the return path opens.
      await guest.setCapabilities({ 'return-path': true, 'switchover-ack': true });
      await guest.waitTick(30_000);
      const img = join(dir, 'ack.qcow2');
      await guest.migrate(saveUri(img));
      const m = await guest.waitMigration(120_000);
      if (m.status !== 'completed') throw guest.failure(`save with switchover-ack ${m.status}: ${m['error-desc'] ?? '?'}`);
      expect((await info(img)).complete).toBe(true);
    }, 180_000);
  }

  test('return-path on, the save failing after QEMU\'s last byte: snap-pipe answers SHUT(1) and QEMU reports failed', async () => {
    const g = await pausedGuest('rp-late', true);
    const img = join(dir, 'late-rp.qcow2');
    await g.migrate(heldBackUri(img));
    const m = await g.waitMigration(120_000);
    expect(m.status).toBe('failed');
    expect(g.stderrText()).toMatch(/snap-pipe: save \S+late-rp\.qcow2 failed \(the image stays incomplete\): no end of the stream 2 s after its last byte/);
    const inf = await info(img);
    expect(inf.complete).toBe(false);
    expect(inf.failure).toMatch(/^no end of the stream 2 s after its last byte/);
    console.log(`${qemu.label}: a late failure with return-path: QEMU says ${m.status}: ${m['error-desc'] ?? '(no error-desc)'}`);
  }, 180_000);

  test('return-path off, the same failure: QEMU says completed, and the trace is snap-pipe\'s line and the image', async () => {
    const g = await pausedGuest('rp-off', false);
    const img = join(dir, 'late.qcow2');
    await g.migrate(heldBackUri(img));
    const m = await g.waitMigration(120_000);
    // QEMU wrote everything and does not read the child's exit status: it cannot know.
    expect(m.status).toBe('completed');
    expect(g.stderrText()).toMatch(/snap-pipe: save \S+late\.qcow2 failed \(the image stays incomplete\): the device state \(from byte \d+, \d+ bytes\) does not end with EOF and a VM description: the stream was cut short/);
    const inf = await info(img);
    expect(inf.complete).toBe(false);
    expect(inf.failure).toMatch(/^the device state .* the stream was cut short/);
  }, 180_000);
});
