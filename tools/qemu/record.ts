// Records a real QEMU migration stream to a file (`exec:cat > FILE`), for the stream-parser tests and for perf:
// boots a guest, waits for READY, then either stops it and migrates (a plain precopy of a stopped VM) or takes a
// background snapshot of the running guest. Optionally dumps guest RAM with pmemsave first (stopped mode only).
import { statSync } from 'node:fs';
import { Guest, shellQuote, type MigrationStatus } from './guest.js';
import type { Qemu } from './versions.js';

export type RecordMode = 'stopped' | 'background';

export interface RecordOptions {
  memMiB: number;
  fillMiB: number;
  mode: RecordMode;
  /** Where the stream goes (overwritten). */
  outPath: string;
  /**
   * Stopped mode only: also write guest-physical memory [0, memMiB MiB) here with pmemsave before migrating.
   * For guests up to 3 GiB this is pc.ram byte for byte except the legacy window 0xA0000-0x100000 (VGA, ROMs).
   */
  pmemsavePath?: string;
  /** Guest name (default `record-<mode>`). */
  name?: string;
  /** Bound on boot plus migration (default 300 s). */
  timeoutMs?: number;
  /** Extra migration capabilities to set (besides background-snapshot in background mode). */
  capabilities?: Record<string, boolean>;
  /** The QEMU to record from (default: the machine's own). */
  qemu?: Qemu;
}

export interface RecordResult {
  outPath: string;
  streamBytes: number;
  pmemsavePath?: string;
  /** query-migrate's final answer (status 'completed'). */
  migration: MigrationStatus;
  /** Milliseconds from spawning QEMU to SNAPPIPE-READY. */
  bootMs: number;
  /** Milliseconds from `migrate` to completion as seen by polling. */
  migrateMs: number;
}

export async function recordStream(opts: RecordOptions): Promise<RecordResult> {
  if (opts.pmemsavePath && opts.mode !== 'stopped') {
    throw new Error('recordStream: pmemsavePath needs mode "stopped" (a running guest changes under pmemsave)');
  }
  const timeoutMs = opts.timeoutMs ?? 300_000;
  const deadline = Date.now() + timeoutMs;
  const remaining = (): number => Math.max(1_000, deadline - Date.now());

  const t0 = Date.now();
  const guest = await Guest.start({ qemu: opts.qemu, name: opts.name ?? `record-${opts.mode}`, memMiB: opts.memMiB, fillMiB: opts.fillMiB });
  try {
    await guest.waitReady(remaining());
    const bootMs = Date.now() - t0;
    await guest.unthrottle();
    const caps: Record<string, boolean> = { ...(opts.capabilities ?? {}) };
    if (opts.mode === 'background') caps['background-snapshot'] = true;
    if (Object.keys(caps).length > 0) await guest.setCapabilities(caps);
    if (opts.mode === 'stopped') {
      await guest.stop();
      if (opts.pmemsavePath) await guest.pmemsave(0, opts.memMiB * 1024 * 1024, opts.pmemsavePath, remaining());
    }
    const t1 = Date.now();
    await guest.migrate(`exec:cat > ${shellQuote(opts.outPath)}`);
    const migration = await guest.waitMigration(remaining());
    const migrateMs = Date.now() - t1;
    if (migration.status !== 'completed') {
      throw guest.failure(`recording migration ${migration.status}: ${migration['error-desc'] ?? 'no error-desc'}`);
    }
    return {
      outPath: opts.outPath,
      streamBytes: statSync(opts.outPath).size,
      pmemsavePath: opts.pmemsavePath,
      migration,
      bootMs,
      migrateMs,
    };
  } finally {
    await guest.quit();
  }
}
