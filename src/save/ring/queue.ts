// Single-producer single-consumer queue of Int32 values over shared memory (free-running head/tail counters,
// power-of-two capacity). Used for the chunk slots passed between coalescer and writer.
import { isPowerOfTwo } from './layout.js';
import { publish, waitChange, WaitClock } from './wait.js';

/** What both ends share: the control words, the entries, and the mask of a power-of-two capacity. */
abstract class IntQueueEnd {
  protected readonly mask: number;
  readonly waits = new WaitClock();

  constructor(
    protected readonly ctrl: Int32Array,
    protected readonly headIdx: number,
    protected readonly tailIdx: number,
    protected readonly entries: Int32Array,
  ) {
    if (!isPowerOfTwo(entries.length)) throw new RangeError(`queue capacity ${entries.length} is not a power of two`);
    this.mask = entries.length - 1;
  }
}

export class IntQueueProducer extends IntQueueEnd {
  private head = Atomics.load(this.ctrl, this.headIdx) >>> 0;

  push(value: number): void {
    let tail = Atomics.load(this.ctrl, this.tailIdx) >>> 0;
    while (((this.head - tail) >>> 0) >= this.entries.length) {
      tail = waitChange(this.ctrl, this.tailIdx, tail | 0, this.waits) >>> 0;
    }
    this.entries[this.head & this.mask] = value;
    this.head = (this.head + 1) >>> 0;
    publish(this.ctrl, this.headIdx, this.head);
  }
}

export class IntQueueConsumer extends IntQueueEnd {
  private tail = Atomics.load(this.ctrl, this.tailIdx) >>> 0;

  /** Values ready without waiting. */
  available(): number {
    return (Atomics.load(this.ctrl, this.headIdx) - this.tail) >>> 0;
  }

  /**
   * Waits up to timeoutMs for a value to become available (counted as waiting); true when one is. For a consumer that
   * also has other things to watch (the writer: its completions).
   */
  waitAvailable(timeoutMs: number): boolean {
    const head = Atomics.load(this.ctrl, this.headIdx);
    if (((head >>> 0) - this.tail) >>> 0) return true;
    const t0 = performance.now();
    Atomics.wait(this.ctrl, this.headIdx, head, timeoutMs);
    this.waits.ms += performance.now() - t0;
    return this.available() > 0;
  }

  pop(): number {
    let head = Atomics.load(this.ctrl, this.headIdx) >>> 0;
    while (head === this.tail) {
      head = waitChange(this.ctrl, this.headIdx, head | 0, this.waits) >>> 0;
    }
    const v = this.entries[this.tail & this.mask];
    this.tail = (this.tail + 1) >>> 0;
    publish(this.ctrl, this.tailIdx, this.tail);
    return v;
  }
}
