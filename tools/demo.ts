// `npm run demo`: boots a small guest under QEMU, saves it through `snap-pipe save` as QEMU's migration target,
// shows `snap-pipe info` and `qemu-img check` of the image, then cleans up. Prints each step to stdout; on any
// failure prints one line to stderr and exits 1.
//   npm run demo -- [--live] [--mem MiB] [--fill MiB] [--keep] [--qemu PATH|10.0|5.2]   (vite-node tools/demo.ts)
//     --live   take a background snapshot of the running guest instead of pausing it first
//     --keep   keep the image (its path is printed) instead of deleting it
//     --qemu   the qemu-system-x86_64 to run, or 10.0 / 5.2 for the ones npm test fetches (default: $SNAP_PIPE_QEMU,
//              else the machine's own)
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { firstDifference, LEGACY_WINDOW } from './qemu/compare.js';
import { Guest, guestFiles, shellQuote, snapPipeBin } from './qemu/guest.js';
import { chosenQemu } from './qemu/versions.js';

const MiB = 1024 * 1024;

interface DemoOptions {
  live: boolean;
  keep: boolean;
  memMiB: number;
  fillMiB: number;
  qemu: string | undefined;
}

class DemoError extends Error {}

function parseArgs(argv: string[]): DemoOptions {
  const opts: DemoOptions = { live: false, keep: false, memMiB: 384, fillMiB: 100, qemu: undefined };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const number = (name: string): number => {
      const v = Number(argv[++i]);
      if (!Number.isInteger(v) || v <= 0) throw new DemoError(`${name} needs a positive integer (MiB)`);
      return v;
    };
    if (arg === '--') continue; // npm run demo -- ARGS passes it on
    else if (arg === '--live') opts.live = true;
    else if (arg === '--keep') opts.keep = true;
    else if (arg === '--mem') opts.memMiB = number('--mem');
    else if (arg === '--fill') opts.fillMiB = number('--fill');
    else if (arg === '--qemu' && i + 1 < argv.length) opts.qemu = argv[++i];
    else if (arg.startsWith('--qemu=')) opts.qemu = arg.slice('--qemu='.length);
    else throw new DemoError(`unknown argument '${arg}' (use --live, --keep, --mem MiB, --fill MiB, --qemu PATH|10.0|5.2)`);
  }
  if (opts.memMiB < 128) throw new DemoError('--mem must be at least 128 MiB');
  if (opts.fillMiB > opts.memMiB - 96) throw new DemoError(`--fill must be at most --mem minus 96 (${opts.memMiB - 96})`);
  return opts;
}

function say(line = ''): void {
  process.stdout.write(line + '\n');
}

function indent(text: string): string {
  return text
    .trimEnd()
    .split('\n')
    .map((l) => `     ${l}`)
    .join('\n');
}

function seconds(ms: number): string {
  return `${(ms / 1000).toFixed(ms < 10_000 ? 2 : 1)} s`;
}

/** The last line snap-pipe wrote to QEMU's stderr (exec: children share it), for failure messages. */
function snapPipeComplaint(guest: Guest): string {
  const lines = guest
    .stderrText()
    .split('\n')
    .filter((l) => /snap-pipe/.test(l));
  return lines.length > 0 ? ` (${lines[lines.length - 1].trim()})` : '';
}

async function main(): Promise<void> {
  // Output piped into a pager or `head` that exits early must not stop the demo before it cleans up.
  process.stdout.on('error', () => undefined);
  const opts = parseArgs(process.argv.slice(2));
  // Prerequisites: each throws one clear line naming what to install or run.
  const qemu = chosenQemu(opts.qemu);
  const qemuImg = qemu.img;
  guestFiles();
  const bin = snapPipeBin();

  const dir = mkdtempSync(join(tmpdir(), 'snap-pipe-demo-'));
  const img = join(dir, 'guest.qcow2');
  let guest: Guest | null = null;
  let dest: Guest | null = null;
  const cleanup = async (): Promise<void> => {
    await guest?.quit().catch(() => undefined);
    await dest?.quit().catch(() => undefined);
    guest = dest = null;
    if (!opts.keep) rmSync(dir, { recursive: true, force: true });
  };
  const onSignal = (): void => {
    process.stderr.write('demo: interrupted, cleaning up\n');
    void cleanup().finally(() => process.exit(130));
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);

  try {
    say(`snap-pipe demo, with ${qemu.label} (${qemu.system})`);
    say();
    say(`1. Booting a ${opts.memMiB} MiB guest under QEMU (TCG) that fills ${opts.fillMiB} MiB of its RAM with random data…`);
    const t0 = Date.now();
    guest = await Guest.start({ qemu, name: 'demo', memMiB: opts.memMiB, fillMiB: opts.fillMiB });
    const ready = await guest.waitReady(180_000);
    say(`   ready after ${seconds(Date.now() - t0)}: "${ready.trim()}"`);
    const tick = await guest.waitTick(30_000);
    say(`   the guest is running: "${tick.trim()}"`);
    say();

    const uri = `exec:${shellQuote(bin)} save ${shellQuote(img)}`;
    await guest.unthrottle();
    if (opts.live) {
      say('2. Taking a background snapshot while the guest keeps running, with QEMU writing the migration');
      await guest.setCapabilities({ 'background-snapshot': true });
    } else {
      say('2. Pausing the guest and migrating it');
      await guest.stop();
    }
    say(`   migrate "${uri}"`);
    const lastSaved = lastTick(guest.consoleText());
    const t1 = Date.now();
    await guest.migrate(uri);
    const status = await guest.waitMigration(300_000);
    const saveMs = Date.now() - t1;
    if (status.status !== 'completed') {
      throw new DemoError(`the save ${status.status}: ${status['error-desc'] ?? 'no reason given'}${snapPipeComplaint(guest)}`);
    }
    const streamBytes = status.ram?.transferred ?? 0;
    const imageBytes = statSync(img).size;
    say(
      `   saved ${opts.memMiB} MiB of guest RAM (a ${(streamBytes / MiB).toFixed(0)} MiB stream) in ${seconds(saveMs)}: ` +
        `${((opts.memMiB * 1000) / saveMs).toFixed(0)} MiB/s of guest RAM; image ${(imageBytes / MiB).toFixed(1)} MiB`,
    );
    if (opts.live) {
      const after = await guest.waitTick(30_000);
      say(`   the guest never stopped: "${after.trim()}"`);
    }
    say();

    say(`3. snap-pipe info ${img}`);
    const info = spawnSync(process.execPath, [bin, 'info', img], { encoding: 'utf8', timeout: 60_000 });
    if (info.status !== 0) {
      throw new DemoError(`snap-pipe info failed: ${(info.stderr || info.error?.message || '').trim().split('\n')[0]}`);
    }
    say(indent(info.stdout));
    say();

    say(`4. qemu-img check ${img}`);
    const check = spawnSync(qemuImg, ['check', img], { encoding: 'utf8', timeout: 120_000, env: { ...process.env, ...qemu.env } });
    if (check.status !== 0) {
      throw new DemoError(`qemu-img check found problems: ${(check.stdout + check.stderr).trim().split('\n').pop()}`);
    }
    say(indent(check.stdout));
    say();

    say('5. Restoring into a fresh QEMU started with -incoming defer');
    dest = await Guest.start({ qemu, name: 'demo-restore', memMiB: opts.memMiB, fillMiB: opts.fillMiB, incoming: true });
    await dest.unthrottle();
    const loadUri = `exec:${shellQuote(bin)} load ${shellQuote(img)}`;
    say(`   migrate_incoming "${loadUri}"`);
    const t2 = Date.now();
    await dest.migrateIncoming(loadUri);
    const restored = await dest.waitMigration(300_000);
    const loadMs = Date.now() - t2;
    if (restored.status !== 'completed') {
      throw new DemoError(`the restore ${restored.status}: ${restored['error-desc'] ?? 'no reason given'}${snapPipeComplaint(dest)}`);
    }
    say(`   restored ${opts.memMiB} MiB of guest RAM in ${seconds(loadMs)} (${((opts.memMiB * 1000) / loadMs).toFixed(0)} MiB/s of guest RAM)`);
    if (!opts.live) {
      // The source is still paused where it was saved: its RAM and the restored RAM must be the same bytes.
      const a = join(dir, 'source.ram');
      const b = join(dir, 'restored.ram');
      await guest.pmemsave(0, opts.memMiB * MiB, a);
      await dest.pmemsave(0, opts.memMiB * MiB, b);
      const diff = await firstDifference(a, b, opts.memMiB * MiB, [LEGACY_WINDOW]);
      if (diff >= 0) throw new DemoError(`restored RAM differs from the saved guest at 0x${diff.toString(16)}`);
      say(`   guest RAM after restore equals the saved guest's, byte for byte (pmemsave of both, ${opts.memMiB} MiB)`);
      rmSync(a);
      rmSync(b);
    }
    const tickFrom = dest.consoleBytes();
    await dest.cont();
    const goesOn = await dest.waitTick(30_000, tickFrom);
    say(`   the restored guest goes on: its last tick before the save began was ${lastSaved}, now "${goesOn.trim()}"`);
    await dest.quit();
    dest = null;
    say();

    await guest.quit();
    guest = null;
    if (opts.keep) say(`Done. The image is kept at ${img}`);
    else say('Done. QEMU stopped and temporary files removed.');
  } finally {
    await cleanup();
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}

/** The number of the last SNAPPIPE-TICK line in a console log. */
function lastTick(console: string): string {
  const m = [...console.matchAll(/SNAPPIPE-TICK (\d+)/g)];
  return m.length > 0 ? m[m.length - 1][1] : 'none';
}

main().then(
  () => process.exit(0),
  (err: unknown) => {
    const message = err instanceof Error ? err.message : String(err);
    process.stderr.write(`demo failed: ${message.split('\n')[0]}\n`);
    process.exit(1);
  },
);
