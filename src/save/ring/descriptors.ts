// The descriptor ring from reader to coalescer: 4 Int32 per record (kind, block, page, input position).
// The producer batches: records become visible when flush() publishes DESC_HEAD, which the reader does before
// every read that may block, so the coalescer works on one batch while the reader fetches the next.
import {
  CTRL,
  DESC_BLOCK,
  DESC_INTS,
  DESC_KIND,
  DESC_PAGE,
  DESC_POS,
  isPowerOfTwo,
  KIND_RELEASE,
  MAIN_LANE,
  type Lane,
} from './layout.js';
import type { ReleaseChannel } from './input.js';
import { publish, waitChange, WaitClock } from './wait.js';

export class DescriptorProducer implements ReleaseChannel {
  private head: number;
  private published: number;
  private readonly mask: number;
  /** The cursor last sent as a release mark (NaN: none yet; a cursor may be any int32). */
  private lastReleaseMark = NaN;
  /** Waiting for the coalescer: descriptor ring full, or input ring full. */
  readonly waits = new WaitClock();

  constructor(
    private readonly ctrl: Int32Array,
    private readonly recs: Int32Array,
    private readonly lane: Lane = MAIN_LANE,
  ) {
    const count = recs.length / DESC_INTS;
    if (!isPowerOfTwo(count)) throw new RangeError(`descriptor ring of ${count} records is not a power of two`);
    this.mask = count - 1;
    this.head = this.published = Atomics.load(ctrl, lane.descHead) | 0;
  }

  push(kind: number, block: number, page: number, pos: number): void {
    const cap = this.mask + 1;
    let tail = Atomics.load(this.ctrl, this.lane.descTail) | 0;
    if (((this.head - tail) | 0) >= cap) {
      this.flush();
      while (((this.head - tail) | 0) >= cap) {
        tail = waitChange(this.ctrl, this.lane.descTail, tail | 0, this.waits) | 0;
      }
    }
    const at = (this.head & this.mask) * DESC_INTS;
    this.recs[at + DESC_KIND] = kind;
    this.recs[at + DESC_BLOCK] = block;
    this.recs[at + DESC_PAGE] = page;
    this.recs[at + DESC_POS] = pos | 0;
    this.head = (this.head + 1) | 0;
  }

  flush(): void {
    if (this.head !== this.published) {
      this.published = this.head;
      publish(this.ctrl, this.lane.descHead, this.head);
      // For a coalescer reading several lanes (multifd), which waits on this one field for all of them.
      Atomics.add(this.ctrl, CTRL.DESC_BELL, 1);
      Atomics.notify(this.ctrl, CTRL.DESC_BELL);
    }
  }

  waitForSpace(cursor: number): void {
    const released = Atomics.load(this.ctrl, this.lane.inReleased);
    if (cursor !== this.lastReleaseMark) {
      this.lastReleaseMark = cursor;
      this.push(KIND_RELEASE, 0, 0, cursor);
    }
    this.flush();
    waitChange(this.ctrl, this.lane.inReleased, released, this.waits);
  }
}

export class DescriptorConsumer {
  private tail: number;
  private readonly mask: number;
  /** Waiting for the reader (the stream is the bottleneck, or parsing is). */
  readonly waits = new WaitClock();

  constructor(
    private readonly ctrl: Int32Array,
    readonly recs: Int32Array,
    private readonly lane: Lane = MAIN_LANE,
  ) {
    const count = recs.length / DESC_INTS;
    if (!isPowerOfTwo(count)) throw new RangeError(`descriptor ring of ${count} records is not a power of two`);
    this.mask = count - 1;
    this.tail = Atomics.load(ctrl, lane.descTail) | 0;
  }

  /** Waits for at least one record; returns how many are ready (read them with at(i), then call consumed(n)). */
  waitBatch(): number {
    let head = Atomics.load(this.ctrl, this.lane.descHead) | 0;
    while (head === this.tail) head = waitChange(this.ctrl, this.lane.descHead, head | 0, this.waits) | 0;
    return (head - this.tail) | 0;
  }

  /** Records published and not yet consumed (0 when none), without waiting. */
  ready(): number {
    return ((Atomics.load(this.ctrl, this.lane.descHead) | 0) - this.tail) | 0;
  }

  /** Int32 index of the i-th ready record. */
  at(i: number): number {
    return ((this.tail + i) & this.mask) * DESC_INTS;
  }

  consumed(n: number): void {
    this.tail = (this.tail + n) | 0;
    publish(this.ctrl, this.lane.descTail, this.tail);
  }
}
