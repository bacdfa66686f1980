// Single-producer single-consumer queue of Int32 values over shared memory (free-running head/tail counters,
// power-of-two capacity). Used for the chunk slots passed between coalescer and writer.
import { isPowerOfTwo } from './layout.js';
import { publish, waitChange, WaitClock } from './wait.js';

export class IntQueueProducer {
  private head: number;
  private readonly mask: number;
  readonly waits = new WaitClock();

  constructor(
    private readonly ctrl: Int32Array,
    private readonly headIdx: number,
    private readonly tailIdx: number,
    private readonly entries: Int32Array,
  ) {
    if (!isPowerOfTwo(entries.length)) throw new RangeError(`queue capacity ${entries.length} is not a power of two`);
    this.mask = entries.length - 1;
    this.head = Atomics.load(ctrl, headIdx) >>> 0;
  }

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

export class IntQueueConsumer {
  private tail: number;
  private readonly mask: number;
  readonly waits = new WaitClock();

  constructor(
    private readonly ctrl: Int32Array,
    private readonly headIdx: number,
    private readonly tailIdx: number,
    private readonly entries: Int32Array,
  ) {
    if (!isPowerOfTwo(entries.length)) throw new RangeError(`queue capacity ${entries.length} is not a power of two`);
    this.mask = entries.length - 1;
    this.tail = Atomics.load(ctrl, tailIdx) >>> 0;
  }

  /** Values ready without waiting. */
  available(): number {
    return (Atomics.load(this.ctrl, this.headIdx) - this.tail) >>> 0;
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
