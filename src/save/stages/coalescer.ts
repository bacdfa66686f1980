// Coalescer stage: turns the reader's page descriptors into filled 1 MiB chunk slots for the writer, releasing
// input ring space as pages are copied out.
import { Coalescer, type CoalesceCounters } from './coalesce.js';
import { DescriptorConsumer } from '../ring/descriptors.js';
import { IntQueueConsumer, IntQueueProducer } from '../ring/queue.js';
import {
  CTRL,
  DESC_BLOCK,
  DESC_KIND,
  DESC_PAGE,
  DESC_POS,
  END_OF_CHUNKS,
  KIND_END,
  KIND_PAGE,
  KIND_RELEASE,
  KIND_SETUP,
  KIND_ZERO,
  type SaveShared,
} from '../ring/layout.js';
import { publish } from '../ring/wait.js';
import { exposeStage, outcome, stageReadyAtMs, type Outcome } from './rpc.js';
import { saveViews } from './memory.js';

export interface CoalescerResult {
  counters: CoalesceCounters;
  sent: Uint8Array[];
  data: Uint8Array[];
  /** Waiting for descriptors (the reader is behind). */
  upstreamWaitMs: number;
  /** Waiting for a free slot (the writer is behind). */
  downstreamWaitMs: number;
  busyMs: number;
  /** When the stage's modules had loaded (epochMs()). */
  readyAtMs: number;
}

function run(shared: SaveShared, maxOpen: number): CoalescerResult {
  const t0 = performance.now();
  const v = saveViews(shared);
  const descs = new DescriptorConsumer(v.ctrl, v.desc);
  const free = new IntQueueConsumer(v.ctrl, CTRL.FREE_HEAD, CTRL.FREE_TAIL, v.freeQueue);
  const filled = new IntQueueProducer(v.ctrl, CTRL.FILL_HEAD, CTRL.FILL_TAIL, v.fillQueue);
  // The park pool's size comes with the ring's (ringSizes): memory stays bounded by the ring size.
  const co = new Coalescer(v.slots, v.slotHeaders, { acquire: () => free.pop(), publish: (s) => filled.push(s) }, maxOpen, v.sizes.parkPages, v.park);
  const recs = descs.recs;
  const input = v.input;
  const mask = input.length - 1;
  let released = Atomics.load(v.ctrl, CTRL.IN_RELEASED);
  for (let done = false; !done; ) {
    const n = descs.waitBatch();
    let release = released;
    for (let i = 0; i < n; i++) {
      const r = descs.at(i);
      // Read for every record: the release marks come only once the input ring has filled, long after V8 optimized
      // this loop, and a load first reached then would throw the optimized code away.
      const pos = recs[r + DESC_POS];
      switch (recs[r + DESC_KIND]) {
        case KIND_PAGE:
          co.page(recs[r + DESC_BLOCK], recs[r + DESC_PAGE], input, pos, mask);
          release = (pos + 4096) | 0;
          break;
        case KIND_ZERO:
          co.zero(recs[r + DESC_BLOCK], recs[r + DESC_PAGE]);
          break;
        case KIND_RELEASE:
          release = pos;
          break;
        case KIND_SETUP:
          co.setup(v.blocks, Atomics.load(v.ctrl, CTRL.BLOCK_COUNT));
          break;
        case KIND_END:
          done = true;
          break;
        default:
          throw new Error(`descriptor kind ${recs[r + DESC_KIND]} is not known`);
      }
    }
    descs.consumed(n);
    co.flushCopies();
    if (release !== released) {
      released = release;
      publish(v.ctrl, CTRL.IN_RELEASED, released);
    }
  }
  co.finish();
  filled.push(END_OF_CHUNKS);
  return {
    counters: co.counters,
    sent: co.sent,
    data: co.data,
    upstreamWaitMs: descs.waits.ms,
    downstreamWaitMs: free.waits.ms + filled.waits.ms,
    busyMs: performance.now() - t0 - descs.waits.ms - free.waits.ms - filled.waits.ms,
    readyAtMs: stageReadyAtMs,
  };
}

const api = {
  run(shared: SaveShared, maxOpen: number): Outcome<CoalescerResult> {
    return outcome(() => run(shared, maxOpen));
  },
};
export type CoalescerApi = typeof api;
exposeStage(api);
