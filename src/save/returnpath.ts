// The save's side of QEMU's return path, run by the main thread, which alone writes to stdout (or, with save
// --listen, to the stream's socket: QEMU's return path runs back over the same connection).
//
// With the return-path capability, QEMU opens a return path on the exec: child's stdout (OPEN_RETURN_PATH, then
// PING 1, right after the configuration: migration.c migration_thread) and, at the end of the migration, waits for
// the destination's SHUT before it calls the migration completed: SHUT(0) completes it, SHUT(non-zero) or the pipe
// closing without a SHUT fails it (7.2 migration.c await_return_path_close_on_source and source_return_path_thread;
// 10.x close_return_path_on_source). So save answers SHUT(0) only once the image is complete and on disk, and
// SHUT(1) when the save failed: QEMU's "completed" then means the snapshot is durable.
//
// QEMU keeps the pipe open while it waits for SHUT, so the stream's end is not an end of input: the reader stops
// after the VM description (format/stream/parser.ts). If that end never comes (a source that suppresses the VM
// description), nothing would ever answer: a bound on the quiet after the device state began fails the save.
//
// A source of 8.1 or later with switchover-ack waits for SWITCHOVER_ACK before switching over a running VM
// (migration.c migration_can_switchover); a destination sends it as the return path opens. A 7.2 source fails on
// that message (it knows no type 7), and the stream does not say which QEMU sent it, only the machine type: save
// sends it when the machine type is 8.1 or later, which only a QEMU of 8.1 or later can run, or when told to
// (--switchover-ack: a QEMU of 8.1 or later running an older machine type with switchover-ack on).
import { SnapPipeError } from '../errors.js';
import { STDOUT_FD, writeAll } from '../output.js';
import { CTRL, RP_NONE, RP_OPEN_ACK } from './ring/layout.js';
import { encodePong, encodeShut, encodeSwitchoverAck } from '../format/stream/returnpath.js';

export class SaveReturnPath {
  private opened = false;
  private pingsAnswered = 0;
  private lastWritten = 0;
  private quietSinceMs = 0;

  /**
   * `endTimeoutMs`: how long the input may stay quiet in the device state before the save gives up on its end.
   * `switchoverAck`: send SWITCHOVER_ACK whatever the machine type says.
   */
  constructor(
    private readonly ctrl: Int32Array,
    private readonly endTimeoutMs: number,
    private readonly switchoverAck: boolean,
    private readonly out = STDOUT_FD,
  ) {}

  get open(): boolean {
    return this.opened;
  }

  /**
   * Answers what the reader has seen since the last call (SWITCHOVER_ACK when the path opens, a PONG per PING), and
   * returns an error once the device state has been quiet for longer than the bound. Called periodically.
   */
  poll(nowMs: number): SnapPipeError | undefined {
    return this.answer() ? this.overdue(nowMs) : undefined;
  }

  /** Writes the answers not written yet; false while no return path is open. */
  private answer(): boolean {
    const state = Atomics.load(this.ctrl, CTRL.RETURN_PATH);
    if (state === RP_NONE) return false;
    if (!this.opened) {
      this.opened = true;
      if (state === RP_OPEN_ACK || this.switchoverAck) writeAll(this.out, encodeSwitchoverAck());
    }
    const pings = Atomics.load(this.ctrl, CTRL.PINGS);
    for (; this.pingsAnswered < pings; this.pingsAnswered++) writeAll(this.out, encodePong(Atomics.load(this.ctrl, CTRL.PING_VALUE) >>> 0));
    return true;
  }

  private overdue(nowMs: number): SnapPipeError | undefined {
    if (Atomics.load(this.ctrl, CTRL.IN_DEVICE_STATE) === 0) return undefined;
    const written = Atomics.load(this.ctrl, CTRL.IN_WRITTEN);
    if (this.quietSinceMs === 0 || written !== this.lastWritten) {
      this.lastWritten = written;
      this.quietSinceMs = nowMs;
      return undefined;
    }
    if (nowMs - this.quietSinceMs < this.endTimeoutMs) return undefined;
    return new SnapPipeError(
      'TRUNCATED',
      `no end of the stream ${this.endTimeoutMs / 1000} s after its last byte: with QEMU's return path open the stream ` +
        'must end with a VM description (QEMU keeps the pipe open until snap-pipe answers)',
    );
  }

  /** The image is complete and on disk: QEMU may call the migration completed. */
  finished(): void {
    if (this.answer()) writeAll(this.out, encodeShut(0));
  }

  /** The save failed: QEMU fails the migration (best effort: QEMU may be gone, and exiting closes the path too). */
  failed(): void {
    try {
      if (this.answer()) writeAll(this.out, encodeShut(1));
    } catch {
      // the process exits next, which closes the return path: QEMU fails the migration on that as well
    }
  }
}
