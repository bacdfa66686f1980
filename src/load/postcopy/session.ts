// `snap-pipe load --postcopy[=PERCENT] IMG`: the image -> a postcopy migration stream on `out` (QEMU's exec: pipe, or
// the --connect socket), for a destination with the postcopy-ram capability. This room plays QEMU's migration source
// through the protocol in order (see PostcopySession.run), handles what QEMU says on the return path, sends the
// discards, and writes the report; the pages come from the PageScheduler, the clusters from the LoadSource through
// the ClusterCache.
import assert from 'node:assert/strict';
import { SnapPipeError } from '../../errors.js';
import { PAGE_BYTES } from '../../format/units.js';
import { crc32cImplementation } from '../../native/fastmem.js';
import { setPipeBytes } from '../../native/uring.js';
import type { IoBackendName } from '../../native/io.js';
import { StreamBuilder, type StreamEncoder } from '../../format/stream/encoder.js';
import { SEC_EOF } from '../../format/stream/constants.js';
import {
  DISCARDS_PER_COMMAND,
  PACKAGED_BYTES_MAX,
  adviseCommand,
  deviceSectionsEnd,
  discardCommand,
  openReturnPathCommand,
  pingCommand,
  packagedCommand,
  postcopyPackage,
} from '../../format/stream/commands.js';
import type { RpMessage } from '../../format/stream/returnpath.js';
import type { LoadReport } from '../precopy.js';
import { LOAD_QUEUE_DEPTH_MAX, LoadSource } from '../source.js';
import { pipeEncoder, type PipeSink } from '../pipe.js';
import { ClusterCache } from './cache.js';
import type { LatencySummary } from './latency.js';
import { ReturnPathIn } from './return-path.js';
import type { OpenTarget } from '../connect.js';
import { PageScheduler } from './scheduler.js';

export const PING_AFTER_OPEN = 1;
export const PING_IN_PACKAGE = 3;

/**
 * The exec: pipe's capacity in postcopy. QEMU's default 64 KiB held the background stream to ~0.4 GB/s. Larger,
 * requested pages can queue behind more background pages. Measured with a 2 GiB guest under QEMU 10.0 (bench:postcopy,
 * 2 runs each): 64 KiB completed in 3.2-4.2 s with 64-82 ms of vCPU blocktime, 256 KiB in 2.3-2.8 s with 10-44 ms,
 * 1 MiB in 2.3-2.5 s with 59-84 ms.
 */
const POSTCOPY_PIPE_BYTES = 256 << 10;
/** Cluster slots kept for requests beyond the background read-ahead. */
const URGENT_SLOTS = 16;
/**
 * After EOF, how long QEMU may take to say SHUT. It says it once its listen thread has loaded everything and torn
 * down postcopy (userfaultfd unregistered): well under a second for the guests measured, seconds at worst.
 */
export const SHUT_WAIT_MS_MAX = 60_000;

export interface PostcopyOptions {
  path: string;
  /**
   * Where the stream goes and the return path comes from (stdout and stdin under QEMU's exec:, or --connect's main
   * channel both ways), opened once the image is checked.
   */
  target: OpenTarget;
  direct: boolean;
  verify: boolean;
  queueDepth: number;
  io: IoBackendName | 'auto';
  /** Share of the data pages sent before the device state, 0..100. */
  precopyPercent: number;
  onNote?: (line: string) => void;
  /** Called after each write to `out` with the stream bytes written so far. */
  onProgress?: (p: { bytesOut: number }) => void;
}

/** What a postcopy load did: the precopy report's figures (same meanings) plus the postcopy phases and requests. */
export interface PostcopyReport extends LoadReport {
  mode: 'postcopy';
  /** unsentPages (see LoadReport) are sent as ZERO here: the destination wiped all RAM at ADVISE. */
  precopyPercent: number;
  /** Pages sent before LISTEN (data, and ZERO records). */
  precopyDataPages: number;
  precopyZeroPages: number;
  precopyClusters: number;
  discardCommands: number;
  discardRanges: number;
  packageBytes: number;
  /** Times from the start, ms: package written, PONG to the PING in the package (devices loaded), EOF written. */
  packageSentMs: number;
  devicesLoadedMs: number | null;
  eofSentMs: number;
  shutMs: number | null;
  shutStatus: number | null;
  pongs: number[];
  /** SWITCHOVER_ACK messages received (a QEMU 8.1+ destination with switchover-ack sends one). */
  switchoverAcks: number;
  /** Page requests read from the return path, the pages they named, and what became of those pages. */
  requests: number;
  requestedPages: number;
  requestedDataPages: number;
  requestedZeroPages: number;
  /** Pages requested after they had been sent (they were already in the pipe). */
  requestedAlreadySent: number;
  /** Cluster reads done for requests, and for the background stream. */
  requestReads: number;
  backgroundReads: number;
  /** Clusters read for a request and dropped before all their pages went out (read again later). */
  evictions: number;
  /** For each request that sent a page: from reading it off the return path to the end of the write with its page. */
  faultLatency: LatencySummary;
  /** Time spent waiting for clusters that requests needed, and writing answers to requests (a full pipe ahead). */
  requestReadWaitMs: number;
  requestWriteMs: number;
}

export async function runPostcopyLoad(opts: PostcopyOptions): Promise<PostcopyReport> {
  const t0 = performance.now();
  assert(Number.isInteger(opts.queueDepth) && opts.queueDepth >= 1 && opts.queueDepth <= LOAD_QUEUE_DEPTH_MAX, 'runPostcopyLoad: queueDepth');
  assert(Number.isInteger(opts.precopyPercent) && opts.precopyPercent >= 0 && opts.precopyPercent <= 100, 'runPostcopyLoad: precopyPercent');
  const source = LoadSource.check(opts.path, opts.direct);
  let rp: ReturnPathIn | undefined;
  try {
    const pkg = packageOf(source);
    // The reads in flight and URGENT_SLOTS more for requests; the backend can hold a read for every slot.
    source.openReads({ io: opts.io, queueDepth: opts.queueDepth, extraSlots: URGENT_SLOTS, backendDepth: 'slots', onNote: opts.onNote });
    const target = await opts.target();
    assert(target.returnPath !== undefined, 'runPostcopyLoad: a target without a return path');
    rp = new ReturnPathIn(target.returnPath, target.returnPathSocket);
    setPipeBytes(target.out, POSTCOPY_PIPE_BYTES); // a pipe under exec: (a socket keeps its own buffer)
    const tOpen = performance.now();
    const s = new PostcopySession({ opts, out: target.out, source, rp, pkg, t0: tOpen, openMs: tOpen - t0 });
    return await s.run(); // awaited here: the finally below must not close rp while the session waits on it
  } finally {
    rp?.close();
    source.close();
  }
}

/** PACKAGED's payload: LISTEN, the saved device sections (without EOF and VMDESCRIPTION), PING, RUN. */
function packageOf(source: LoadSource): Uint8Array {
  const { deviceState } = source.meta;
  const pkg = postcopyPackage(deviceState.subarray(0, deviceSectionsEnd(deviceState)), PING_IN_PACKAGE);
  if (pkg.length > PACKAGED_BYTES_MAX) throw new SnapPipeError('UNSUPPORTED', `${source.path}: device state of ${pkg.length} bytes is too large for a postcopy package`);
  return pkg;
}

/** What a session is built from: opened and checked by runPostcopyLoad, closed by it. */
interface SessionParts {
  opts: PostcopyOptions;
  /** The stream's descriptor. */
  out: number;
  /** ms from runPostcopyLoad's start to `t0`, when the target was open (LoadReport.openMs). */
  openMs: number;
  source: LoadSource;
  rp: ReturnPathIn;
  pkg: Uint8Array;
  t0: number;
}

class PostcopySession {
  private readonly opts: PostcopyOptions;
  private readonly source: LoadSource;
  private readonly rp: ReturnPathIn;
  private readonly pkg: Uint8Array;
  private readonly t0: number;
  private readonly openMs: number;
  /** Everything but answers to requests (the scheduler's `out`), and the answers (its `urgent`). */
  private readonly out: StreamEncoder;
  private readonly outSink: PipeSink;
  private readonly urgent: StreamEncoder;
  private readonly urgentSink: PipeSink;
  private readonly cache: ClusterCache;
  private readonly sched: PageScheduler;
  private readonly blockByName = new Map<string, number>();
  private lastReqBlock = -1;
  private eofWritten = false;
  /** What QEMU said on the return path. */
  private readonly heard = {
    shutStatus: null as number | null,
    shutAt: null as number | null,
    pongs: [] as number[],
    switchoverAcks: 0,
    devicesLoadedAt: null as number | null,
  };
  private readonly r = {
    requests: 0,
    requestedPages: 0,
    precopyDataPages: 0,
    precopyZeroPages: 0,
    precopyClusters: 0,
    discardCommands: 0,
    discardRanges: 0,
    packageSentMs: 0,
    eofSentMs: 0,
  };

  constructor(p: SessionParts) {
    ({ opts: this.opts, source: this.source, rp: this.rp, pkg: this.pkg, t0: this.t0, openMs: this.openMs } = p);
    this.source.meta.blocks.forEach((b, i) => this.blockByName.set(b.id, i));
    const progress = () => this.opts.onProgress?.({ bytesOut: this.outSink.bytesOut + this.urgentSink.bytesOut });
    ({ out: this.out, sink: this.outSink } = pipeEncoder(p.out, progress));
    ({ out: this.urgent, sink: this.urgentSink } = pipeEncoder(p.out, () => {
      this.sched.answersWritten();
      progress();
    }));
    this.cache = new ClusterCache(this.source, this.opts.verify);
    this.sched = new PageScheduler(this.source.meta, this.source.plan, this.cache, this.out, this.urgent);
  }

  private now(): number {
    return performance.now() - this.t0;
  }

  /**
   * The protocol, in order:
   *   header + configuration, ram START (verbatim from the image),
   *   POSTCOPY_ADVISE(0x1000, 0x1000)   after the setup (the saved setup has no per-block page-size fields; the
   *                                       destination wipes all of RAM here, so nothing may precede it),
   *   OPEN_RETURN_PATH, PING 1          from here on QEMU writes its return path (our stdin, or the socket),
   *   [precopy share]                   with PERCENT > 0: ZERO records for every non-data page, then whole data
   *                                       clusters (host-file order) until PERCENT% of the data pages went out,
   *   [switch-over commands]            of the save (QEMU 10's SWITCHOVER_START),
   *   POSTCOPY_RAM_DISCARD ...           every page not sent yet, per block, 12 ranges a command (as QEMU's
   *                                       postcopy_discard_send_range does); needed even with no precopy share,
   *                                       see sendDiscards,
   *   PACKAGED{ LISTEN, device sections (the saved device state without its trailing EOF + VMDESCRIPTION), PING 3,
   *             RUN }                   QEMU loads the devices and starts the guest (unless started with -S),
   *   PART sections                     requested pages first, else the rest in host-file order (ZERO records for
   *                                       the non-data pages spread among them); every page goes out exactly once,
   *   ram END (EOS), EOF                then snap-pipe waits for SHUT (or the pipe closing) and exits.
   */
  async run(): Promise<PostcopyReport> {
    try {
      this.sendOpening();
      const shareChunks = this.sendPrecopyShare();
      // The switch-over commands where QEMU's postcopy_start sends them: after the precopy share and before the
      // discards (migration.c migration_switchover_start).
      this.out.verbatim(this.source.meta.switchoverCommands);
      this.sendDiscards();
      this.sendPackage(shareChunks);
      this.sendPages();
      this.sendEof();
      await this.waitForShut();
    } catch (err) {
      this.urgent.flushAfterFailure();
      this.out.flushAfterFailure();
      throw this.explain(err);
    }
    return this.report();
  }

  /** Header, configuration, RAM setup, ADVISE, return path, PING. */
  private sendOpening(): void {
    const { meta } = this.source;
    this.out.verbatim(meta.head);
    this.out.verbatim(meta.ramSetup);
    this.out.verbatim(adviseCommand());
    this.out.verbatim(openReturnPathCommand());
    this.out.verbatim(pingCommand(PING_AFTER_OPEN));
    this.out.flush();
  }

  /** With PERCENT > 0: every non-data page, then whole clusters up to PERCENT% of the data pages. Returns the chunks sent. */
  private sendPrecopyShare(): number {
    const { plan } = this.source;
    const percent = this.opts.precopyPercent;
    if (percent === 0) return 0;
    const want = Math.ceil((plan.dataPages * percent) / 100);
    let shareChunks = 0;
    let pages = 0;
    while (shareChunks < plan.chunks.length && pages < want) pages += plan.chunks[shareChunks++].pages;
    while (this.sched.precopyZeros()) this.betweenSections();
    this.r.precopyZeroPages = this.sched.pages.sent;
    while (this.sched.precopyData(shareChunks)) this.betweenSections();
    this.r.precopyClusters = shareChunks;
    this.r.precopyDataPages = this.sched.pages.sent - this.r.precopyZeroPages;
    return shareChunks;
  }

  /** Before LISTEN, after each section: a full buffer is written and the return path read. */
  private betweenSections(): void {
    this.sched.flushIfFull();
    this.pollRp();
  }

  /**
   * POSTCOPY_RAM_DISCARD for every page not sent yet, per block, as byte ranges — also with no precopy share. QEMU
   * 7.2's loadvm_postcopy_handle_listen, when LISTEN comes straight after ADVISE, sets LISTENING and then calls
   * postcopy_ram_prepare_discard, which sets the state back to DISCARD: until RUN, ram_load would then take the
   * precopy path and write pages straight into userfault-registered RAM (the listen thread faults on a page it is
   * loading, and hangs). One DISCARD first makes that call happen here instead. (Nothing to discard: every page is
   * already in.)
   */
  private sendDiscards(): void {
    const { pages } = this.sched;
    if (pages.sent === pages.total) return;
    this.source.meta.blocks.forEach((_, b) => this.discardBlock(b));
  }

  /** The unsent pages of block `b`, DISCARDS_PER_COMMAND ranges a command. */
  private discardBlock(b: number): void {
    const { pages } = this.sched;
    const id = this.source.meta.blocks[b].id;
    let ranges: [number, number][] = [];
    const flushRanges = () => {
      if (ranges.length === 0) return;
      this.out.verbatim(discardCommand(id, ranges));
      this.r.discardCommands++;
      this.r.discardRanges += ranges.length;
      ranges = [];
    };
    let p = 0;
    while (p < pages.pagesIn[b]) {
      if (pages.isSent(b, p)) {
        p++;
        continue;
      }
      const start = p;
      while (p < pages.pagesIn[b] && !pages.isSent(b, p)) p++;
      ranges.push([start * PAGE_BYTES, (p - start) * PAGE_BYTES]);
      if (ranges.length === DISCARDS_PER_COMMAND) flushRanges();
    }
    flushRanges();
  }

  /** The package; from LISTEN on, QEMU may ask for pages. */
  private sendPackage(shareChunks: number): void {
    this.out.verbatim(packagedCommand(this.pkg.length));
    this.out.verbatim(this.pkg);
    this.sched.listen(shareChunks);
    this.out.flush();
    this.r.packageSentMs = this.now();
  }

  /**
   * Pages, requested ones first, reading the return path between steps. Every page goes out before EOF (never-saved
   * pages as ZERO): after EOF the destination unregisters userfaultfd, and a fault it could still send us then would
   * find us gone.
   */
  private sendPages(): void {
    do {
      this.pollRp();
      this.checkShut();
    } while (this.sched.step());
    this.sched.finish();
  }

  /** End of the RAM section, EOF. */
  private sendEof(): void {
    const id = this.source.meta.ramSectionId;
    this.out.verbatim(new StreamBuilder(256).ramEnd(id).ramEos(id).u8(SEC_EOF).build());
    this.out.flush();
    this.eofWritten = true;
    this.r.eofSentMs = this.now();
  }

  /** Waits for SHUT or the pipe closing, blocking, bounded; requests now only name pages already sent. */
  private async waitForShut(): Promise<void> {
    const answered = await this.rp.waitUntil(
      (m, t) => {
        this.onMessage(m, t);
        this.sched.dropRequests();
      },
      () => this.heard.shutStatus !== null,
      SHUT_WAIT_MS_MAX,
    );
    if (!answered) {
      throw new SnapPipeError(
        'IO',
        `QEMU never sent SHUT in the ${SHUT_WAIT_MS_MAX / 1000} s after the whole stream was sent: the destination is stuck or failed at the end (see its log)`,
      );
    }
    this.checkShut();
    if (this.heard.shutStatus === null) {
      throw new SnapPipeError('IO', 'QEMU closed the return path without SHUT after the whole stream was sent: the destination failed at the end (see its log)');
    }
  }

  // -------------------------------------------------------------------------------------------------------------
  // The return path

  private pollRp(): void {
    this.rp.poll((m, t) => this.onMessage(m, t));
  }

  private onMessage(m: RpMessage, t: number): void {
    const heard = this.heard;
    switch (m.type) {
      case 'pong':
        heard.pongs.push(m.value);
        if (m.value === PING_IN_PACKAGE && heard.devicesLoadedAt === null) heard.devicesLoadedAt = t - this.t0;
        return;
      case 'shut':
        if (heard.shutStatus === null) {
          heard.shutStatus = m.status;
          heard.shutAt = t - this.t0;
        }
        return;
      case 'req':
        this.onRequest(m.block, m.startBytes, m.lengthBytes, t);
        return;
      case 'switchover-ack':
        // A destination with switchover-ack approves the switch-over as the return path opens; snap-pipe, acting
        // as the source, has nothing to wait for (the device state goes in the package regardless).
        heard.switchoverAcks++;
        return;
      default:
        throw new SnapPipeError('BAD_STREAM', `return path from QEMU: unexpected ${m.type} message (snap-pipe never asks for postcopy recovery)`);
    }
  }

  /** A page request: checked against the image and the phase, then handed to the scheduler. */
  private onRequest(name: string | undefined, startBytes: number, lengthBytes: number, t: number): void {
    const block = this.requestedBlock(name);
    const blockBytes = this.source.meta.blocks[block].lengthBytes;
    const id = this.source.meta.blocks[block].id;
    if (startBytes % PAGE_BYTES !== 0 || lengthBytes % PAGE_BYTES !== 0 || lengthBytes === 0 || startBytes + lengthBytes > blockBytes) {
      throw new SnapPipeError(
        'BAD_STREAM',
        `QEMU requested ${lengthBytes} bytes at offset 0x${startBytes.toString(16)} of RAM block ${id} (${blockBytes} bytes): ` +
          `${startBytes + lengthBytes > blockBytes ? 'outside the block' : 'not whole pages'}; stopping the load`,
      );
    }
    if (!this.sched.listening) throw new SnapPipeError('BAD_STREAM', `return path from QEMU: a page request before LISTEN (block ${id})`);
    this.r.requests++;
    this.r.requestedPages += lengthBytes / PAGE_BYTES;
    this.sched.request(block, startBytes / PAGE_BYTES, lengthBytes / PAGE_BYTES, t);
  }

  /** The block a request names (REQ_PAGES_ID), or the last one named (REQ_PAGES). */
  private requestedBlock(name: string | undefined): number {
    if (name === undefined) {
      if (this.lastReqBlock < 0) throw new SnapPipeError('BAD_STREAM', 'return path from QEMU: REQ_PAGES before any request naming its block');
      return this.lastReqBlock;
    }
    const b = this.blockByName.get(name);
    if (b === undefined) {
      throw new SnapPipeError('BAD_STREAM', `QEMU requested a page of RAM block '${name}', which ${this.opts.path} does not have; stopping the load`);
    }
    this.lastReqBlock = b;
    return b;
  }

  /** SHUT from QEMU: an error status ends the load; a clean one before EOF cannot be a finished migration. */
  private checkShut(): void {
    const { shutStatus } = this.heard;
    if (shutStatus !== null) {
      if (shutStatus !== 0) {
        throw new SnapPipeError('IO', `QEMU reported the incoming migration failed (SHUT ${shutStatus}); see its log`);
      }
      if (!this.eofWritten) throw new SnapPipeError('IO', 'QEMU ended the return path (SHUT) before the stream was complete');
    } else if (this.rp.eof && !this.eofWritten) {
      throw new SnapPipeError('IO', `QEMU closed the return path (${this.rp.name}) before the stream was complete; the incoming migration failed on its side`);
    }
  }

  private explain(err: unknown): unknown {
    if (err instanceof SnapPipeError && err.code === 'IO' && /EPIPE|closed the (stream|return path)/.test(err.message) && !this.heard.pongs.includes(PING_AFTER_OPEN)) {
      return new SnapPipeError(
        'IO',
        `${err.message} (QEMU never answered the first PING: does the destination have the postcopy-ram capability, set before migrate_incoming?)`,
      );
    }
    return err;
  }

  // -------------------------------------------------------------------------------------------------------------

  private report(): PostcopyReport {
    const seconds = (performance.now() - this.t0) / 1000;
    const { r, heard, source, cache } = this;
    const { meta, plan } = source;
    const counts = this.sched.counts;
    const [o, u] = [this.outSink, this.urgentSink];
    const out = { bytesOut: o.bytesOut + u.bytesOut, writeMs: o.writeMs + u.writeMs, writeCalls: o.writeCalls + u.writeCalls, sections: this.out.sections + this.urgent.sections };
    return {
      path: this.opts.path,
      mode: 'postcopy',
      checksum: crc32cImplementation,
      openMs: this.openMs,
      seconds,
      bytesOut: out.bytesOut,
      outMBps: out.bytesOut / 1e6 / seconds,
      blocks: meta.blocks.length,
      dataPages: plan.dataPages,
      zeroPages: plan.zeroPages,
      unsentPages: plan.unsentPages,
      dataClusters: plan.chunks.length,
      precopyPercent: this.opts.precopyPercent,
      precopyDataPages: r.precopyDataPages,
      precopyZeroPages: r.precopyZeroPages,
      precopyClusters: r.precopyClusters,
      discardCommands: r.discardCommands,
      discardRanges: r.discardRanges,
      deviceStateBytes: meta.deviceState.length,
      packageBytes: this.pkg.length,
      packageSentMs: r.packageSentMs,
      devicesLoadedMs: heard.devicesLoadedAt,
      eofSentMs: r.eofSentMs,
      shutMs: heard.shutAt,
      shutStatus: heard.shutStatus,
      pongs: heard.pongs,
      switchoverAcks: heard.switchoverAcks,
      requests: r.requests,
      requestedPages: r.requestedPages,
      requestedDataPages: counts.requestedDataPages,
      requestedZeroPages: counts.requestedZeroPages,
      requestedAlreadySent: counts.requestedAlreadySent,
      requestReads: cache.requestReads,
      backgroundReads: cache.backgroundReads,
      evictions: counts.evictions,
      faultLatency: this.sched.latency.summary(),
      requestReadWaitMs: counts.requestReadWaitMs,
      requestWriteMs: this.urgentSink.writeMs,
      bytesRead: source.bytesRead,
      readMs: cache.readMs,
      verifyMs: source.verifyMs,
      writeMs: out.writeMs,
      writeCalls: out.writeCalls,
      ramSections: out.sections,
      direct: this.opts.direct,
      verified: this.opts.verify,
      queueDepth: source.depth,
      readBackend: source.readBackend,
    };
  }
}
