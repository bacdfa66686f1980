// `snap-pipe save --listen unix:SOCK IMG` behind a real QEMU's `migrate "unix:SOCK"`, every tested QEMU:
//  - a paused guest with the return-path capability: save is ready (its stage threads loaded) before QEMU connects,
//    QEMU reports completed only after save's SHUT over the same socket, pc.ram equals pmemsave byte for byte, and
//    the socket is gone afterwards;
//  - a running guest, plain live migration with the bandwidth capped: pages re-sent, the last versions stored
//    (pc.ram equals pmemsave at the switch-over), every cluster's checksum sound;
//  - multifd (save --multifd-channels 2, QEMU's multifd-channels 2): a paused guest, byte for byte, with every
//    channel carrying pages and syncing at every sync point of the main channel; a running guest whose re-sent pages
//    cross channels, the last versions stored;
//  - multifd refused: without --multifd-channels (one line naming it), with fewer than QEMU opens, and with
//    multifd-compression zlib (QEMU fails, the image stays incomplete, the socket is gone);
//  - multifd both ways: a multifd save restored by load --connect over multifd channels and over one socket, and by
//    exec: load, RAM
//    byte for byte against pmemsave, the guest ticking after cont;
//  - multifd cut short: QEMU stopped (SIGSTOP) mid-migration ends the save after --stall-timeout, QEMU's
//    migrate_cancel ends it at once; one line each, the image incomplete.
// Fails (never skips) when QEMU, the guest files or the build are missing.
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, test } from 'vitest';
import { delayMs, Guest, guestFiles, snapPipeBin } from '../../tools/qemu/guest.js';
import { testedQemus } from '../../tools/qemu/versions.js';
import type { SaveReport } from '../../src/save/pipeline.js';
import { expectPcRamMatches, firstDifference, LEGACY_WINDOW, loadUri, run, snapPipeInfo } from '../helpers/e2e.js';
import type { LoadReport } from '../../src/load/precopy.js';
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

  /**
   * A paused guest (or a running one, with the bandwidth capped) migrated with multifd over `channels` channels, and
   * with the return-path capability unless `returnPath` is false.
   */
  async function multifdGuest(name: string, channels: number, running: boolean, returnPath = true): Promise<{ g: Guest; dump: string }> {
    const g = (guest = await Guest.start({ qemu, name, memMiB, fillMiB }));
    await g.waitReady(180_000);
    if (running) {
      await g.setMigrationParams({ 'max-bandwidth': 64 * MiB });
      await g.waitTick(30_000);
    } else {
      await g.stop();
      await g.unthrottle();
    }
    await g.setCapabilities({ multifd: true, 'return-path': returnPath });
    await g.setMigrationParams({ 'multifd-channels': channels });
    return { g, dump: join(dir, `${name}.pmem`) };
  }

  test('multifd, a paused guest over 2 channels: pages from every channel, sync points paired, pc.ram byte for byte', async () => {
    guestFiles();
    const sock = join(dir, 'mfd.sock');
    const img = join(dir, 'mfd.qcow2');
    const stats = join(dir, 'mfd.json');
    const { g, dump } = await multifdGuest('listen-mfd', 2, false);
    await g.pmemsave(0, memMiB * MiB, dump, 120_000);

    const save = startSave(img, sock, ['--multifd-channels', '2', `--stats=${stats}`]);
    await save.listening;
    await g.migrate(`unix:${sock}`);
    const migration = await g.waitMigration(180_000);
    const r = await save.done;
    expect(r.code, r.stderr).toBe(0);
    if (migration.status !== 'completed') throw g.failure(`multifd migrate to save --listen ${migration.status}: ${migration['error-desc'] ?? '?'}`);
    expect(existsSync(sock)).toBe(false);

    const report = JSON.parse(readFileSync(stats, 'utf8')) as SaveReport;
    const mfd = report.multifd!;
    expect(mfd.channels.map((c) => c.channel)).toEqual([0, 1]);
    expect(mfd.syncs).toBeGreaterThan(0);
    for (const c of mfd.channels) {
      expect(c.syncs, `channel ${c.channel}`).toBe(mfd.syncs);
      expect(c.dataPages, `channel ${c.channel}`).toBeGreaterThan(0);
    }
    // The 64 MiB fill is random: its pages are data, and over multifd they travel on the channels only (a page
    // may be sent twice: QEMU's last dirty-bitmap sync at completion finds some again).
    const channelPages = mfd.channels.reduce((n, c) => n + c.dataPages, 0);
    expect(channelPages).toBeGreaterThanOrEqual((fillMiB * MiB) / 4096);
    expect(channelPages).toBeGreaterThanOrEqual(report.dataPages);
    console.log(
      `${qemu.label} save --listen --multifd-channels 2: ${mfd.syncs} sync points; ` +
        mfd.channels.map((c) => `channel ${c.channel} ${c.packets} packets, ${c.dataPages} data + ${c.zeroPages} zero pages`).join('; ') +
        `; ${report.dataPages} data pages stored, ${report.resentPages} re-sent`,
    );
    const i = snapPipeInfo(img);
    expect(i.complete).toBe(true);
    run(process.execPath, [snapPipeBin(), 'verify', img], 120_000);
    await expectPcRamMatches(qemu, img, i, dump, join(dir, 'mfd.raw'));
  }, 420_000);

  test('multifd, a running guest: pages re-sent across channels, the last versions stored, verify sound', async () => {
    guestFiles();
    const sock = join(dir, 'mfd-live.sock');
    const img = join(dir, 'mfd-live.qcow2');
    const { g, dump } = await multifdGuest('listen-mfd-live', 2, true);

    const save = startSave(img, sock, ['--multifd-channels', '2']);
    await save.listening;
    await g.migrate(`unix:${sock}`);
    const migration = await g.waitMigration(240_000);
    const r = await save.done;
    expect(r.code, r.stderr).toBe(0);
    if (migration.status !== 'completed') throw g.failure(`live multifd migrate to save --listen ${migration.status}: ${migration['error-desc'] ?? '?'}`);
    // Stopped at the switch-over: its memory now is what the last versions of the pages say.
    await g.pmemsave(0, memMiB * MiB, dump, 120_000);

    const i = snapPipeInfo(img);
    expect(i.complete).toBe(true);
    expect(i.resentPages).toBeGreaterThan(0);
    run(process.execPath, [snapPipeBin(), 'verify', img], 120_000);
    await expectPcRamMatches(qemu, img, i, dump, join(dir, 'mfd-live.raw'));
    console.log(`${qemu.label} save --listen --multifd-channels 2 (live): ${i.resentPages} pages re-sent`);
  }, 420_000);

  test('multifd without --multifd-channels, more channels than it names, and zlib compression: one line each, QEMU fails, images incomplete', async () => {
    guestFiles();
    for (const [name, args, line] of [
      ['none', [], `QEMU opened a multifd channel to ${join(dir, 'none.sock')}: give save --multifd-channels N with QEMU's multifd-channels (2 unless set), or turn QEMU's multifd capability off`],
      ['fewer', ['--multifd-channels', '2'], `QEMU opened multifd channel 2 to ${join(dir, 'fewer.sock')}, but --multifd-channels is 2: give QEMU's multifd-channels`],
      ['zlib', ['--multifd-channels', '3'], 'multifd packet with zlib compression (multifd-compression=zlib): snap-pipe takes uncompressed multifd only'],
    ] as const) {
      const sock = join(dir, `${name}.sock`);
      const img = join(dir, `${name}.qcow2`);
      // A guest each: QEMU 7.2 may refuse a second migrate right after a failed multifd one ("duplicate yank instance").
      await guest?.quit();
      const { g } = await multifdGuest(`listen-mfd-${name}`, 3, false);
      if (name === 'zlib') await g.setMigrationParams({ 'multifd-compression': 'zlib' });
      const save = startSave(img, sock, [...args]);
      await save.listening;
      await g.migrate(`unix:${sock}`);
      const migration = await g.waitMigration(180_000);
      const r = await save.done;
      expect(r.code, name).not.toBe(0);
      // The compression is refused by whichever channel's packet comes first: its number prefixes the line.
      const said = r.stderr.split('\n').find((l) => l.startsWith(`snap-pipe: save ${img} failed`)) ?? r.stderr;
      expect(said.replace(/: multifd channel \d+: /, ': ')).toBe(`snap-pipe: save ${img} failed (the image stays incomplete): ${line}`);
      expect(migration.status, name).toBe('failed');
      expect(snapPipeInfo(img).complete).toBe(false);
      expect(existsSync(sock)).toBe(false);
    }
  }, 420_000);

  test('multifd, QEMU stopped mid-migration: --stall-timeout ends the save with one line; cancelled: one line; images incomplete', async () => {
    guestFiles();
    for (const how of ['stopped', 'cancelled'] as const) {
      await guest?.quit();
      // Cancelled without the return path: QEMU's migrate_cancel shuts the return path down before it sets
      // CANCELLING (7.2 migration.c migrate_fd_cancel, 10.0 migration_cancel), and over a socket that is the main
      // channel itself, so the migration thread's next write could fail first and end the migration 'failed'
      // (seen once under 10.0). Without it, CANCELLING comes before any channel is shut down.
      const { g } = await multifdGuest(`listen-mfd-${how}`, 2, true, how === 'stopped');
      await g.setMigrationParams({ 'max-bandwidth': 16 * MiB });
      const sock = join(dir, `${how}.sock`);
      const img = join(dir, `${how}.qcow2`);
      const save = startSave(img, sock, ['--multifd-channels', '2', '--stall-timeout', '2']);
      await save.listening;
      await g.migrate(`unix:${sock}`);
      await delayMs(1_500);
      if (how === 'stopped') process.kill(g.pid!, 'SIGSTOP');
      else await g.execute('migrate_cancel');
      const r = await save.done;
      if (how === 'stopped') process.kill(g.pid!, 'SIGCONT');
      expect(r.code, how).toBe(1);
      const lines = r.stderr.trim().split('\n').filter((l) => !l.includes('listening on unix:'));
      expect(lines, how).toHaveLength(1);
      expect(lines[0]).toMatch(new RegExp(`^snap-pipe: save ${img} failed \\(the image stays incomplete\\): `));
      if (how === 'stopped') expect(lines[0]).toContain('nothing came from QEMU and nothing was written for 2 s (--stall-timeout): the migration stalled');
      console.log(`${qemu.label} multifd save, QEMU ${how}: ${lines[0]}`);
      const migration = await g.waitMigration(60_000);
      expect(migration.status, how).toBe(how === 'stopped' ? 'failed' : 'cancelled');
      expect(snapPipeInfo(img).complete).toBe(false);
      expect(existsSync(sock)).toBe(false);
    }
  }, 420_000);

  test('multifd both ways: saved over 2 channels, restored by load --connect over 2 channels and over one socket, and by exec: load, byte for byte, ticking', async () => {
    guestFiles();
    const sock = join(dir, 'both.sock');
    const img = join(dir, 'both.qcow2');
    const { g, dump } = await multifdGuest('listen-both-src', 2, false);
    await g.pmemsave(0, memMiB * MiB, dump, 120_000);
    const save = startSave(img, sock, ['--multifd-channels', '2']);
    await save.listening;
    await g.migrate(`unix:${sock}`);
    const saved = await g.waitMigration(180_000);
    expect((await save.done).code).toBe(0);
    if (saved.status !== 'completed') throw g.failure(`multifd save ${saved.status}`);
    await g.quit();

    // 2 and 0: load --connect with and without multifd channels; -1: exec: load, as for any image.
    for (const channels of [2, 0, -1]) {
      const dst = (guest = await Guest.start({ qemu, name: `listen-both-dst${channels}`, memMiB, fillMiB, incoming: true }));
      if (channels > 0) {
        await dst.setCapabilities({ multifd: true });
        await dst.setMigrationParams({ 'multifd-channels': channels });
      }
      const inSock = join(dir, `in${channels}.sock`);
      const stats = join(dir, `in${channels}.json`);
      if (channels < 0) {
        await dst.migrateIncoming(loadUri(img, [`--stats=${stats}`]));
      } else {
        await dst.migrateIncoming(`unix:${inSock}`);
        const multifd = channels > 0 ? ['--multifd-channels', String(channels)] : [];
        run(process.execPath, [snapPipeBin(), 'load', img, '--connect', `unix:${inSock}`, ...multifd, `--stats=${stats}`], 180_000);
      }
      const m = await dst.waitMigration(180_000);
      if (m.status !== 'completed') throw dst.failure(`incoming from load --connect (${channels} channels) ${m.status}: ${m['error-desc'] ?? '?'}`);
      const report = JSON.parse(readFileSync(stats, 'utf8')) as LoadReport;
      if (channels > 0) {
        expect(report.multifd).toMatchObject({ channels, syncBy: qemu.major >= 10 ? 'flush' : 'eos' });
        expect(report.multifd!.packets).toBeGreaterThan((fillMiB * MiB) / 4096 / 128);
      } else {
        expect(report.multifd).toBeUndefined();
      }
      const after = join(dir, `in${channels}.pmem`);
      await dst.pmemsave(0, memMiB * MiB, after, 120_000);
      const diff = await firstDifference(dump, after, memMiB * MiB, [LEGACY_WINDOW]);
      expect(diff, diff < 0 ? '' : `restored RAM (${channels} channels) differs at 0x${diff.toString(16)}`).toBe(-1);
      const from = dst.consoleBytes();
      await dst.cont();
      expect(await dst.waitTick(30_000, from)).toMatch(/SNAPPIPE-TICK \d+/);
      const how = channels < 0 ? 'exec: load' : `load --connect${channels > 0 ? ` --multifd-channels ${channels}` : ''}`;
      console.log(`${qemu.label} ${how}: ${report.seconds.toFixed(2)} s` + (report.multifd ? `, ${report.multifd.packets} packets, ${report.multifd.syncs} sync points by ${report.multifd.syncBy}` : ''));
      await dst.quit();
      guest = null;
    }
  }, 600_000);
});
