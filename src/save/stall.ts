// With --listen, the save's peer is whoever connected to its socket, and a peer that stops sending must not hold the
// socket and the image for good. The watch polls the pipeline's progress counters (bytes read on every lane, chunks
// taken by the writer) and fails the save when none has moved for the stall timeout. It runs while the stages run
// only: after the stream, finishing the image is the save's own work.
import { SnapPipeError } from '../errors.js';
import { CTRL, type Lane } from './ring/layout.js';

/** How often the counters are looked at. */
const STALL_POLL_MS = 1_000;

export interface StallWatch {
  /** Rejects when nothing moved for the timeout. */
  failed: Promise<never>;
  stop(): void;
}

export function watchStall(ctrl: Int32Array, lanes: Lane[], timeoutMs: number): StallWatch {
  const progress = () => lanes.reduce((n, l) => (n + Atomics.load(ctrl, l.inWritten)) | 0, Atomics.load(ctrl, CTRL.FILL_TAIL));
  let timer: NodeJS.Timeout | undefined;
  let last = progress();
  let movedAt = performance.now();
  const failed = new Promise<never>((_, reject) => {
    timer = setInterval(() => {
      const now = performance.now();
      const p = progress();
      if (p !== last) {
        last = p;
        movedAt = now;
        return;
      }
      if (now - movedAt < timeoutMs) return;
      clearInterval(timer);
      reject(new SnapPipeError('IO', `nothing came from QEMU and nothing was written for ${timeoutMs / 1000} s (--stall-timeout): the migration stalled`));
    }, STALL_POLL_MS);
  });
  failed.catch(() => undefined); // raced while the stages run; unraced afterwards
  return { failed, stop: () => clearInterval(timer) };
}
