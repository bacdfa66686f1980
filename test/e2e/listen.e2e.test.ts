// `snap-pipe save --listen unix:SOCK IMG` behind a real QEMU's `migrate "unix:SOCK"`, every tested QEMU:
//  - a paused guest with the return-path capability: save is ready (its stage threads loaded) before QEMU connects,
//    QEMU reports completed only after save's SHUT over the same socket, pc.ram equals pmemsave byte for byte, and
//    the socket is gone afterwards;
//  - a running guest, plain live migration with the bandwidth capped: pages re-sent, the last versions stored
//    (pc.ram equals pmemsave at the switch-over), every cluster's checksum sound;
//  - the same guest with the multifd capability (2 channels): save refuses QEMU's second connection with one line
//    naming multifd, QEMU reports the migration failed, the image stays incomplete, the socket is gone.
// Fails (never skips) when QEMU, the guest files or the build are missing.
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, test } from 'vitest';
import { Guest, guestFiles, snapPipeBin } from '../../tools/qemu/guest.js';
import { testedQemus } from '../../tools/qemu/versions.js';
import type { SaveReport } from '../../src/save/pipeline.js';
import { expectPcRamMatches, run, snapPipeInfo } from '../helpers/e2e.js';
import { startListeningSave, type ListeningSave } from '../helpers/listen.js';

const MiB = 1024 * 1024;
const memMiB = 256;
const fillMiB = 64;
const SAVE_MS_MAX = 180_000;

function startSave(img: string, sock: string, args: string[]): ListeningSave {
  return startListeningSave(snapPipeBin(), [img, '--listen', `unix:${sock}`, ...args], SAVE_MS_MAX);
}

describe.each(testedQemus())('snap-pipe save --listen behind a real QEMU migrate unix: $label', (qemu) => {
  let dir: string;
  let guest: Guest | null = null;

  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'snap-pipe-listen-e2e-'));
  });
  afterEach(async () => {
    await guest?.quit();
    guest = null;
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  test('a paused guest with return-path: ready before QEMU connects, completed after SHUT, pc.ram byte for byte', async () => {
    guestFiles();
    const sock = join(dir, 'rp.sock');
    const img = join(dir, 'rp.qcow2');
    const stats = join(dir, 'rp.json');
    const dump = join(dir, 'rp.pmem');
    guest = await Guest.start({ qemu, name: 'listen-rp', memMiB, fillMiB });
    await guest.waitReady(180_000);
    await guest.stop();
    await guest.pmemsave(0, memMiB * MiB, dump, 120_000);
    await guest.unthrottle();
    await guest.setCapabilities({ 'return-path': true });

    const save = startSave(img, sock, [`--stats=${stats}`]);
    await save.listening;
    await guest.migrate(`unix:${sock}`);
    const migration = await guest.waitMigration(180_000);
    const r = await save.done;
    expect(r.code, r.stderr).toBe(0);
    if (migration.status !== 'completed') throw guest.failure(`migrate unix: to save --listen ${migration.status}: ${migration['error-desc'] ?? '?'}`);
    expect(existsSync(sock)).toBe(false);

    const report = JSON.parse(readFileSync(stats, 'utf8')) as SaveReport;
    expect(report.startup.connectedMs).toBeGreaterThan(report.startup.stagesReadyMs);
    console.log(
      `${qemu.label} save --listen: stages ready ${report.startup.stagesReadyMs.toFixed(0)} ms, QEMU connected ${report.startup.connectedMs.toFixed(0)} ms, ` +
        `first write ${(report.startup.firstWriteMs - report.startup.connectedMs).toFixed(0)} ms after it; save ${report.seconds.toFixed(2)} s`,
    );
    const i = snapPipeInfo(img);
    expect(i.complete).toBe(true);
    await expectPcRamMatches(qemu, img, i, dump, join(dir, 'rp.raw'));
  }, 420_000);

  test('a running guest, plain live migration: pages re-sent over the socket, the last versions stored, verify sound', async () => {
    guestFiles();
    const sock = join(dir, 'live.sock');
    const img = join(dir, 'live.qcow2');
    const stats = join(dir, 'live.json');
    const dump = join(dir, 'live.pmem');
    guest = await Guest.start({ qemu, name: 'listen-live', memMiB, fillMiB });
    await guest.waitReady(180_000);
    // Slow enough that the guest's ticks dirty pages already sent: QEMU sends them again in its next pass.
    await guest.setMigrationParams({ 'max-bandwidth': 64 * MiB });
    await guest.setCapabilities({ 'return-path': true });
    await guest.waitTick(30_000);

    const save = startSave(img, sock, [`--stats=${stats}`]);
    await save.listening;
    await guest.migrate(`unix:${sock}`);
    const migration = await guest.waitMigration(240_000);
    const r = await save.done;
    expect(r.code, r.stderr).toBe(0);
    if (migration.status !== 'completed') throw guest.failure(`live migrate unix: to save --listen ${migration.status}: ${migration['error-desc'] ?? '?'}`);
    // Stopped at the switch-over: its memory now is what the stream's last versions say.
    await guest.pmemsave(0, memMiB * MiB, dump, 120_000);

    const i = snapPipeInfo(img);
    expect(i.complete).toBe(true);
    expect(i.resentPages).toBeGreaterThan(0);
    run(process.execPath, [snapPipeBin(), 'verify', img], 120_000); // exits 0: every cluster's checksum sound
    await expectPcRamMatches(qemu, img, i, dump, join(dir, 'live.raw'));
    console.log(`${qemu.label} save --listen (live): ${i.resentPages} pages re-sent`);
  }, 420_000);

  test('multifd channels: save refuses the second connection by name, QEMU fails, the image stays incomplete', async () => {
    guestFiles();
    const sock = join(dir, 'mfd.sock');
    const img = join(dir, 'mfd.qcow2');
    guest = await Guest.start({ qemu, name: 'listen-multifd', memMiB, fillMiB });
    await guest.waitReady(180_000);
    await guest.stop();
    await guest.unthrottle();
    await guest.setCapabilities({ multifd: true });
    await guest.setMigrationParams({ 'multifd-channels': 2 });

    const save = startSave(img, sock, []);
    await save.listening;
    await guest.migrate(`unix:${sock}`);
    const migration = await guest.waitMigration(180_000);
    const r = await save.done;
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain(
      `snap-pipe: save ${img} failed (the image stays incomplete): QEMU opened a second connection to ${sock}: its multifd channels, which snap-pipe save does not take yet; turn the multifd capability off`,
    );
    expect(migration.status).toBe('failed');
    expect(snapPipeInfo(img).complete).toBe(false);
    expect(existsSync(sock)).toBe(false);
  }, 420_000);
});
