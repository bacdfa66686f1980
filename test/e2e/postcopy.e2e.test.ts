// `snap-pipe load --postcopy` behind a real QEMU (TCG): a stopped 512 MiB guest saved with snap-pipe save is brought
// back in a fresh QEMU with the postcopy-ram capability.
//  - Into a destination left paused until the migration completes: memory byte for byte equal to a dump taken
//    before the save (device loading already faults on pages, which snap-pipe serves), and it runs after cont.
//  - With cont as soon as QEMU says postcopy-active: the guest runs before all of its RAM has arrived (the console
//    ticks while query-migrate says postcopy-active, snap-pipe serves the pages it touches), the migration
//    completes, and it goes on. Its memory moves on from the dump as it runs (kernel, console, timers), so it is
//    judged by content: asked right after cont, the guest reads back all of its random fill and /init, pulling
//    most of those pages on demand while postcopy is still active, and their hashes must equal the ones it gave
//    before the save, with zero tolerance.
//  - Over one unix socket (load --postcopy --connect, started before the destination listens): the return path
//    comes back on the stream's socket; memory byte for byte, then it runs.
// The same image loaded by plain precopy gives the baseline: time from migrate_incoming to the first tick.
//
// The destination is started with -S (as the precopy tests): QEMU then leaves the guest paused at POSTCOPY_RUN
// (savevm.c loadvm_postcopy_handle_run_bh: autostart is false) and `cont` starts it while postcopy is active. Without
// -S it would start by itself at RUN.
// Fails (never skips) when QEMU, the guest files (scripts/guest.sh) or the build (dist/main.js) are missing.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, test } from 'vitest';
import type { PostcopyReport } from '../../src/load/postcopy/session.js';
import { Guest, delayMs, guestFiles, shellQuote, snapPipeBin } from '../../tools/qemu/guest.js';
import { qemuAtLeast, testedQemus } from '../../tools/qemu/versions.js';
import { info, runCli } from '../helpers/cli.js';
import { firstDifference, LEGACY_WINDOW, loadUri, saveUri } from '../helpers/e2e.js';

const MiB = 1024 * 1024;

/** stdin -> stdout at argv[2] MB/s, in 64 KiB pieces (blocking pipes on both sides). */
const THROTTLE_JS = `
const fs = require('fs');
const rate = Number(process.argv[2]) * 1e6;
const buf = Buffer.alloc(65536);
const cell = new Int32Array(new SharedArrayBuffer(4));
const t0 = Date.now();
let sent = 0;
for (;;) {
  let n;
  try { n = fs.readSync(0, buf, 0, buf.length, null); } catch (e) { if (e.code === 'EAGAIN') { Atomics.wait(cell, 0, 0, 1); continue; } throw e; }
  if (n === 0) break;
  for (let at = 0; at < n; ) at += fs.writeSync(1, buf, at, n - at);
  sent += n;
  const wait = t0 + (sent / rate) * 1000 - Date.now();
  if (wait > 0) Atomics.wait(cell, 0, 0, wait);
}
`;

/** 4 KiB pages that differ between two dumps, outside the legacy VGA/ROM window. */
async function differingPages(a: string, b: string, lengthBytes: number): Promise<number> {
  const x = readFileSync(a);
  const y = readFileSync(b);
  let n = 0;
  for (let off = 0; off < lengthBytes; off += 4096) {
    if (off >= LEGACY_WINDOW[0] && off < LEGACY_WINDOW[1]) continue;
    if (Buffer.compare(x.subarray(off, off + 4096), y.subarray(off, off + 4096)) !== 0) n++;
  }
  return n;
}
const pageBytes = 4096;
const memMiB = 512;
const fillMiB = 200;

describe.each(testedQemus())('snap-pipe load --postcopy behind a real QEMU: $label', (qemu) => {
  let dir: string;
  let source: Guest | null = null;
  let dest: Guest | null = null;
  let img: string;
  let before: string;
  let throttle: string;
  /** What the guest said of its own content before it was saved (scripts/guest.sh: fill and /init never change). */
  let sourceHash: { fill: string; init: string };

  beforeAll(async () => {
    guestFiles();
    snapPipeBin();
    dir = mkdtempSync(join(tmpdir(), 'snap-pipe-postcopy-e2e-'));
    throttle = join(dir, 'throttle.cjs');
    writeFileSync(throttle, THROTTLE_JS);
    img = join(dir, 'stopped.qcow2');
    before = join(dir, 'before.pmem');
    source = await Guest.start({ qemu, name: 'postcopy-src', memMiB, fillMiB });
    await source.waitReady(180_000);
    sourceHash = await source.contentHash();
    await source.stop();
    await source.pmemsave(0, memMiB * MiB, before, 120_000);
    await source.unthrottle();
    await source.migrate(saveUri(img));
    const m = await source.waitMigration(180_000);
    if (m.status !== 'completed') throw source.failure(`save ${m.status}: ${m['error-desc'] ?? '?'}`);
    // From QEMU 10 the image carries SWITCHOVER_START: postcopy replays it before the discards.
    expect((await info(img)).switchoverStarts).toBe(qemuAtLeast(qemu, 10, 0) ? 1 : 0);
    await source.quit();
    source = null;
  }, 600_000);

  afterEach(async () => {
    await dest?.quit();
    dest = null;
  });

  afterAll(async () => {
    await source?.quit();
    await dest?.quit();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  const results: Record<string, number> = {};

  test('precopy baseline: migrate_incoming to the first tick', async () => {
    dest = await Guest.start({ qemu, name: 'postcopy-base', memMiB, fillMiB, incoming: true });
    const from = dest.consoleBytes();
    const t0 = Date.now();
    await dest.migrateIncoming(loadUri(img));
    const m = await dest.waitMigration(180_000);
    if (m.status !== 'completed') throw dest.failure(`precopy load ${m.status}: ${m['error-desc'] ?? '?'}`);
    const loaded = Date.now() - t0;
    await dest.cont();
    await dest.waitTick(30_000, from);
    results.precopyToTickMs = Date.now() - t0;
    results.precopyLoadedMs = loaded;
    console.log(`${qemu.label} precopy: migrate_incoming -> completed ${loaded} ms, -> first tick after cont ${results.precopyToTickMs} ms`);
  }, 300_000);

  /**
   * Starts a destination with postcopy-ram and runs `migrate_incoming exec:snap-pipe load --postcopy...`; with
   * `mbps`, snap-pipe's output goes through a rate limiter first (a slow link: the stream takes seconds, so the
   * guest, which needs ~0.7 s under TCG to print its first tick, surely ticks before the end).
   */
  async function startPostcopy(name: string, percent: number, statsPath: string, mbps?: number, caps: Record<string, boolean> = {}): Promise<{ t0: number; from: number }> {
    dest = await Guest.start({ qemu, name, memMiB, fillMiB, incoming: true });
    // QEMU 7.2 checks postcopy-ram on the destination at POSTCOPY_ADVISE: set it before migrate_incoming.
    await dest.setCapabilities({ 'postcopy-ram': true, 'postcopy-blocktime': true, ...caps });
    const from = dest.consoleBytes();
    const t0 = Date.now();
    let uri = loadUri(img, [percent ? `--postcopy=${percent}` : '--postcopy', `--stats=${statsPath}`]);
    if (mbps) uri += ` | ${shellQuote(process.execPath)} ${shellQuote(throttle)} ${mbps}`;
    await dest.migrateIncoming(uri);
    return { t0, from };
  }

  /** Polls query-migrate until postcopy-active (LISTEN went by); returns the statuses seen. */
  async function waitPostcopyActive(g: Guest): Promise<Set<string>> {
    const seen = new Set<string>();
    for (const deadline = Date.now() + 60_000; Date.now() < deadline; ) {
      const m = await g.queryMigrate();
      seen.add(m.status);
      if (m.status === 'postcopy-active') return seen;
      if (m.status === 'completed' || m.status === 'failed') break;
      await delayMs(5);
    }
    throw g.failure(`no postcopy-active (seen: ${[...seen].join(', ')})`);
  }

  async function readStats(g: Guest, statsPath: string): Promise<PostcopyReport> {
    for (const deadline = Date.now() + 10_000; Date.now() < deadline; ) {
      try {
        return JSON.parse(readFileSync(statsPath, 'utf8')) as PostcopyReport;
      } catch {
        await delayMs(50);
      }
    }
    throw g.failure('snap-pipe wrote no stats');
  }

  function describeStats(st: PostcopyReport): string {
    const l = st.faultLatency;
    return (
      `snap-pipe: ${(st.bytesOut / MiB).toFixed(0)} MiB in ${(st.seconds * 1000).toFixed(0)} ms; package sent ${st.packageSentMs.toFixed(0)} ms, ` +
      `devices loaded ${st.devicesLoadedMs?.toFixed(0)} ms, EOF ${st.eofSentMs.toFixed(0)} ms; precopy share ${st.precopyDataPages} data pages; ` +
      `${st.discardRanges} discard ranges; ${st.requests} requests (${st.requestedDataPages} data, ${st.requestedZeroPages} zero, ` +
      `${st.requestedAlreadySent} already sent), ${st.requestReads} request cluster reads (${st.evictions} dropped); fault latency ` +
      `p50 ${l.p50Ms.toFixed(3)} ms, p90 ${l.p90Ms.toFixed(3)} ms, p99 ${l.p99Ms.toFixed(3)} ms, max ${l.maxMs.toFixed(3)} ms ` +
      `(waiting for clusters ${st.requestReadWaitMs.toFixed(1)} ms, writing ${st.requestWriteMs.toFixed(1)} ms in all)`
    );
  }

  test('postcopy into a paused destination: memory byte for byte the dump taken before the save, then it runs', async () => {
    const statsPath = join(dir, 'postcopy-paused.json');
    const after = join(dir, 'after-paused.pmem');
    // From QEMU 8.1 a destination may have switchover-ack: it sends SWITCHOVER_ACK on the return path as soon as
    // snap-pipe opens it, which snap-pipe must accept.
    const ackCaps: Record<string, boolean> = qemuAtLeast(qemu, 8, 1) ? { 'return-path': true, 'switchover-ack': true } : {};
    const { t0, from } = await startPostcopy('postcopy-paused', 0, statsPath, 0, ackCaps);
    const g = dest!;
    const seen = await waitPostcopyActive(g);
    // -S: QEMU leaves the guest paused at POSTCOPY_RUN; loading the devices still faults on guest pages (kvmvapic
    // patches the option ROM area), which snap-pipe serves.
    const done = await g.waitMigration(180_000);
    const ms = Date.now() - t0;
    if (done.status !== 'completed') throw g.failure(`postcopy load ${done.status}: ${done['error-desc'] ?? '?'}`);
    expect(seen.has('postcopy-active')).toBe(true);
    expect(await g.queryStatus()).toMatchObject({ running: false });
    const st = await readStats(g, statsPath);
    expect(st.shutStatus).toBe(0);
    // The guest never ran, yet QEMU asked for pages: loading the devices touched guest RAM (kvmvapic patches the
    // option ROM area) and snap-pipe served those requests.
    expect(st.requests).toBeGreaterThan(0);
    expect(st.switchoverAcks).toBe(qemuAtLeast(qemu, 8, 1) ? 1 : 0);
    expect(g.stderrText()).not.toMatch(/snap-pipe:/);

    await g.pmemsave(0, memMiB * MiB, after, 120_000);
    const diff = await firstDifference(before, after, memMiB * MiB, [LEGACY_WINDOW]);
    expect(diff, diff < 0 ? '' : `restored RAM differs at 0x${diff.toString(16)} (page 0x${(diff - (diff % pageBytes)).toString(16)})`).toBe(-1);
    rmSync(after, { force: true });

    await g.cont();
    await g.waitTick(30_000, from);
    await g.waitTick(30_000);
    console.log(`${qemu.label} postcopy, paused destination: migrate_incoming -> completed ${ms} ms; identical memory.\n  ${describeStats(st)}`);
  }, 600_000);

  test('postcopy over one socket: load --connect, started before migrate_incoming, into a paused destination; byte for byte, then it runs', async () => {
    const statsPath = join(dir, 'postcopy-connect.json');
    const after = join(dir, 'after-connect.pmem');
    const sock = join(dir, 'in.sock');
    dest = await Guest.start({ qemu, name: 'postcopy-connect', memMiB, fillMiB, incoming: true });
    const g = dest;
    await g.setCapabilities({ 'postcopy-ram': true });
    // load first: it checks the image, then waits for QEMU to listen.
    const load = runCli(['load', img, '--postcopy', '--connect', `unix:${sock}`, '--connect-timeout', '60', `--stats=${statsPath}`]);
    await delayMs(300);
    const from = g.consoleBytes();
    const t0 = Date.now();
    await g.migrateIncoming(`unix:${sock}`);
    const seen = await waitPostcopyActive(g);
    const activeMs = Date.now() - t0;
    const done = await g.waitMigration(180_000);
    if (done.status !== 'completed') throw g.failure(`postcopy load --connect ${done.status}: ${done['error-desc'] ?? '?'}`);
    const r = await load;
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr.trim().split('\n'), 'load said it waited, and nothing else').toEqual([`snap-pipe: load: waiting for QEMU to listen on unix:${sock} (up to 60 s)`]);
    expect(seen.has('postcopy-active')).toBe(true);
    const st = await readStats(g, statsPath);
    expect(st.shutStatus).toBe(0);
    expect(st.pongs).toEqual([1, 3]);
    expect(st.requests, 'requests came back on the stream socket').toBeGreaterThan(0);

    await g.pmemsave(0, memMiB * MiB, after, 120_000);
    const diff = await firstDifference(before, after, memMiB * MiB, [LEGACY_WINDOW]);
    expect(diff, diff < 0 ? '' : `restored RAM differs at 0x${diff.toString(16)}`).toBe(-1);
    rmSync(after, { force: true });
    await g.cont();
    await g.waitTick(30_000, from);
    await g.waitTick(30_000);
    console.log(`${qemu.label} postcopy over --connect, paused destination: migrate_incoming -> postcopy-active ${activeMs} ms; identical memory.\n  ${describeStats(st)}`);
  }, 600_000);

  for (const { percent, mbps } of [{ percent: 0, mbps: 0 }, { percent: 0, mbps: 64 }, { percent: 25, mbps: 64 }]) {
    const label = `postcopy${percent ? `=${percent}` : ''}${mbps ? ` over a ${mbps} MB/s link` : ''}`;
    test(`${label}, cont at postcopy-active: the guest runs while RAM is still arriving, and goes on`, async () => {
      const statsPath = join(dir, `postcopy-${percent}-${mbps}.json`);
      const after = join(dir, `after-${percent}-${mbps}.pmem`);
      const { t0, from } = await startPostcopy(`postcopy-run-${percent}-${mbps}`, percent, statsPath, mbps);
      const g = dest!;
      const seen = await waitPostcopyActive(g);
      const activeMs = Date.now() - t0;
      await g.cont();
      const contMs = Date.now() - t0;
      // Asked at once: the guest reads its whole fill back while postcopy is still active, so most of those pages
      // come on demand, and every byte of them counts in the hash.
      const hashed = g.contentHash(180_000);
      hashed.catch(() => undefined); // awaited below; do not let an early rejection go unhandled meanwhile

      // Poll the console and the migration status together: a tick while postcopy is still active shows the guest
      // running before all of its RAM has arrived.
      let firstTickMs = -1;
      let tickWhileActive = '';
      let runningWhileActive = false;
      let status = 'postcopy-active';
      for (const deadline = Date.now() + 120_000; Date.now() < deadline; ) {
        const ticks = g.consoleText().slice(from).match(/SNAPPIPE-TICK \d+/g) ?? [];
        const m = await g.queryMigrate();
        status = m.status;
        seen.add(status);
        if (status === 'postcopy-active' && (await g.queryStatus()).running) runningWhileActive = true;
        if (ticks.length > 0 && firstTickMs < 0) firstTickMs = Date.now() - t0;
        if (ticks.length > 0 && status === 'postcopy-active' && !tickWhileActive) tickWhileActive = ticks[ticks.length - 1];
        if (status === 'failed' || (status === 'completed' && firstTickMs >= 0)) break;
        await delayMs(10);
      }
      const done = await g.waitMigration(180_000);
      if (done.status !== 'completed') throw g.failure(`postcopy load ${done.status}: ${done['error-desc'] ?? '?'}`);
      const st = await readStats(g, statsPath);
      const completedMs = st.shutMs === null ? -1 : Math.round(st.shutMs);
      expect(st.shutStatus).toBe(0);
      expect(st.requests).toBeGreaterThan(0);
      expect(g.stderrText()).not.toMatch(/snap-pipe:/);
      expect(runningWhileActive, 'query-status running while query-migrate says postcopy-active').toBe(true);
      // Unthrottled, the stream (~0.9 s here) may end before the guest's first tick (~0.7 s after cont under TCG):
      // the tick is required over the slow link only.
      if (mbps) expect(tickWhileActive, `a console tick while query-migrate says postcopy-active (first tick ${firstTickMs} ms, SHUT ${completedMs} ms)`).not.toBe('');

      // Judged by content, with zero tolerance: the fill and /init hash as they did before the save.
      expect(await hashed).toEqual(sourceHash);
      // Pages the running guest itself changed since the dump (kernel data, the console, timers, the tick file):
      // reported, not judged; what the guest wrote is not what snap-pipe served.
      await g.pmemsave(0, memMiB * MiB, after, 120_000);
      const changed = await differingPages(before, after, memMiB * MiB);
      rmSync(after, { force: true });

      expect(await g.queryStatus()).toMatchObject({ status: 'running', running: true });
      await g.waitTick(30_000);
      await g.waitTick(30_000);

      const blocktime = (done as Record<string, unknown>)['postcopy-blocktime'];
      console.log(
        `${qemu.label} ${label}, cont at postcopy-active: migrate_incoming -> postcopy-active ${activeMs} ms, cont ${contMs} ms, first tick ` +
          `${firstTickMs} ms (${tickWhileActive ? `'${tickWhileActive}' while postcopy-active` : 'after the end'}), snap-pipe got SHUT at ${completedMs} ms after its start; ` +
          `precopy baseline: first tick ${results.precopyToTickMs ?? '?'} ms. ${changed} pages changed by the running guest; ` +
          `QEMU postcopy-blocktime ${String(blocktime)} ms.\n  ${describeStats(st)}`,
      );
    }, 600_000);
  }

  test('a destination without postcopy-ram fails at POSTCOPY_ADVISE; snap-pipe names the capability', async () => {
    dest = await Guest.start({ qemu, name: 'postcopy-nocap', memMiB, fillMiB, incoming: true });
    await dest.migrateIncoming(loadUri(img, ['--postcopy']));
    // QEMU exits when an incoming migration fails (7.2: migration.c process_incoming_migration_co; 9.1+: unless
    // migrate-incoming's exit-on-error is false).
    for (const deadline = Date.now() + 60_000; dest.alive && Date.now() < deadline; ) await delayMs(100);
    if (dest.alive) throw dest.failure('QEMU still running 60 s after a postcopy stream without postcopy-ram');
    for (const deadline = Date.now() + 10_000; !/snap-pipe:/.test(dest.stderrText()) && Date.now() < deadline; ) await delayMs(100);
    const log = dest.stderrText();
    expect(log).toMatch(/RAM postcopy is disabled but have 16 byte advise/);
    expect(log).toMatch(/snap-pipe: .*does the destination have the postcopy-ram capability/);
    console.log(`no postcopy-ram: ${log.trim().split('\n').filter((l) => /snap-pipe|advise/.test(l)).join(' | ')}`);
  }, 300_000);
});
