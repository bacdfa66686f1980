// Multifd channel stage: one thread per multifd channel of `save --listen --multifd-channels N`. Reads its channel's
// socket into the channel's own input ring (its Lane), decodes each packet (format/stream/multifd.ts) and publishes
// one descriptor per page: data pages by their position in the ring (copied once more, by the coalescer, into their
// chunk, as the main stream's pages are), zero pages by name, and KIND_SYNC after a SYNC packet's pages. When its
// pages take effect against the other channels' is the coalescer's business (sync points); this stage only reads.
import { SnapPipeError } from '../../errors.js';
import {
  decodeInit,
  decodePacketHeader,
  decodeRamPacket,
  MULTIFD_HEADER_BYTES,
  MULTIFD_INIT_BYTES,
  MULTIFD_WIRE_ANY,
  type MultifdRamPacket,
} from '../../format/stream/multifd.js';
import { shown } from '../../format/stream/parser.js';
import { PAGE_BYTES } from '../../format/units.js';
import { DescriptorProducer } from '../ring/descriptors.js';
import { InputRing } from '../ring/input.js';
import { BLOCK_F64S, BLOCK_NAME_UNITS, BLOCK_PAGES, channelLane, CTRL, KIND_END, KIND_PAGE, KIND_SYNC, KIND_ZERO, type SaveShared } from '../ring/layout.js';
import { waitChange, WaitClock } from '../ring/wait.js';
import { channelViews, saveViews, type SaveViews } from './memory.js';
import { FdInput } from './fd-input.js';
import { exposeStage, outcome, stageReadyAtMs, type Outcome } from './rpc.js';

export interface ChannelResult {
  channel: number;
  packets: number;
  syncs: number;
  dataPages: number;
  zeroPages: number;
  /** Bytes read from the channel's socket (the init message included). */
  bytes: number;
  /** Time blocked reading the socket (waiting on QEMU). */
  sourceWaitMs: number;
  /** Time blocked on a full ring (waiting on the coalescer) or on the main channel's RAM setup. */
  downstreamWaitMs: number;
  busyMs: number;
  readyAtMs: number;
}

/** The RAM blocks by name, once the main channel's reader has published its setup (packets name their block). */
class BlockNames {
  private byName: Map<string, { index: number; pages: number }> | undefined;
  readonly waits = new WaitClock();
  constructor(private readonly v: SaveViews) {}

  lookup(name: string): { index: number; pages: number } | undefined {
    this.byName ??= this.load();
    return this.byName.get(name);
  }

  private load(): Map<string, { index: number; pages: number }> {
    const { ctrl, blocks, blockNames } = this.v;
    while (Atomics.load(ctrl, CTRL.SETUP_DONE) === 0) waitChange(ctrl, CTRL.SETUP_DONE, 0, this.waits);
    const map = new Map<string, { index: number; pages: number }>();
    const count = Atomics.load(ctrl, CTRL.BLOCK_COUNT);
    for (let b = 0; b < count; b++) {
      const at = b * BLOCK_NAME_UNITS;
      const name = String.fromCharCode(...blockNames.subarray(at + 1, at + 1 + blockNames[at]));
      map.set(name, { index: b, pages: blocks[b * BLOCK_F64S + BLOCK_PAGES] });
    }
    return map;
  }
}

/** Publishes a RAM packet's pages: data pages as they lie in the ring, then its zero pages. */
function publishPages(p: MultifdRamPacket, ring: InputRing, names: BlockNames, producer: DescriptorProducer): void {
  const pages = p.normalPages + p.zeroPages;
  if (pages === 0) return;
  const block = names.lookup(p.block);
  if (block === undefined) throw new SnapPipeError('BAD_STREAM', `a packet for RAM block ${shown(p.block)}, which the main channel's RAM setup never named`);
  for (let i = 0; i < pages; i++) {
    const page = p.offsets[i] / PAGE_BYTES;
    if (page >= block.pages) {
      throw new SnapPipeError('BAD_STREAM', `a page at offset ${p.offsets[i]} beyond RAM block ${shown(p.block)} (${block.pages * PAGE_BYTES} bytes)`);
    }
    if (i < p.normalPages) producer.push(KIND_PAGE, block.index, page, ring.skipInPlace(PAGE_BYTES, 'page data'));
    else producer.push(KIND_ZERO, block.index, page, 0);
  }
}

function run(shared: SaveShared, channel: number, fd: number, channels: number): ChannelResult {
  const t0 = performance.now();
  const v = saveViews(shared);
  const lane = channelLane(channel);
  const cv = channelViews(shared, channel);
  const producer = new DescriptorProducer(v.ctrl, cv.desc, lane);
  const input = new FdInput(v.ctrl, fd);
  const ring = new InputRing(cv.input, v.ctrl, input, producer, lane);
  const names = new BlockNames(v);
  const bytesRead = new Float64Array(shared.channelBytes);
  const result = { channel, packets: 0, syncs: 0, dataPages: 0, zeroPages: 0 };
  try {
    const init = decodeInit(ring.take(MULTIFD_INIT_BYTES, 'the init message'), channels);
    if (init.channelId !== channel) throw new SnapPipeError('BAD_STREAM', `its init message names channel ${init.channelId}`);
    // The wire of any QEMU from 4.0 to 10.2: the main channel does not say which QEMU sends it (docs/MULTIFD.md).
    while (ring.ensure(1)) {
      const header = decodePacketHeader(ring.peek(MULTIFD_HEADER_BYTES, 'a packet header'), MULTIFD_WIRE_ANY);
      if (header.kind === 'device-state') {
        throw new SnapPipeError('UNSUPPORTED', 'a device-state packet (a VFIO device with x-migration-multifd-transfer): snap-pipe stores RAM only over multifd; turn that device property off');
      }
      const packet = decodeRamPacket(ring.take(header.packetBytes, 'a RAM packet'), MULTIFD_WIRE_ANY);
      publishPages(packet, ring, names, producer);
      result.packets++;
      result.dataPages += packet.normalPages;
      result.zeroPages += packet.zeroPages;
      if (packet.sync) {
        producer.push(KIND_SYNC, 0, 0, 0);
        result.syncs++;
      }
      bytesRead[channel] = ring.consumedBytes;
    }
  } catch (err) {
    if (err instanceof SnapPipeError) throw new SnapPipeError(err.code, `multifd channel ${channel}: ${err.message}`);
    throw err;
  }
  producer.push(KIND_END, 0, 0, 0);
  producer.flush();
  const downstreamWaitMs = producer.waits.ms + names.waits.ms;
  return {
    ...result,
    bytes: ring.consumedBytes,
    sourceWaitMs: input.waitMs,
    downstreamWaitMs,
    busyMs: performance.now() - t0 - input.waitMs - downstreamWaitMs,
    readyAtMs: stageReadyAtMs,
  };
}

const api = {
  /** Reads multifd channel `channel` (of `channels`) from the accepted socket `fd` until QEMU closes it. */
  run(shared: SaveShared, channel: number, fd: number, channels: number): Outcome<ChannelResult> {
    return outcome(() => run(shared, channel, fd, channels));
  },
};
export type ChannelApi = typeof api;
exposeStage(api);
