// Reader stage: reads the migration stream from fd 0 straight into the input ring, parses it, and publishes one
// descriptor per RAM page record to the coalescer. Keeps the non-RAM parts and returns them at the end.
import { SnapPipeError } from '../../errors.js';
import { layoutBlocks } from '../../format/image/qcow2.js';
import { CLUSTER_BYTES, PAGE_BYTES } from '../../format/units.js';
import { enlargePipe } from '../../native/uring.js';
import { DescriptorProducer } from '../ring/descriptors.js';
import { InputRing } from '../ring/input.js';
import {
  BLOCK_F64S,
  BLOCK_NAME_UNITS,
  BLOCK_PAGES,
  BLOCK_VIRT_CLUSTER,
  CTRL,
  KIND_END,
  KIND_PAGE,
  KIND_SETUP,
  KIND_SYNC,
  KIND_ZERO,
  MAX_BLOCKS,
  RP_OPEN,
  RP_OPEN_ACK,
  type SaveShared,
} from '../ring/layout.js';
import { StreamParser, type ParsedBlock, type ParsedStream } from '../../format/stream/parser.js';
import { FdInput } from './fd-input.js';
import { exposeStage, outcome, stageReadyAtMs, type Outcome } from './rpc.js';
import { saveViews } from './memory.js';

export interface ReaderResult {
  parsed: ParsedStream;
  virtOffsetsBytes: number[];
  ramEndBytes: number;
  readCalls: number;
  /** Capacity of the stdin pipe after growing it (undefined: not a pipe, or it could not be grown). */
  pipeBytes: number | undefined;
  /** Time blocked reading stdin (waiting on QEMU). */
  sourceWaitMs: number;
  /** Time blocked on a full input or descriptor ring (waiting on the coalescer). */
  downstreamWaitMs: number;
  busyMs: number;
  /** When the stage's modules had loaded, and when the first bytes of the stream were read (epochMs()). */
  readyAtMs: number;
  firstReadAtMs: number;
}

/** Publishes the block table (page counts, first clusters, names) for the coalescer and the multifd channel stages. */
function publishBlocks(v: ReturnType<typeof saveViews>, blocks: ParsedBlock[], virtOffsetsBytes: number[]): void {
  blocks.forEach((b, i) => {
    v.blocks[i * BLOCK_F64S + BLOCK_PAGES] = b.lengthBytes / PAGE_BYTES;
    v.blocks[i * BLOCK_F64S + BLOCK_VIRT_CLUSTER] = virtOffsetsBytes[i] / CLUSTER_BYTES;
    // At most 255 code units: the stream gives a name's length in one byte (parser.ts parseBlockList).
    const at = i * BLOCK_NAME_UNITS;
    v.blockNames[at] = b.id.length;
    for (let c = 0; c < b.id.length; c++) v.blockNames[at + 1 + c] = b.id.charCodeAt(c);
  });
  Atomics.store(v.ctrl, CTRL.BLOCK_COUNT, blocks.length);
  Atomics.store(v.ctrl, CTRL.SETUP_DONE, 1);
  Atomics.notify(v.ctrl, CTRL.SETUP_DONE);
}

/**
 * `multifd`: the stream is the main channel of a multifd migration; its sync points go to the coalescer, which pairs
 * them with the channels' SYNC packets.
 */
function run(shared: SaveShared, inputFd: number, multifd: boolean): ReaderResult {
  const t0 = performance.now();
  const v = saveViews(shared);
  const producer = new DescriptorProducer(v.ctrl, v.desc);
  const pipeBytes = enlargePipe(inputFd);
  const input = new FdInput(v.ctrl, inputFd);
  const ring = new InputRing(v.input, v.ctrl, input, producer);
  let virtOffsetsBytes: number[] = [];
  let ramEndBytes = 0;
  const parser = new StreamParser(ring, {
    setup(blocks: ParsedBlock[]) {
      if (blocks.length > MAX_BLOCKS) {
        throw new SnapPipeError('UNSUPPORTED', `${blocks.length} RAM blocks (snap-pipe handles up to ${MAX_BLOCKS})`);
      }
      ({ virtOffsetsBytes, ramEndBytes } = layoutBlocks(blocks.map((b) => b.lengthBytes)));
      publishBlocks(v, blocks, virtOffsetsBytes);
      producer.push(KIND_SETUP, 0, 0, 0);
    },
    page(block, page, pos) {
      producer.push(KIND_PAGE, block, page, pos);
    },
    zero(block, page) {
      producer.push(KIND_ZERO, block, page, 0);
    },
    // QEMU's return path: the main thread, which owns stdout, answers what is published here (save/returnpath.ts).
    returnPathOpened(switchoverAck) {
      Atomics.store(v.ctrl, CTRL.RETURN_PATH, switchoverAck ? RP_OPEN_ACK : RP_OPEN);
    },
    ping(value) {
      Atomics.store(v.ctrl, CTRL.PING_VALUE, value | 0);
      Atomics.add(v.ctrl, CTRL.PINGS, 1);
    },
    deviceState() {
      Atomics.store(v.ctrl, CTRL.IN_DEVICE_STATE, 1);
    },
    sync() {
      producer.push(KIND_SYNC, 0, 0, 0);
    },
  }, { acceptReturnPath: true, multifd });
  const parsed = parser.parse();
  producer.push(KIND_END, 0, 0, 0);
  producer.flush();
  const totalMs = performance.now() - t0;
  return {
    parsed,
    virtOffsetsBytes,
    ramEndBytes,
    readCalls: ring.readCalls,
    pipeBytes,
    sourceWaitMs: input.waitMs,
    downstreamWaitMs: producer.waits.ms,
    busyMs: totalMs - input.waitMs - producer.waits.ms,
    readyAtMs: stageReadyAtMs,
    firstReadAtMs: input.firstDataAtMs,
  };
}

const api = {
  /**
   * `inputFd`: where the stream comes from (0, or the accepted socket of save --listen); `multifd`: it is the main
   * channel of a multifd migration.
   */
  run(shared: SaveShared, inputFd: number, multifd = false): Outcome<ReaderResult> {
    return outcome(() => run(shared, inputFd, multifd));
  },
};
export type ReaderApi = typeof api;
exposeStage(api);
