import { describe, expect, it } from 'vitest';
import { DescriptorConsumer, DescriptorProducer } from '../../src/save/ring/descriptors.js';
import { CTRL, CTRL_INTS, DESC_INTS, DESC_PAGE, DESC_POS, FAIL_ERROR, KIND_PAGE } from '../../src/save/ring/layout.js';
import { alignedShared } from '../../src/native/memory.js';
import { IntQueueConsumer, IntQueueProducer } from '../../src/save/ring/queue.js';
import { Aborted, signalFailure, waitChange, WaitClock } from '../../src/save/ring/wait.js';

const ctrlOf = () => new Int32Array(new SharedArrayBuffer(CTRL_INTS * 4));

describe('IntQueue', () => {
  it('wraps around a 2-entry queue many times, alternating producer and consumer in one thread', () => {
    const ctrl = ctrlOf();
    const entries = new Int32Array(new SharedArrayBuffer(8));
    const p = new IntQueueProducer(ctrl, CTRL.FILL_HEAD, CTRL.FILL_TAIL, entries);
    const c = new IntQueueConsumer(ctrl, CTRL.FILL_HEAD, CTRL.FILL_TAIL, entries);
    for (let i = 0; i < 1000; i++) {
      p.push(i);
      p.push(-i - 1);
      expect(c.available()).toBe(2);
      expect(c.pop()).toBe(i);
      expect(c.pop()).toBe(-i - 1);
    }
    expect(c.available()).toBe(0);
  });

  it('counters keep working across the u32 wrap', () => {
    const ctrl = ctrlOf();
    Atomics.store(ctrl, CTRL.FILL_HEAD, -3);
    Atomics.store(ctrl, CTRL.FILL_TAIL, -3);
    const entries = new Int32Array(new SharedArrayBuffer(16));
    const p = new IntQueueProducer(ctrl, CTRL.FILL_HEAD, CTRL.FILL_TAIL, entries);
    const c = new IntQueueConsumer(ctrl, CTRL.FILL_HEAD, CTRL.FILL_TAIL, entries);
    for (let i = 0; i < 20; i++) {
      p.push(i);
      expect(c.pop()).toBe(i);
    }
  });

  it('a wait on an empty queue stops when another stage fails, instead of hanging', () => {
    const ctrl = ctrlOf();
    const c = new IntQueueConsumer(ctrl, CTRL.FILL_HEAD, CTRL.FILL_TAIL, new Int32Array(new SharedArrayBuffer(8)));
    signalFailure(ctrl, FAIL_ERROR);
    expect(() => c.pop()).toThrow(Aborted);
  });

  it('bounded waits give up at their deadline', () => {
    const ctrl = ctrlOf();
    expect(() => waitChange(ctrl, CTRL.DESC_HEAD, 0, new WaitClock(), 60)).toThrow(/exceeded 60 ms/);
  });

  it('waitAvailable: false after its timeout on an empty queue, true at once when a value is there, woken by a push from another thread', async () => {
    const ctrl = ctrlOf();
    const entries = new Int32Array(new SharedArrayBuffer(8));
    const c = new IntQueueConsumer(ctrl, CTRL.FILL_HEAD, CTRL.FILL_TAIL, entries);
    expect(c.waitAvailable(5)).toBe(false);
    expect(c.waits.ms).toBeGreaterThanOrEqual(4);
    new IntQueueProducer(ctrl, CTRL.FILL_HEAD, CTRL.FILL_TAIL, entries).push(7);
    expect(c.waitAvailable(60_000)).toBe(true);
    expect(c.pop()).toBe(7);
    // A push in another thread (as the coalescer does) ends a wait that would otherwise last a minute.
    const { Worker } = await import('node:worker_threads');
    const w = new Worker(
      `const { workerData: { ctrl, entries, head } } = require('node:worker_threads');
       const c = new Int32Array(ctrl), e = new Int32Array(entries);
       Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 50);
       e[1] = 9; Atomics.store(c, head, 2); Atomics.notify(c, head);`,
      { eval: true, workerData: { ctrl: ctrl.buffer, entries: entries.buffer, head: CTRL.FILL_HEAD } },
    );
    const t0 = performance.now();
    expect(c.waitAvailable(60_000)).toBe(true);
    expect(performance.now() - t0).toBeLessThan(30_000);
    expect(c.pop()).toBe(9);
    await w.terminate();
  });

  it('refuses a capacity that is not a power of two', () => {
    expect(() => new IntQueueProducer(ctrlOf(), CTRL.FILL_HEAD, CTRL.FILL_TAIL, new Int32Array(3))).toThrow(/power of two/);
  });
});

describe('descriptor ring', () => {
  it('records become visible only when flushed, in order, across wrap-around of a 4-record ring', () => {
    const ctrl = ctrlOf();
    const recs = new Int32Array(new SharedArrayBuffer(4 * DESC_INTS * 4));
    const p = new DescriptorProducer(ctrl, recs);
    const c = new DescriptorConsumer(ctrl, recs);
    let next = 0;
    for (let round = 0; round < 50; round++) {
      p.push(KIND_PAGE, 0, round * 3, round);
      p.push(KIND_PAGE, 0, round * 3 + 1, round);
      p.push(KIND_PAGE, 0, round * 3 + 2, round);
      expect(Atomics.load(ctrl, CTRL.DESC_HEAD)).toBe(round * 3); // not yet published
      p.flush();
      const n = c.waitBatch();
      expect(n).toBe(3);
      for (let i = 0; i < n; i++) {
        expect(c.recs[c.at(i) + DESC_PAGE]).toBe(next++);
        expect(c.recs[c.at(i) + DESC_POS]).toBe(round);
      }
      c.consumed(n);
    }
  });
});

describe('descriptor ring positions', () => {
  it('keep working across the int32 sign flip and the 2^32 wrap', () => {
    for (const start of [0x7fff_fffe, -2]) {
      const ctrl = ctrlOf();
      Atomics.store(ctrl, CTRL.DESC_HEAD, start);
      Atomics.store(ctrl, CTRL.DESC_TAIL, start);
      const recs = new Int32Array(new SharedArrayBuffer(4 * DESC_INTS * 4));
      const p = new DescriptorProducer(ctrl, recs);
      const c = new DescriptorConsumer(ctrl, recs);
      for (let i = 0; i < 12; i++) {
        p.push(KIND_PAGE, 0, i, i);
        p.push(KIND_PAGE, 0, i + 100, i);
        p.flush();
        expect(c.waitBatch()).toBe(2);
        expect(c.recs[c.at(0) + DESC_PAGE]).toBe(i);
        expect(c.recs[c.at(1) + DESC_PAGE]).toBe(i + 100);
        c.consumed(2);
      }
      expect(Atomics.load(ctrl, CTRL.DESC_HEAD)).toBe((start + 24) | 0);
    }
  });
});

describe('alignedShared', () => {
  it('rounds up to 64 KiB pages and is shareable', () => {
    expect(alignedShared(1).byteLength).toBe(65536);
    expect(alignedShared(65537).byteLength).toBe(131072);
    expect(alignedShared(1)).toBeInstanceOf(SharedArrayBuffer);
  });
});
