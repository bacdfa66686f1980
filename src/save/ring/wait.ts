// Bounded waiting on shared counters. Every wait re-checks the FAILED field, so when one stage fails the others
// stop at their next wait instead of hanging; no thread ever spins.
import { CTRL, CTRL_LINE, FAIL_NONE } from './layout.js';

export const WAIT_SLICE_MS = 50;

/** Thrown in a stage that stops because another stage failed first; the supervisor reports the first error only. */
export class Aborted extends Error {
  constructor() {
    super('aborted: another stage failed');
    this.name = 'Aborted';
  }
}

/** Milliseconds a stage spent waiting on a neighbour, by reason. */
export class WaitClock {
  ms = 0;
  count = 0;
}

export function failed(ctrl: Int32Array): boolean {
  return Atomics.load(ctrl, CTRL.FAILED) !== FAIL_NONE;
}

/** Marks the pipeline failed (first caller wins) and wakes every waiter. */
export function signalFailure(ctrl: Int32Array, reason: number): boolean {
  const won = Atomics.compareExchange(ctrl, CTRL.FAILED, FAIL_NONE, reason) === FAIL_NONE;
  for (let idx = 0; idx < ctrl.length; idx += CTRL_LINE) Atomics.notify(ctrl, idx);
  return won;
}

/**
 * Blocks while ctrl[idx] still equals `seen`; returns the new value. Waits in slices so a failure elsewhere is
 * noticed within WAIT_SLICE_MS; `deadlineMs` (0 = none) bounds the whole wait.
 */
export function waitChange(ctrl: Int32Array, idx: number, seen: number, clock: WaitClock, deadlineMs = 0): number {
  let v = Atomics.load(ctrl, idx);
  if (v !== seen) return v;
  const t0 = performance.now();
  clock.count++;
  try {
    for (;;) {
      if (failed(ctrl)) throw new Aborted();
      Atomics.wait(ctrl, idx, seen, WAIT_SLICE_MS);
      v = Atomics.load(ctrl, idx);
      if (v !== seen) return v;
      if (deadlineMs > 0 && performance.now() - t0 > deadlineMs) {
        throw new Error(`wait on shared field ${idx} exceeded ${deadlineMs} ms`);
      }
    }
  } finally {
    clock.ms += performance.now() - t0;
  }
}

/** Publishes a counter and wakes its waiter. */
export function publish(ctrl: Int32Array, idx: number, value: number): void {
  Atomics.store(ctrl, idx, value | 0);
  Atomics.notify(ctrl, idx);
}
