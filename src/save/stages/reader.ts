// Reader stage: reads the migration stream from fd 0 straight into the input ring, parses it, and publishes one
// descriptor per RAM page record to the coalescer. Keeps the non-RAM parts and returns them at the end.
import { readSync } from 'node:fs';
import { SnapPipeError, ioError } from '../../errors.js';
import { layoutBlocks } from '../../format/image/qcow2.js';
import { CLUSTER_BYTES } from '../../format/units.js';
import { enlargePipe } from '../../native/uring.js';
import { DescriptorProducer } from '../ring/descriptors.js';
import { InputRing, type ByteInput } from '../ring/input.js';
import {
  BLOCK_F64S,
  BLOCK_PAGES,
  BLOCK_VIRT_CLUSTER,
  CTRL,
  KIND_END,
  KIND_PAGE,
  KIND_SETUP,
  KIND_ZERO,
  MAX_BLOCKS,
  RP_OPEN,
  RP_OPEN_ACK,
  type SaveShared,
} from '../ring/layout.js';
import { Aborted, failed } from '../ring/wait.js';
import { StreamParser, type ParsedBlock, type ParsedStream } from '../../format/stream/parser.js';
import { epochMs, exposeStage, outcome, stageReadyAtMs, type Outcome } from './rpc.js';
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

/**
 * Reads the stream's fd (0, or the socket save --listen accepted) in large pieces; an EAGAIN (stdin left
 * non-blocking by a parent) waits briefly and retries. Checks the
 * pipeline's FAILED field before every read: once the save has failed or been aborted (the main thread then wakes a
 * read blocked on an empty pipe, see SavePipeline), the reader must not block in read(0) again, or the thread could
 * not be terminated and the process could not exit.
 */
export class StdinInput implements ByteInput {
  waitMs = 0;
  /** When the first bytes came (epochMs()), 0 before. */
  firstDataAtMs = 0;
  private readonly nap = new Int32Array(new SharedArrayBuffer(4));
  constructor(
    private readonly ctrl?: Int32Array,
    private readonly fd = 0,
  ) {}
  read(dst: Uint8Array, off: number, len: number): number {
    const t0 = performance.now();
    try {
      for (;;) {
        if (this.ctrl && failed(this.ctrl)) throw new Aborted();
        try {
          const n = readSync(this.fd, dst, off, len, null);
          if (n > 0 && this.firstDataAtMs === 0) this.firstDataAtMs = epochMs();
          return n;
        } catch (err) {
          const code = (err as NodeJS.ErrnoException).code;
          if (code === 'EAGAIN') {
            Atomics.wait(this.nap, 0, 0, 2);
            continue;
          }
          if (code === 'EOF') return 0;
          throw ioError(`reading the migration stream from ${this.fd === 0 ? 'stdin' : 'its socket'}`, err);
        }
      }
    } finally {
      this.waitMs += performance.now() - t0;
    }
  }
}

function run(shared: SaveShared, inputFd: number): ReaderResult {
  const t0 = performance.now();
  const v = saveViews(shared);
  const producer = new DescriptorProducer(v.ctrl, v.desc);
  const pipeBytes = enlargePipe(inputFd);
  const input = new StdinInput(v.ctrl, inputFd);
  const ring = new InputRing(v.input, v.ctrl, input, producer);
  let virtOffsetsBytes: number[] = [];
  let ramEndBytes = 0;
  const parser = new StreamParser(ring, {
    setup(blocks: ParsedBlock[]) {
      if (blocks.length > MAX_BLOCKS) {
        throw new SnapPipeError('UNSUPPORTED', `${blocks.length} RAM blocks (snap-pipe handles up to ${MAX_BLOCKS})`);
      }
      ({ virtOffsetsBytes, ramEndBytes } = layoutBlocks(blocks.map((b) => b.lengthBytes)));
      blocks.forEach((b, i) => {
        v.blocks[i * BLOCK_F64S + BLOCK_PAGES] = b.lengthBytes / 4096;
        v.blocks[i * BLOCK_F64S + BLOCK_VIRT_CLUSTER] = virtOffsetsBytes[i] / CLUSTER_BYTES;
      });
      Atomics.store(v.ctrl, CTRL.BLOCK_COUNT, blocks.length);
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
  }, { acceptReturnPath: true });
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
  /** `inputFd`: where the stream comes from (0, or the accepted socket of save --listen). */
  run(shared: SaveShared, inputFd: number): Outcome<ReaderResult> {
    return outcome(() => run(shared, inputFd));
  },
};
export type ReaderApi = typeof api;
exposeStage(api);
