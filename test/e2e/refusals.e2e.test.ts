// Refusals under a real QEMU (7.2, TCG):
// - load refusing an image before writing anything: QEMU 7.2 only starts an exec: incoming migration when the pipe
//   becomes readable, and an empty pipe closed is never readable, so without snap-pipe's refusal marker (4 bytes
//   that are not a migration stream) the destination would wait forever. It must fail promptly instead.
// - a truncated stream (`migrate exec:head -c N | snap-pipe save IMG`): the source's migration fails and the source
//   keeps running, save names the byte where the stream ended, the image is incomplete, and load refuses it under
//   a destination QEMU whose incoming migration then fails promptly.
// QEMU 7.2 ends the destination process after a failed incoming migration (exit code 1; `exit-on-error` only came
// in QEMU 9.1), so "fails cleanly" here means: query-migrate says failed or QEMU exits with code 1 (not a signal),
// within INCOMING_FAIL_MS_MAX, with the failure in its log.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, test } from 'vitest';
import { Guest, delayMs, guestFiles, shellQuote, snapPipeBin } from '../../tools/qemu/guest.js';
import { testedQemus, type Qemu } from '../../tools/qemu/versions.js';
import { info } from '../helpers/cli.js';
import { loadUri } from '../helpers/e2e.js';

const MiB = 1024 * 1024;
const memMiB = 256;
/** Without the marker QEMU waits forever; with it, the failure takes well under a second plus Node start-up. */
const INCOMING_FAIL_MS_MAX = 20_000;

let dir: string;
const guests: Guest[] = [];
beforeAll(() => {
  guestFiles();
  snapPipeBin();
  dir = mkdtempSync(join(tmpdir(), 'snap-pipe-refusals-e2e-'));
});
afterEach(async () => {
  for (const g of guests.splice(0)) await g.quit();
});
afterAll(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

async function start(qemu: Qemu, name: string, incoming: boolean): Promise<Guest> {
  const g = await Guest.start({ qemu, name, memMiB, fillMiB: incoming ? 0 : 64, incoming });
  guests.push(g);
  return g;
}

/**
 * Starts `migrate_incoming exec:snap-pipe load IMG` and waits (bounded) for the incoming migration to fail:
 * query-migrate says failed, or QEMU 7.2 exits after it. Returns how it ended and how long it took.
 */
async function incomingFails(g: Guest, img: string): Promise<{ ms: number; how: string }> {
  const t0 = Date.now();
  await g.migrateIncoming(loadUri(img));
  let lastError = '';
  // Bounded by INCOMING_FAIL_MS_MAX: each round is one short QMP call or a 100 ms pause.
  while (Date.now() - t0 < INCOMING_FAIL_MS_MAX) {
    if (!g.alive) return { ms: Date.now() - t0, how: `exited: ${g.exitStatus}` };
    let status = '';
    try {
      const m = await g.queryMigrate(2_000);
      status = m.status;
      if (m.status === 'failed') return { ms: Date.now() - t0, how: `failed: ${m['error-desc'] ?? ''}` };
    } catch (err) {
      lastError = (err as Error).message; // QMP closing as QEMU exits: the next round sees the exit
    }
    if (status === 'completed') throw g.failure('the incoming migration of a refused image completed');
    await delayMs(100);
  }
  throw g.failure(`the incoming migration did not fail within ${INCOMING_FAIL_MS_MAX} ms (QEMU waiting on an empty pipe?) ${lastError}`);
}

function expectCleanFailure(g: Guest, r: { ms: number; how: string }, snapPipeLine: RegExp): void {
  expect(r.ms).toBeLessThan(INCOMING_FAIL_MS_MAX);
  // QEMU failed the migration itself (exit code 1 at most), it did not crash.
  expect(r.how).toMatch(/^failed: |^exited: exit code 1$/);
  const log = g.stderrText();
  expect(log).toMatch(snapPipeLine);
  // snap-pipe's refusal marker (4 zero bytes) is what QEMU reads: its magic check fails (savevm.c
  // qemu_loadvm_state, the same words from 5.2 to 10.2), and the incoming migration with it.
  expect(log).toMatch(/Not a migration stream/);
  expect(log).toMatch(/load of migration failed/);
  expect(log).not.toMatch(/internal error|Segmentation|Aborted|core dumped/);
}

describe.each(testedQemus())('refusals under a real QEMU: $label', (qemu) => {
  test('load refusing an image before its first byte: the destination fails promptly instead of waiting forever', async () => {
    const junk = join(dir, 'junk.bin');
    writeFileSync(junk, Buffer.alloc(2 * MiB, 0x41));
    const dst = await start(qemu, 'refuse-junk', true);
    const r = await incomingFails(dst, junk);
    expectCleanFailure(dst, r, /snap-pipe: .*junk\.bin: not a QCOW2 image/);
    console.log(`incoming migration from a refused load: ${r.how.trim()} after ${r.ms} ms`);
  }, 120_000);

  test('a truncated stream (exec:head -c N | snap-pipe save): source fails and runs on, image incomplete, load refused, incoming fails', async () => {
    const img = join(dir, 'cut.qcow2');
    const cutBytes = 8 * MiB + 12345;
    const src = await start(qemu, 'refuse-src', false);
    await src.waitReady();
    await src.unthrottle();
    await src.migrate(`exec:head -c ${cutBytes} | ${shellQuote(snapPipeBin())} save ${shellQuote(img)}`);
    const status = await src.waitMigration(120_000);
    expect(status.status).toBe('failed');
    expect(src.stderrText()).toMatch(new RegExp(`snap-pipe: save ${img} failed \\(the image stays incomplete\\): stream ended at byte ${cutBytes} while reading `));
    expect((await src.queryStatus()).status).toBe('running');
    await src.waitTick(30_000, src.consoleBytes()); // the guest still ticks after the failed save
    expect((await info(img)).complete).toBe(false);

    const dst = await start(qemu, 'refuse-dst', true);
    const r = await incomingFails(dst, img);
    expectCleanFailure(dst, r, new RegExp(`snap-pipe: .*cut\\.qcow2: the save that wrote this image failed: stream ended at byte ${cutBytes} while reading `));
  }, 300_000);
});
