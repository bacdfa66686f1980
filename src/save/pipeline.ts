// Wiring for `snap-pipe save`: allocate the rings once, start reader -> coalescer -> writer, supervise them (the
// first failure wins and stops the others), then have the writer store the metadata and mark the image complete.
import { closeSync, constants, existsSync, fstatSync, openSync, statSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { deserializeError, SnapPipeError } from '../errors.js';
import { FORMAT_VERSION, type SnapshotMeta } from '../format/image/types.js';
import { PAGE_BYTES } from '../format/units.js';
import { crc32cImplementation } from '../native/fastmem.js';
import type { IoBackendName } from '../native/io.js';
import { channelLane, CTRL, FAIL_ABORT, FAIL_ERROR, MAIN_LANE, MAX_CHANNELS, SLOT_BYTES, type SaveRingSizes, type SaveShared } from './ring/layout.js';
import { signalFailure } from './ring/wait.js';
import { VERSION } from '../version.js';
import { STDOUT_FD } from '../output.js';
import { countSetBits } from '../format/image/bits.js';
import { streamParts } from '../format/stream/parts.js';
import type { ChannelApi, ChannelResult } from './stages/channel.js';
import type { CoalescerApi, CoalescerResult } from './stages/coalescer.js';
import type { ReaderApi, ReaderResult } from './stages/reader.js';
import { startStage, type Outcome, type StageHandle } from './stages/rpc.js';
import { allocateSave } from './stages/memory.js';
import { SaveReturnPath } from './returnpath.js';
import type { StreamListener } from './listener.js';
import { watchStall, type StallWatch } from './stall.js';
import type { WriterApi, WriterResult } from './stages/writer.js';

export const DEFAULT_RING_BYTES = 64 << 20;
export const MIN_RING_BYTES = 4 << 20;
/**
 * Writes in flight. Since the writer waits for the next chunk rather than the next completion while fewer than half
 * are in flight, a deeper queue keeps it doing so: the 3.06 GB background stream, 4 interleaved rounds, medians
 * 2.46 s at 16, 2.33 s at 32, 2.27 s at 64, 2.31 s at 128 (bench 04:05: 77% of fio at 16, 84% at 64). Memory does not
 * depend on it (the slots are the ring).
 */
export const DEFAULT_QUEUE_DEPTH = 64;
/**
 * With QEMU's return path open, the quiet allowed in the device state before the save gives up on finding its end.
 * QEMU writes the device state, EOF and the VM description in one go once the VM is stopped; 30 s leaves room for a
 * machine under load and still ends a save whose source sent no VM description.
 */
export const DEFAULT_END_TIMEOUT_S = 30;
/**
 * With --listen, how long save waits for QEMU to connect: long enough for a person to type the migrate command after
 * starting save, short enough that a forgotten save does not hold its socket and image for good.
 */
export const DEFAULT_ACCEPT_TIMEOUT_S = 600;
/**
 * With --listen, how long nothing may move (no byte from QEMU on any connection, no chunk written) before the save
 * gives up: QEMU keeps a migration's stream flowing (a running guest's pass after pass, a paused one's pages), and
 * its slowest pause in a stream here, the return path's wait for the device state, is bounded by --end-timeout.
 */
export const DEFAULT_STALL_TIMEOUT_S = 120;
const DESC_COUNT = 1 << 16;
const STDIN_FD = 0;
/** How often the main thread looks for something to answer on QEMU's return path. */
const RETURN_PATH_POLL_MS = 10;
/** How long a finished multifd save waits for its channel stages' counts (see channelResults). */
const CHANNEL_RESULTS_WAIT_MS = 2_000;
/** How long a failing save waits for the writer to record the cause in the image (it may be stuck in a write). */
const RECORD_FAILURE_WAIT_MS = 2_000;

/** A promise that never settles: the race's place for a watch that is not running. */
const NEVER = new Promise<never>(() => undefined);

function delayMs(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms).unref());
}

export interface SaveOptions {
  path: string;
  ringBytes: number;
  queueDepth: number;
  direct: boolean;
  force: boolean;
  io: IoBackendName | 'auto';
  /** One line for the user (e.g. why io_uring is not used). */
  onNote?: (line: string) => void;
  /** With QEMU's return path open: how long the device state may stay quiet before the save gives up on its end. */
  endTimeoutMs: number;
  /** With QEMU's return path open: send SWITCHOVER_ACK even when the machine type does not say QEMU knows it. */
  switchoverAck: boolean;
  /**
   * Take the stream from a unix socket instead of stdin (save --listen): listen on `path` once the stage threads run
   * and the image is open, and wait at most `acceptTimeoutMs` for QEMU to connect; `channels` multifd channels
   * (QEMU's multifd-channels with its multifd capability; 0: one stream) come with the main channel. Once
   * connected, a stream on which nothing moves for `stallTimeoutMs` fails the save (save/stall.ts).
   */
  listen?: { path: string; acceptTimeoutMs: number; channels: number; stallTimeoutMs: number };
  /**
   * Tests only: a folder of fixture stages (test/fixtures/stages/<failure mode>/); a stage found there replaces the
   * real one, so a test can make one stage fail in a way no input can (an exception, a crash, an exit).
   */
  stageFixtureDir?: string;
}

export interface StageStats {
  busyMs: number;
  /** Waiting on the stage before it (QEMU for the reader). */
  upstreamWaitMs: number;
  /** Waiting on the stage after it (the disk for the writer). */
  downstreamWaitMs: number;
}

export interface SaveReport {
  path: string;
  seconds: number;
  streamBytes: number;
  streamMBps: number;
  dataPages: number;
  zeroPages: number;
  resentPages: number;
  pageRecords: number;
  bytesWritten: number;
  writeCalls: number;
  dataClusters: number;
  rewrittenClusters: number;
  /** Reads of the old content of overwritten pages, for their clusters' CRCs (see WriterResult), and their bytes. */
  oldContentReads: number;
  oldContentBytes: number;
  partialChunks: number;
  fileBytes: number;
  deviceStateBytes: number;
  blocks: number;
  direct: boolean;
  io: IoBackendName;
  queueDepth: number;
  /** How CRC-32C and page copies ran: the CPU instruction, C tables, or the JavaScript fallback (no addon). */
  checksum: typeof crc32cImplementation;
  ring: { ringBytes: number; slots: number; inputBytes: number; parkBytes: number; oldContentBytes: number; maxOpenChunks: number };
  stages: { reader: StageStats; coalescer: StageStats; writer: StageStats };
  /** After the stream: metadata and tables, fdatasync. */
  finishMs: number;
  /**
   * Milliseconds from the process's start (node's own start-up included) until the last of the three stage threads
   * had loaded, the first bytes of the stream were read, and the first write was submitted (0: nothing written).
   * QEMU's stream waits in the pipe until then. `seconds` counts from the stages' start, later than the process's.
   * With --listen, `connectedMs` is when QEMU connected (0 without), and the stages were ready before it.
   */
  startup: { stagesReadyMs: number; firstReadMs: number; firstWriteMs: number; connectedMs: number };
  /** save --listen with multifd channels: sync points passed, and each channel stage's counts and times. */
  multifd?: { syncs: number; channels: (StageStats & { channel: number; packets: number; syncs: number; dataPages: number; zeroPages: number; bytes: number })[] };
}

/**
 * The rings of a save. `channels` multifd channels get an input ring of inputBytes each on top of ringBytes (16 MiB
 * each at the default size: 32 packets of 512 KiB).
 */
export function ringSizes(ringBytes: number, channels = 0): SaveRingSizes {
  if (!Number.isInteger(ringBytes) || ringBytes < MIN_RING_BYTES || ringBytes % SLOT_BYTES !== 0) {
    throw new SnapPipeError('USAGE', `--ring-size must be a whole number of MiB, at least ${MIN_RING_BYTES >> 20} MiB`);
  }
  if (!Number.isInteger(channels) || channels < 0 || channels > MAX_CHANNELS) {
    throw new SnapPipeError('USAGE', `--multifd-channels must be 0 to ${MAX_CHANNELS}`);
  }
  let inputBytes = 1 << 20;
  while (inputBytes * 2 <= Math.min(16 << 20, ringBytes / 4)) inputBytes *= 2;
  // The park pool is half the ring, less the writer's old-content units (a sixteenth of the ring, at least 1 MiB):
  // a 4 GiB background stream rewrote 1078 clusters with a quarter, 391 with half (2.41 s instead of 3.12 s, when
  // rewritten clusters were still read back whole at the end), 1 with a whole ring; peak RSS 201 / 222 / 240 MiB.
  const slotCount = ringBytes / SLOT_BYTES;
  const oldContentUnits = Math.max(1, Math.floor(slotCount / 16));
  const parkPages = (ringBytes / 2 - oldContentUnits * SLOT_BYTES) / PAGE_BYTES;
  return { slotCount, inputBytes, descCount: DESC_COUNT, parkPages, oldContentUnits, channels };
}

/** A stage's module: the real one, or the one in `fixtureDir` when it has one (SaveOptions.stageFixtureDir). */
function stageUrl(name: string, fixtureDir: string | undefined): URL {
  if (fixtureDir && existsSync(join(fixtureDir, `${name}.js`))) return pathToFileURL(join(fixtureDir, `${name}.js`));
  return new URL(`./stages/${name}.js`, import.meta.url);
}

/** A stage call's outcome, or a rejection when its thread dies first. */
async function settle<T>(stage: StageHandle<unknown>, call: Promise<Outcome<T>>): Promise<Outcome<T>> {
  return Promise.race([call, stage.died]);
}

/** A stage call's value; its failure (or its thread's death) thrown. */
async function valueOf<T>(stage: StageHandle<unknown>, call: Promise<Outcome<T>>): Promise<T> {
  const o = await settle(stage, call);
  if (!o.ok) throw deserializeError(o.error);
  return o.value;
}

/**
 * Answers QEMU's return path every RETURN_PATH_POLL_MS while the save runs; `failed` rejects when answering fails or
 * the stream's end is overdue. stop() ends it.
 */
function answerReturnPath(rp: SaveReturnPath): { failed: Promise<never>; stop: () => void } {
  let timer: NodeJS.Timeout | undefined;
  const failed = new Promise<never>((_, reject) => {
    timer = setInterval(() => {
      let err: unknown;
      try {
        err = rp.poll(performance.now());
      } catch (e) {
        err = e;
      }
      if (err === undefined) return;
      clearInterval(timer);
      reject(err);
    }, RETURN_PATH_POLL_MS);
  });
  failed.catch(() => undefined); // raced in run(); an unraced rejection must not count as unhandled
  return { failed, stop: () => clearInterval(timer) };
}

interface StageResults {
  rr: ReaderResult;
  cr: CoalescerResult;
  wr: WriterResult;
  /** Each multifd channel stage's counts (empty for one stream). */
  chr: ChannelResult[];
}

/** What run() measured or chose besides the stages' results. */
interface RunFacts {
  seconds: number;
  finishMs: number;
  direct: boolean;
  maxOpen: number;
}

export class SavePipeline {
  readonly shared: SaveShared;
  private readonly ctrl: Int32Array;
  private stages: StageHandle<unknown>[] = [];
  private listener: StreamListener | undefined;
  /** When QEMU connected to --listen's socket (performance.now()), 0 without --listen. */
  private connectedAtMs = 0;
  /** The image is complete: what multifd channel stages do from now on no longer matters to the save. */
  private streamDone = false;

  constructor(private readonly opts: SaveOptions) {
    this.shared = allocateSave(ringSizes(opts.ringBytes, opts.listen?.channels ?? 0));
    this.ctrl = new Int32Array(this.shared.ctrl);
    // Every slot starts free: the free queue holds 0..slotCount-1.
    const free = new Int32Array(this.shared.freeQueue);
    for (let s = 0; s < this.shared.sizes.slotCount; s++) free[s] = s;
    Atomics.store(this.ctrl, CTRL.FREE_HEAD, this.shared.sizes.slotCount);
  }

  /** Stops every stage at its next wait (SIGINT/SIGTERM); the image stays marked incomplete. */
  abort(): void {
    signalFailure(this.ctrl, FAIL_ABORT);
    this.wakeReader();
  }

  /** A reader blocked on an empty input must return: the socket is shut down, a pipe gets a byte. */
  private wakeReader(): void {
    if (this.listener) this.listener.wake();
    else wakeBlockedReader();
  }

  /**
   * Where the stream comes from and answers go: stdin and stdout, or the connections QEMU makes to --listen's socket
   * (the main channel, and the multifd channels' fds by channel id).
   */
  private async connect(): Promise<{ inFd: number; outFd: number; channelFds: number[] }> {
    const listen = this.opts.listen;
    if (!listen) return { inFd: STDIN_FD, outFd: STDOUT_FD, channelFds: [] };
    // Every stage thread loaded before QEMU may connect: none of the start-up falls into the migration.
    await Promise.all(this.stages.map((s) => Promise.race([s.api.ready(), s.died])));
    // Imported only here: a save from stdin starts without loading the socket code.
    const { StreamListener } = await import('./listener.js');
    this.listener = await StreamListener.open(listen.path);
    const multifd = listen.channels > 0 ? ` with ${listen.channels} multifd channels` : '';
    this.opts.onNote?.(`listening on unix:${listen.path} for QEMU's migrate${multifd} (at most ${listen.acceptTimeoutMs / 1000} s)`);
    const conns = await Promise.race([this.listener.accept(listen.acceptTimeoutMs, listen.channels), this.listener.failed]);
    this.connectedAtMs = this.listener.connectedAt;
    return { inFd: conns.main, outFd: conns.main, channelFds: conns.channels };
  }

  async run(): Promise<SaveReport> {
    const t0 = performance.now();
    const maxOpen = Math.max(1, Math.floor(this.shared.sizes.slotCount / 2));
    const { writer, reader, coalescer, channels } = this.startStages();
    let rp: SaveReturnPath | undefined;
    let answering: { failed: Promise<never>; stop: () => void } | undefined;
    let stall: StallWatch | undefined;
    let imageOpened = false;
    try {
      const { path, direct, force, io, queueDepth } = this.opts;
      const opened = await valueOf(writer, writer.api.open({ path, direct, force, io, queueDepth }));
      imageOpened = true;
      if (opened.note) this.opts.onNote?.(opened.note);
      const { inFd, outFd, channelFds } = await this.connect();
      rp = new SaveReturnPath(this.ctrl, this.opts.endTimeoutMs, this.opts.switchoverAck, outFd);
      answering = answerReturnPath(rp);

      const channelRuns = channels.map((ch, c) => settle(ch, ch.api.run(this.shared, c, channelFds[c], channels.length)));
      stall = this.opts.listen ? watchStall(this.ctrl, [MAIN_LANE, ...channels.map((_, c) => channelLane(c))], this.opts.listen.stallTimeoutMs) : undefined;
      const [r, c, w] = await Promise.race([answering.failed, this.listenerFailed(), this.channelsFailed(channelRuns), stall?.failed ?? NEVER, this.supervise([
        settle(reader, reader.api.run(this.shared, inFd, channels.length > 0)),
        settle(coalescer, coalescer.api.run(this.shared, maxOpen)),
        settle(writer, writer.api.run(this.shared)),
      ])]);
      stall?.stop();
      const results: StageResults = { rr: r as ReaderResult, cr: c as CoalescerResult, wr: w as WriterResult, chr: [] };

      const meta = this.buildMeta(results);
      const tFinish = performance.now();
      await valueOf(writer, writer.api.finish(meta));
      answering.stop();
      // Complete and durable: only now may QEMU call the migration completed.
      rp.finished();
      const finishMs = performance.now() - tFinish;
      results.chr = await this.channelResults(channelRuns);

      const seconds = (performance.now() - t0) / 1000;
      await this.stop();
      return this.report(results, meta, { seconds, finishMs, direct: opened.direct, maxOpen });
    } catch (err) {
      // Do not wait for the reader and coalescer: the reader may be blocked reading stdin, and the caller exits
      // anyway. The writer gets a bounded moment to write the cause into the image.
      signalFailure(this.ctrl, FAIL_ERROR);
      this.wakeReader();
      answering?.stop();
      stall?.stop();
      const failure = imageOpened ? await this.recordFailure(writer, err) : err;
      rp?.failed();
      void this.stop();
      throw failure;
    } finally {
      this.listener?.close();
    }
  }

  /**
   * Rejects with the first multifd channel stage that fails (its error, or its thread's death) while the stream
   * runs; a channel that ends cleanly (QEMU closed it at a packet boundary) is the coalescer's to judge.
   */
  private channelsFailed(runs: Promise<Outcome<ChannelResult>>[]): Promise<never> {
    const failed = new Promise<never>((_, reject) => {
      for (const run of runs) {
        run.then(
          (o) => {
            if (o.ok || o.aborted || this.streamDone) return;
            signalFailure(this.ctrl, FAIL_ERROR);
            reject(deserializeError(o.error));
          },
          (err: Error) => {
            if (this.streamDone) return;
            signalFailure(this.ctrl, FAIL_ERROR);
            reject(new SnapPipeError('WORKER', err.message));
          },
        );
      }
    });
    failed.catch(() => undefined); // raced in run() only while the stream runs
    return failed;
  }

  /**
   * The multifd channel stages' counts, once the image is complete: their sockets are shut down (QEMU sends nothing
   * after its last SYNC, and keeps them open until its cleanup), so each stage's read ends. Bounded: a stage that
   * does not answer in CHANNEL_RESULTS_WAIT_MS is left out of the report.
   */
  private async channelResults(runs: Promise<Outcome<ChannelResult>>[]): Promise<ChannelResult[]> {
    this.streamDone = true;
    if (runs.length === 0) return [];
    this.listener?.wake();
    const all = Promise.all(runs.map((r) => r.catch(() => undefined)));
    const outcomes = await Promise.race([all, delayMs(CHANNEL_RESULTS_WAIT_MS).then(() => [])]);
    return outcomes.flatMap((o) => (o?.ok ? [o.value] : []));
  }

  /** Rejects when the listener ends the save (a connection past the expected ones); never settles without one. */
  private listenerFailed(): Promise<never> {
    return this.listener ? this.listener.failed : new Promise<never>(() => undefined);
  }

  /**
   * All three threads start together: each loads its modules in parallel with the others (started one after
   * another, the stages cost ~0.1 s more before the first byte is read).
   */
  private startStages(): {
    writer: StageHandle<WriterApi>;
    reader: StageHandle<ReaderApi>;
    coalescer: StageHandle<CoalescerApi>;
    channels: StageHandle<ChannelApi>[];
  } {
    const fixtures = this.opts.stageFixtureDir;
    const writer = startStage<WriterApi>(stageUrl('writer', fixtures), 'snap-pipe writer');
    const reader = startStage<ReaderApi>(stageUrl('reader', fixtures), 'snap-pipe reader');
    const coalescer = startStage<CoalescerApi>(stageUrl('coalescer', fixtures), 'snap-pipe coalescer');
    const channels: StageHandle<ChannelApi>[] = [];
    for (let c = 0; c < this.shared.sizes.channels; c++) channels.push(startStage<ChannelApi>(stageUrl('channel', fixtures), `snap-pipe multifd channel ${c}`));
    this.stages.push(writer, reader, coalescer, ...channels);
    return { writer, reader, coalescer, channels };
  }

  /**
   * Writes the cause of a failure into the image (it stays incomplete), and names the image in the error: QEMU
   * may report the migration completed when the save fails after QEMU's last write (it does not read the exit
   * status: io/channel-command.c qio_channel_command_close), so the line on QEMU's stderr and the image must say it.
   */
  private async recordFailure(writer: StageHandle<WriterApi>, err: unknown): Promise<unknown> {
    const { path } = this.opts;
    const message = err instanceof Error ? err.message : String(err);
    const cause = message.startsWith(`${path}: `) ? message.slice(path.length + 2) : message;
    const recorded = settle(writer, writer.api.fail(err instanceof SnapPipeError ? cause : `internal error: ${cause}`));
    await Promise.race([recorded.catch(() => undefined), delayMs(RECORD_FAILURE_WAIT_MS)]);
    if (!(err instanceof SnapPipeError)) return err;
    return new SnapPipeError(err.code, `save ${path} failed (the image stays incomplete): ${cause}`);
  }

  /**
   * Waits for all stages. The first real error wins: it marks the pipeline failed (the other stages stop at their
   * next wait) and is thrown at once, without waiting for a reader that may be blocked reading stdin.
   */
  private supervise(calls: Promise<Outcome<unknown>>[]): Promise<unknown[]> {
    return new Promise((resolve, reject) => {
      const values: unknown[] = new Array(calls.length);
      let pending = calls.length;
      let abortedOnly = false;
      calls.forEach((p, i) => {
        p.then(
          (o) => {
            if (o.ok) {
              values[i] = o.value;
              if (--pending === 0) (abortedOnly ? reject(interrupted()) : resolve(values));
              return;
            }
            if (o.aborted) {
              abortedOnly = true;
              if (--pending === 0) reject(interrupted());
              return;
            }
            signalFailure(this.ctrl, FAIL_ERROR);
            reject(deserializeError(o.error));
          },
          (err: Error) => {
            signalFailure(this.ctrl, FAIL_ERROR);
            reject(new SnapPipeError('WORKER', err.message));
          },
        );
      });
    });
  }

  private buildMeta({ rr, cr, wr }: StageResults): Omit<SnapshotMeta, 'chunkCrc32c'> {
    const p = rr.parsed;
    let dataPages = 0;
    let sentPages = 0;
    for (let b = 0; b < p.blocks.length; b++) {
      dataPages += countSetBits(cr.data[b]);
      sentPages += countSetBits(cr.sent[b]);
    }
    return {
      formatVersion: FORMAT_VERSION,
      ...streamParts(p),
      blocks: p.blocks.map((b, i) => ({
        id: b.id,
        lengthBytes: b.lengthBytes,
        virtOffsetBytes: rr.virtOffsetsBytes[i],
        ...(b.addr !== undefined ? { addr: b.addr } : {}),
      })),
      pages: p.blocks.map((_, i) => ({ sent: cr.sent[i], data: cr.data[i] })),
      counters: {
        dataPages,
        zeroPages: sentPages - dataPages,
        resentPages: cr.counters.resentPages,
        streamBytes: p.streamBytes + this.channelBytes(),
        dataClusters: wr.clustersWritten,
        rewrittenClusters: wr.rewrittenClusters,
      },
      savedAt: new Date().toISOString(),
      writer: `snap-pipe ${VERSION}`,
    };
  }

  /** Bytes of the multifd channels' packets: all of them once the coalescer passed the last sync point. */
  private channelBytes(): number {
    return new Float64Array(this.shared.channelBytes).reduce((n, b) => n + b, 0);
  }

  private report({ rr, cr, wr, chr }: StageResults, meta: Omit<SnapshotMeta, 'chunkCrc32c'>, run: RunFacts): SaveReport {
    const { sizes } = this.shared;
    const { seconds } = run;
    return {
      path: this.opts.path,
      seconds,
      streamBytes: meta.counters.streamBytes,
      streamMBps: meta.counters.streamBytes / 1e6 / seconds,
      dataPages: meta.counters.dataPages,
      zeroPages: meta.counters.zeroPages,
      resentPages: meta.counters.resentPages,
      pageRecords: cr.counters.dataRecords + cr.counters.zeroRecords,
      bytesWritten: wr.bytesWritten,
      writeCalls: wr.writeCalls,
      dataClusters: wr.clustersWritten,
      rewrittenClusters: wr.rewrittenClusters,
      oldContentReads: wr.oldContentReads,
      oldContentBytes: wr.oldContentBytes,
      partialChunks: cr.counters.partialChunks,
      fileBytes: statSync(this.opts.path).size,
      deviceStateBytes: rr.parsed.deviceState.length,
      blocks: rr.parsed.blocks.length,
      direct: run.direct,
      io: wr.io,
      queueDepth: wr.queueDepth,
      checksum: crc32cImplementation,
      ring: { ringBytes: this.opts.ringBytes, slots: sizes.slotCount, inputBytes: sizes.inputBytes, parkBytes: sizes.parkPages * PAGE_BYTES, oldContentBytes: sizes.oldContentUnits * SLOT_BYTES, maxOpenChunks: run.maxOpen },
      finishMs: run.finishMs,
      startup: {
        stagesReadyMs: Math.max(rr.readyAtMs, cr.readyAtMs, wr.readyAtMs) - performance.timeOrigin,
        firstReadMs: rr.firstReadAtMs > 0 ? rr.firstReadAtMs - performance.timeOrigin : 0,
        firstWriteMs: wr.firstWriteAtMs > 0 ? wr.firstWriteAtMs - performance.timeOrigin : 0,
        connectedMs: this.connectedAtMs,
      },
      stages: {
        reader: { busyMs: rr.busyMs, upstreamWaitMs: rr.sourceWaitMs, downstreamWaitMs: rr.downstreamWaitMs },
        coalescer: { busyMs: cr.busyMs, upstreamWaitMs: cr.upstreamWaitMs, downstreamWaitMs: cr.downstreamWaitMs },
        writer: { busyMs: wr.busyMs, upstreamWaitMs: wr.upstreamWaitMs, downstreamWaitMs: wr.ioMs },
      },
      multifd: this.shared.sizes.channels === 0 ? undefined : {
        syncs: cr.syncs,
        channels: chr.map((c) => ({
          channel: c.channel, packets: c.packets, syncs: c.syncs, dataPages: c.dataPages, zeroPages: c.zeroPages, bytes: c.bytes,
          busyMs: c.busyMs, upstreamWaitMs: c.sourceWaitMs, downstreamWaitMs: c.downstreamWaitMs,
        })),
      },
    };
  }

  private async stop(): Promise<void> {
    const stages = this.stages;
    this.stages = [];
    await Promise.all(stages.map((s) => s.worker.terminate().catch(() => undefined)));
  }
}

/**
 * A reader thread blocked in read(0) on an empty pipe cannot be terminated, and process.exit() waits for it (until
 * QEMU sends more or closes the pipe, which a stalled source may never do). After FAILED is set (the reader checks
 * it before every read), this puts one byte into our own stdin pipe, opened again for writing through /proc, so
 * that read returns and the thread ends. The stream is being abandoned: the byte does no harm. Pipes only (QEMU's
 * exec: gives one); a full pipe (EAGAIN) means the reader is not blocked.
 */
function wakeBlockedReader(): void {
  let fd = -1;
  try {
    if (!fstatSync(0).isFIFO()) return;
    fd = openSync('/proc/self/fd/0', constants.O_WRONLY | constants.O_NONBLOCK);
    writeSync(fd, WAKE_BYTE);
  } catch {
    // nothing more to do: the failure being reported matters more
  } finally {
    if (fd >= 0) closeSync(fd);
  }
}
const WAKE_BYTE = new Uint8Array(1);

function interrupted(): SnapPipeError {
  return new SnapPipeError('INTERRUPTED', 'save interrupted; the image is left marked incomplete');
}

