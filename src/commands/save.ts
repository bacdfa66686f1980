// `snap-pipe save IMG`: flags -> SaveOptions -> the pipeline (save/pipeline.ts) -> the report.
import { isatty } from 'node:tty';
import { formatBytes, printable } from '../format/text.js';
import { printOut, tellErr, writeStats } from '../output.js';
import { DEFAULT_ACCEPT_TIMEOUT_S, DEFAULT_END_TIMEOUT_S, DEFAULT_QUEUE_DEPTH, DEFAULT_RING_BYTES, DEFAULT_STALL_TIMEOUT_S, SavePipeline, type SaveReport } from '../save/pipeline.js';
import { MULTIFD_CHANNELS_MAX } from '../format/stream/multifd.js';
import { formatHelp, integerFlag, onePath, parseArgs, parseIo, parseSize, unixSocketPath, usage, type FlagSpec } from './args.js';

const SAVE_FLAGS: Record<string, FlagSpec> = {
  'ring-size': {
    kind: 'value',
    valueName: 'SIZE',
    help: `memory for 1 MiB chunk slots; the pipeline's buffers stay under 1.75x this whatever the VM's size (default ${DEFAULT_RING_BYTES >> 20}M)`,
  },
  'queue-depth': { kind: 'value', valueName: 'N', help: `writes kept in flight (default ${DEFAULT_QUEUE_DEPTH})` },
  io: { kind: 'value', valueName: 'uring|sync', help: 'I/O backend (default: uring where io_uring works, else sync)' },
  'no-direct': { kind: 'bool', help: 'buffered writes, for file systems without O_DIRECT (tmpfs)' },
  force: { kind: 'bool', help: 'overwrite IMG even if it holds a complete image or another file' },
  stats: { kind: 'optional-value', valueName: 'FILE', help: 'at the end, a summary on stderr; with =FILE, JSON to FILE' },
  'end-timeout': {
    kind: 'value',
    valueName: 'SECONDS',
    help: `with QEMU's return path: how long the stream may pause in the device state before save gives up on its end (default ${DEFAULT_END_TIMEOUT_S})`,
  },
  'switchover-ack': {
    kind: 'bool',
    help: 'with QEMU\'s return path: send SWITCHOVER_ACK even for a machine type older than 8.1 (a newer QEMU running an old machine type with switchover-ack on waits for it); a QEMU older than 8.1 fails on it',
  },
  listen: {
    kind: 'value',
    valueName: 'unix:PATH',
    help: 'take the stream from QEMU\'s migrate "unix:PATH" instead of stdin: start first, then listen (socket mode 0600, removed at exit), so QEMU never waits for snap-pipe to start',
  },
  'stall-timeout': {
    kind: 'value',
    valueName: 'SECONDS',
    help: `with --listen: once QEMU connected, how long nothing may come from it (and nothing be written) before save gives up (default ${DEFAULT_STALL_TIMEOUT_S})`,
  },
  'multifd-channels': {
    kind: 'value',
    valueName: 'N',
    help: `with --listen: QEMU migrates with the multifd capability over N channels (its multifd-channels parameter, 2 unless set; 1 to ${MULTIFD_CHANNELS_MAX}), read side by side; default 0: one stream, no multifd`,
  },
  'accept-timeout': {
    kind: 'value',
    valueName: 'SECONDS',
    help: `with --listen: how long to wait for QEMU to connect (default ${DEFAULT_ACCEPT_TIMEOUT_S})`,
  },
  help: { kind: 'bool', help: 'show this help' },
};

const SAVE_ABOUT = `Reads a QEMU migration stream (format 3) from stdin (or a unix socket) and stores it in IMG, a QCOW2
image with 1 MiB clusters: each RAM block at a 1 MiB-aligned offset, zero pages unallocated, device state kept
verbatim. Works with plain migration (re-sent pages: the last version wins) and with the background-snapshot
capability. From QEMU:
  (qemu) migrate_set_parameter max-bandwidth 100G
  (qemu) migrate "exec:snap-pipe save /path/vm.qcow2"
or, started beforehand so that the guest's pause never waits for snap-pipe to start:
  $ snap-pipe save --listen unix:/run/vm.sock /path/vm.qcow2 &
  (qemu) migrate "unix:/run/vm.sock"
and over QEMU's multifd channels, which carry the pages side by side (uncompressed only):
  $ snap-pipe save --listen unix:/run/vm.sock --multifd-channels 4 /path/vm.qcow2 &
  (qemu) migrate_set_capability multifd on
  (qemu) migrate_set_parameter multifd-channels 4
  (qemu) migrate "unix:/run/vm.sock"
IMG is marked complete only after everything is on disk. A failed save exits non-zero with one line naming IMG
and the cause, and writes the cause into IMG, which stays incomplete ('snap-pipe info IMG' shows it).
QEMU never reads an exec: child's exit status: without its return path it reports a failure only while it is
still writing, so a failure after its last byte leaves it saying "completed". With the return-path capability
  (qemu) migrate_set_capability return-path on
QEMU waits for save's answer: "completed" then means IMG is complete on disk, and a failed save fails the
migration (paused or running guests; QEMU refuses return-path with background-snapshot).`;


function formatReport(r: SaveReport): string {
  const s = r.stages;
  const ms = (x: number) => `${(x / 1000).toFixed(2)}s`;
  return [
    `snap-pipe save: ${r.path}: ${formatBytes(r.streamBytes)} of stream in ${r.seconds.toFixed(2)}s (${r.streamMBps.toFixed(0)} MB/s)`,
    `  pages: ${r.dataPages} data, ${r.zeroPages} zero, ${r.resentPages} re-sent; ${r.blocks} RAM blocks; device state ${formatBytes(r.deviceStateBytes)}`,
    `  written: ${formatBytes(r.bytesWritten)} in ${r.writeCalls} writes, ${r.dataClusters} data clusters (${r.rewrittenClusters} rewritten, ${r.partialChunks} partial chunks), file ${formatBytes(r.fileBytes)}, ${r.io} I/O at queue depth ${r.queueDepth}${r.direct ? '' : ', buffered'}`,
    `  overwritten pages: ${formatBytes(r.oldContentBytes)} of old content read in ${r.oldContentReads} reads, for the checksums of rewritten clusters`,
    `  ring: ${r.ring.slots} x 1 MiB slots, ${formatBytes(r.ring.inputBytes)} input, ${formatBytes(r.ring.parkBytes)} park pool, ${formatBytes(r.ring.oldContentBytes)} for old content, up to ${r.ring.maxOpenChunks} open chunks; CRC-32C and copies by ${r.checksum}`,
    `  reader:    busy ${ms(s.reader.busyMs)}, waiting on QEMU ${ms(s.reader.upstreamWaitMs)}, on coalescer ${ms(s.reader.downstreamWaitMs)}`,
    `  coalescer: busy ${ms(s.coalescer.busyMs)}, waiting on reader ${ms(s.coalescer.upstreamWaitMs)}, on writer ${ms(s.coalescer.downstreamWaitMs)}`,
    `  writer:    busy ${ms(s.writer.busyMs)}, waiting on coalescer ${ms(s.writer.upstreamWaitMs)}, in disk writes ${ms(s.writer.downstreamWaitMs)}`,
    `  finish:    ${ms(r.finishMs)} (metadata, tables, fdatasync)`,
    `  start-up:  stage threads ready ${ms(r.startup.stagesReadyMs)}, first byte read ${ms(r.startup.firstReadMs)}, first write ${ms(r.startup.firstWriteMs)} after the process started`,
    ...(r.multifd ? [`  multifd:   ${r.multifd.channels.length} channels, ${r.multifd.syncs} sync points`] : []),
    ...(r.multifd?.channels ?? []).map(
      (c) =>
        `  channel ${c.channel}: ${c.packets} packets (${c.dataPages} data pages, ${c.zeroPages} zero), ${formatBytes(c.bytes)}; busy ${ms(c.busyMs)}, waiting on QEMU ${ms(c.upstreamWaitMs)}, on coalescer ${ms(c.downstreamWaitMs)}`,
    ),
  ]
    .map(printable)
    .join('\n');
}

export async function cmdSave(argv: string[]): Promise<number> {
  const { flags, positionals } = parseArgs('save', argv, SAVE_FLAGS);
  if (flags.has('help')) {
    printOut(formatHelp('snap-pipe save IMG [options] < STREAM, or snap-pipe save IMG --listen unix:PATH [options]', SAVE_ABOUT, SAVE_FLAGS));
    return 0;
  }
  const path = onePath('save', positionals);
  const ringBytes = flags.has('ring-size') ? parseSize('save', 'ring-size', flags.get('ring-size') as string) : DEFAULT_RING_BYTES;
  const queueDepth = integerFlag('save', flags, 'queue-depth', 1, 4096, DEFAULT_QUEUE_DEPTH);
  const endTimeoutS = integerFlag('save', flags, 'end-timeout', 1, 3600, DEFAULT_END_TIMEOUT_S);
  const stats = flags.get('stats');
  const ioFlag = parseIo('save', flags.get('io'));
  const listenSpec = flags.get('listen');
  const listen =
    typeof listenSpec === 'string'
      ? {
          path: unixSocketPath('--listen', listenSpec),
          acceptTimeoutMs: integerFlag('save', flags, 'accept-timeout', 1, 86_400, DEFAULT_ACCEPT_TIMEOUT_S) * 1000,
          channels: integerFlag('save', flags, 'multifd-channels', 0, MULTIFD_CHANNELS_MAX, 0),
          stallTimeoutMs: integerFlag('save', flags, 'stall-timeout', 1, 86_400, DEFAULT_STALL_TIMEOUT_S) * 1000,
        }
      : undefined;
  if (!listen && flags.has('accept-timeout')) usage('save: --accept-timeout goes with --listen');
  if (!listen && flags.has('stall-timeout')) usage('save: --stall-timeout goes with --listen');
  if (!listen && flags.has('multifd-channels')) usage('save: --multifd-channels goes with --listen (QEMU opens multifd channels over a socket only)');
  if (listen) {
    // Before the image is touched; imported only here, so a save from stdin starts without the socket code.
    const { freeListenPath } = await import('../save/listener.js');
    freeListenPath(listen.path);
  }
  // isatty, not process.stdin: touching process.stdin would put fd 0 in non-blocking mode under the reader.
  if (!listen && isatty(0)) usage('save: stdin is a terminal; pipe a QEMU migration stream into it (see snap-pipe save --help)');

  const pipeline = new SavePipeline({
    path,
    ringBytes,
    queueDepth,
    direct: !flags.has('no-direct'),
    force: flags.has('force'),
    io: ioFlag,
    endTimeoutMs: endTimeoutS * 1000,
    switchoverAck: flags.has('switchover-ack'),
    listen,
    // The test seam of the save pipeline (SaveOptions.stageFixtureDir), set by the fault tests only.
    stageFixtureDir: process.env.SNAP_PIPE_TEST_STAGE_DIR,
    onNote: (line) => tellErr(`snap-pipe: ${printable(line)}\n`),
  });
  const onSignal = (sig: NodeJS.Signals) => {
    pipeline.abort();
    tellErr(`snap-pipe save: ${sig}: stopped; ${printable(path)} is left marked incomplete\n`);
    process.exit(sig === 'SIGINT' ? 130 : 143);
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  const report = await pipeline.run();
  writeStats(stats, () => formatReport(report), report);
  return 0;
}

