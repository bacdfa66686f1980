// Coalescer stage: turns the reader's page descriptors into filled 1 MiB chunk slots for the writer, releasing
// input ring space as pages are copied out.
import { SnapPipeError } from '../../errors.js';
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
  KIND_SYNC,
  KIND_ZERO,
  MAIN_LANE,
  channelLane,
  type Lane,
  type SaveShared,
} from '../ring/layout.js';
import { publish, waitChange, WaitClock } from '../ring/wait.js';
import { exposeStage, outcome, stageReadyAtMs, type Outcome } from './rpc.js';
import { channelViews, saveViews, type SaveViews } from './memory.js';

export interface CoalescerResult {
  counters: CoalesceCounters;
  sent: Uint8Array[];
  data: Uint8Array[];
  /** Multifd sync points passed (0 for one stream). */
  syncs: number;
  /** Waiting for descriptors (the reader is behind). */
  upstreamWaitMs: number;
  /** Waiting for a free slot (the writer is behind). */
  downstreamWaitMs: number;
  busyMs: number;
  /** When the stage's modules had loaded (epochMs()). */
  readyAtMs: number;
}

/** One lane as the coalescer drains it: its descriptors, its input ring, and how far that ring is released. */
interface LaneState {
  lane: Lane;
  /** 'main channel' or 'multifd channel N', for messages. */
  name: string;
  descs: DescriptorConsumer;
  input: Uint8Array;
  released: number;
  /** SYNC records consumed. */
  syncs: number;
  /** Its END record was consumed. */
  ended: boolean;
}

function laneState(ctrl: Int32Array, lane: Lane, name: string, desc: Int32Array, input: Uint8Array): LaneState {
  return { lane, name, descs: new DescriptorConsumer(ctrl, desc, lane), input, released: Atomics.load(ctrl, lane.inReleased), syncs: 0, ended: false };
}

/**
 * Hands the lane's next `n` published records to the coalescer, in order, stopping after a KIND_SYNC or KIND_END
 * record; returns that kind (0: none among them). Input ring space is released once the pages before it are copied.
 */
function consume(l: LaneState, n: number, co: Coalescer, v: SaveViews): number {
  const recs = l.descs.recs;
  const input = l.input;
  const mask = input.length - 1;
  let release = l.released;
  let stop = 0;
  let i = 0;
  for (; i < n && stop === 0; i++) {
    const r = l.descs.at(i);
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
      case KIND_SYNC:
      case KIND_END:
        stop = recs[r + DESC_KIND];
        break;
      default:
        throw new Error(`descriptor kind ${recs[r + DESC_KIND]} is not known`);
    }
  }
  l.descs.consumed(i);
  co.flushCopies();
  if (release !== l.released) {
    l.released = release;
    publish(v.ctrl, l.lane.inReleased, release);
  }
  if (stop === KIND_SYNC) l.syncs++;
  if (stop === KIND_END) l.ended = true;
  return stop;
}

/** One stream (no multifd): every record of the main lane in order, to its END. */
function drainOne(main: LaneState, co: Coalescer, v: SaveViews): void {
  while (consume(main, main.descs.waitBatch(), co, v) !== KIND_END);
}

/**
 * Multifd: a page re-sent in a later round must land after its earlier copy, and the two may come on different
 * channels. QEMU orders them by sync points: its source writes the main channel's sync record only after every
 * channel sent its SYNC packet (multifd-nocomp.c multifd_ram_flush_and_sync; 7.2 ram.c before each EOS), and its
 * destination's main thread waits at that record for each channel's SYNC (multifd.c multifd_recv_sync_main). Here
 * every lane (the main channel's and each multifd channel's) is read as its records come, up to its next SYNC
 * record; once every lane has reached it, the next interval begins. So every page before a lane's k-th SYNC is
 * applied before any page after any lane's k-th SYNC. Within one interval QEMU sends a page at most once (its
 * dirty-page scan visits each page once per round, and a round ends with a sync point), so order there does not
 * matter. Ends when the main lane has ended and every channel has reached the main lane's last sync point; returns
 * the number of sync points.
 */
function drainInSyncOrder(main: LaneState, channels: LaneState[], co: Coalescer, v: SaveViews): number {
  const lanes = [main, ...channels];
  const bellWaits = new WaitClock();
  let interval = 0;
  for (;;) {
    const bell = Atomics.load(v.ctrl, CTRL.DESC_BELL);
    let progressed = false;
    for (const l of lanes) {
      if (l.ended || l.syncs !== interval) continue;
      const n = l.descs.ready();
      if (n === 0) continue;
      consume(l, n, co, v);
      progressed = true;
    }
    if (main.ended && channels.every((c) => c.syncs === main.syncs)) break;
    const behind = lanes.find((l) => l.syncs === interval);
    if (behind === undefined) {
      interval++;
      continue;
    }
    if (behind.ended) throw closedEarly(behind, lanes, interval);
    if (!progressed) waitChange(v.ctrl, CTRL.DESC_BELL, bell, bellWaits);
  }
  channels.forEach(refuseLatePages);
  main.descs.waits.ms += bellWaits.ms;
  return main.syncs;
}

/** A lane ended at sync interval `interval` while another went on past it, or past the main lane's last one. */
function closedEarly(l: LaneState, lanes: LaneState[], interval: number): SnapPipeError {
  if (l === lanes[0]) {
    const ahead = lanes.find((c) => c.syncs > interval)!;
    return new SnapPipeError('BAD_STREAM', `${ahead.name} sent more SYNC packets (${ahead.syncs}) than the main channel has sync points (${interval})`);
  }
  return new SnapPipeError('TRUNCATED', `${l.name} closed before sync point ${interval + 1} of the main channel (QEMU's migration failed or was cancelled?)`);
}

/**
 * At the main channel's end every channel has sent its last SYNC; QEMU sends nothing after it (the final sync
 * follows the last page: ram.c ram_save_complete). Records already published past it are refused rather than
 * dropped. (A channel stays open until QEMU's cleanup, so what it might send later is not waited for.)
 */
function refuseLatePages(ch: LaneState): void {
  const n = ch.descs.ready();
  for (let i = 0; i < n; i++) {
    const kind = ch.descs.recs[ch.descs.at(i) + DESC_KIND];
    if (kind === KIND_PAGE || kind === KIND_ZERO || kind === KIND_SYNC) {
      throw new SnapPipeError('BAD_STREAM', `${ch.name} sent ${kind === KIND_SYNC ? 'a SYNC' : 'pages'} after the main channel's last sync point`);
    }
  }
}

function run(shared: SaveShared, maxOpen: number): CoalescerResult {
  const t0 = performance.now();
  const v = saveViews(shared);
  const free = new IntQueueConsumer(v.ctrl, CTRL.FREE_HEAD, CTRL.FREE_TAIL, v.freeQueue);
  const filled = new IntQueueProducer(v.ctrl, CTRL.FILL_HEAD, CTRL.FILL_TAIL, v.fillQueue);
  // The park pool's size comes with the ring's (ringSizes): memory stays bounded by the ring size.
  const co = new Coalescer(v.slots, v.slotHeaders, { acquire: () => free.pop(), publish: (s) => filled.push(s) }, maxOpen, v.sizes.parkPages, v.park);
  const main = laneState(v.ctrl, MAIN_LANE, 'the main channel', v.desc, v.input);
  const channels: LaneState[] = [];
  for (let c = 0; c < v.sizes.channels; c++) {
    const cv = channelViews(shared, c);
    channels.push(laneState(v.ctrl, channelLane(c), `multifd channel ${c}`, cv.desc, cv.input));
  }
  let syncs = 0;
  if (channels.length === 0) drainOne(main, co, v);
  else syncs = drainInSyncOrder(main, channels, co, v);
  co.finish();
  filled.push(END_OF_CHUNKS);
  const upstreamWaitMs = [main, ...channels].reduce((ms, l) => ms + l.descs.waits.ms, 0);
  return {
    counters: co.counters,
    sent: co.sent,
    data: co.data,
    syncs,
    upstreamWaitMs,
    downstreamWaitMs: free.waits.ms + filled.waits.ms,
    busyMs: performance.now() - t0 - upstreamWaitMs - free.waits.ms - filled.waits.ms,
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
