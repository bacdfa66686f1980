// `snap-pipe load IMG`: writes the migration stream stored in IMG to stdout, for a QEMU started with -incoming defer.
// Only --help prints to stdout; everything else for people goes to stderr (stdout is the stream).
import { fstatSync, writeSync } from 'node:fs';
import { isatty } from 'node:tty';
import { formatHelp, integerFlag, onePath, parseArgs, parseInteger, parseIo, unixSocketPath, usage, type FlagSpec } from './args.js';
import { MULTIFD_CHANNELS_MAX } from '../format/stream/multifd.js';
import { printOut, tellErr, writeStats } from '../output.js';
import { formatBytes, printable } from '../format/text.js';
import { runLoad, type LoadReport } from '../load/precopy.js';
import { DEFAULT_LOAD_QUEUE_DEPTH, LOAD_QUEUE_DEPTH_MAX } from '../load/source.js';
import type { PostcopyReport } from '../load/postcopy/session.js';

const STDIN_FD = 0;
const STDOUT_FD = 1;

export const LOAD_FLAGS: Record<string, FlagSpec> = {
  io: { kind: 'value', valueName: 'uring|sync', help: 'I/O backend (default: uring where io_uring works, else sync)' },
  'no-direct': { kind: 'bool', help: 'buffered reads, for file systems without O_DIRECT (tmpfs)' },
  'no-verify': { kind: 'bool', help: 'send clusters even if their CRC-32C does not match the one stored at save' },
  'queue-depth': { kind: 'value', valueName: 'N', help: `cluster reads kept in flight (default ${DEFAULT_LOAD_QUEUE_DEPTH})` },
  postcopy: {
    kind: 'optional-value',
    valueName: 'PERCENT',
    help: 'postcopy: the guest runs once the device state is in, pages it touches are served first (stdin is QEMU\'s return path); with =PERCENT, that share of the data pages goes first (default 0)',
  },
  connect: {
    kind: 'value',
    valueName: 'unix:PATH',
    help: 'send the stream to a QEMU waiting in migrate_incoming "unix:PATH" instead of stdout (precopy only)',
  },
  'multifd-channels': {
    kind: 'value',
    valueName: 'N',
    help: `with --connect: the destination has the multifd capability and multifd-channels N (2 unless set; 1 to ${MULTIFD_CHANNELS_MAX}): the data pages go over N channels side by side; default 0, one stream`,
  },
  stats: { kind: 'optional-value', valueName: 'FILE', help: 'at the end, a summary on stderr; with =FILE, JSON to FILE' },
  help: { kind: 'bool', help: 'show this help' },
};

const LOAD_ABOUT = `Writes the migration stream stored in IMG (by snap-pipe save) to stdout, for a QEMU started with the same
machine, memory size and devices plus -incoming defer:
  (qemu) migrate_incoming "exec:snap-pipe load /path/vm.qcow2"
The image is checked before anything is written; zero pages go first, then the data clusters in file order, each
checked against the CRC-32C recorded at save (a mismatch stops the stream before the device state, so QEMU fails
the migration instead of running on damaged memory), then the device state. Then 'cont' resumes the guest.
Or over a socket, with QEMU's multifd channels carrying the data pages side by side:
  (qemu) migrate_set_capability multifd on
  (qemu) migrate_set_parameter multifd-channels 2
  (qemu) migrate_incoming "unix:/run/vm-in.sock"
  $ snap-pipe load /path/vm.qcow2 --connect unix:/run/vm-in.sock --multifd-channels 2
With --postcopy the destination needs the postcopy-ram capability (migrate_set_capability postcopy-ram on, before
migrate_incoming): the device state goes first and the guest runs (at once unless QEMU was started with -S) while
the pages follow, the ones it touches ahead of the rest.`;


function formatLoadReport(r: LoadReport): string {
  const ms = (x: number) => `${(x / 1000).toFixed(2)}s`;
  return [
    `snap-pipe load: ${r.path}: ${formatBytes(r.bytesOut)} of stream in ${r.seconds.toFixed(2)}s (${r.outMBps.toFixed(0)} MB/s)`,
    `  pages: ${r.dataPages} data, ${r.zeroPages} zero, ${r.unsentPages} never sent; ${r.blocks} RAM blocks; device state ${formatBytes(r.deviceStateBytes)}`,
    `  read: ${formatBytes(r.bytesRead)} in ${r.dataClusters} clusters${r.direct ? '' : ' (buffered)'}, ${r.readBackend} reads, queue depth ${r.queueDepth}; CRC-32C by ${r.checksum}`,
    `  time: reading ${ms(r.readMs)}, ${r.verified ? `verifying ${ms(r.verifyMs)}` : 'not verified'}, writing to the pipe ${ms(r.writeMs)} (${r.writeCalls} writes, ${r.ramSections} ram sections)`,
    ...(r.multifd
      ? [`  multifd: ${r.multifd.channels} channels, ${r.multifd.syncs} sync points by ${r.multifd.syncBy === 'flush' ? 'MULTIFD_FLUSH' : 'EOS'}, ${r.multifd.packets} packets, ${formatBytes(r.multifd.bytesOut)} in ${ms(r.multifd.writeMs)}`]
      : []),
  ]
    .map(printable)
    .join('\n');
}

/**
 * QEMU 7.2 only starts an exec: incoming migration when its pipe becomes readable, and a pipe closed with nothing
 * written never is (HUP only): refused before the first byte, QEMU would wait forever. So when stdout is a pipe,
 * a refusal writes these bytes, which are not a migration stream (QEMU fails at once: "not a migration stream").
 * To a regular file (or anything else) nothing is written.
 */
export const REFUSAL_MARKER = new Uint8Array(4);

function writeRefusalMarker(): void {
  try {
    if (!fstatSync(STDOUT_FD).isFIFO()) return;
    writeSync(STDOUT_FD, REFUSAL_MARKER);
  } catch {
    // the reader is gone (EPIPE) or stdout is closed: the refusal being reported matters more
  }
}

function formatPostcopyReport(r: PostcopyReport): string {
  const ms = (x: number) => `${(x / 1000).toFixed(2)}s`;
  const at = (x: number | null) => (x === null ? '-' : `${(x / 1000).toFixed(3)}s`);
  const l = r.faultLatency;
  const f = (x: number) => `${x.toFixed(2)}ms`;
  return [
    `snap-pipe load --postcopy=${r.precopyPercent}: ${r.path}: ${formatBytes(r.bytesOut)} of stream in ${r.seconds.toFixed(2)}s (${r.outMBps.toFixed(0)} MB/s)`,
    `  pages: ${r.dataPages} data, ${r.zeroPages} zero, ${r.unsentPages} never saved (sent as zero); ${r.blocks} RAM blocks; device state ${formatBytes(r.deviceStateBytes)}`,
    `  precopy share: ${r.precopyDataPages} data pages in ${r.precopyClusters} clusters, ${r.precopyZeroPages} zero; ${r.discardRanges} ranges discarded in ${r.discardCommands} commands`,
    `  timeline: package sent ${at(r.packageSentMs)}, devices loaded ${at(r.devicesLoadedMs)}, EOF sent ${at(r.eofSentMs)}, SHUT ${at(r.shutMs)}`,
    `  requests: ${r.requests} for ${r.requestedPages} pages: ${r.requestedDataPages} data, ${r.requestedZeroPages} zero, ${r.requestedAlreadySent} already sent; ${r.requestReads} cluster reads for requests, ${r.evictions} dropped`,
    `  fault latency (${l.count} requests): p50 ${f(l.p50Ms)}, p90 ${f(l.p90Ms)}, p99 ${f(l.p99Ms)}, max ${f(l.maxMs)}, mean ${f(l.meanMs)}; ` +
      `waiting for their clusters ${f(r.requestReadWaitMs)}, writing them ${f(r.requestWriteMs)} in all`,
    `  read: ${formatBytes(r.bytesRead)} (${r.backgroundReads} background + ${r.requestReads} request cluster reads)${r.direct ? '' : ' (buffered)'}, ${r.readBackend} reads, queue depth ${r.queueDepth}`,
    `  time: reading ${ms(r.readMs)}, ${r.verified ? `verifying ${ms(r.verifyMs)}` : 'not verified'}, writing to the pipe ${ms(r.writeMs)} (${r.writeCalls} writes, ${r.ramSections} ram sections)`,
  ]
    .map(printable)
    .join('\n');
}

export async function cmdLoad(argv: string[]): Promise<number> {
  const progress: LoadProgressSeen = { bytesOut: 0, streamOnStdout: true };
  try {
    return await load(argv, progress);
  } catch (err) {
    // Any refusal, a bad command line included: under QEMU it must not leave the pipe empty. Never after stream
    // bytes went out (both runners report every write), where the marker would join the stream.
    if (progress.streamOnStdout && progress.bytesOut === 0) writeRefusalMarker();
    throw err;
  }
}

/** What the failure path needs to know: does the stream go to stdout, and did bytes of it go out? */
interface LoadProgressSeen {
  bytesOut: number;
  /** False with --connect: QEMU reads a socket, and stdout is no stream to mark. */
  streamOnStdout: boolean;
}

async function load(argv: string[], progress: LoadProgressSeen): Promise<number> {
  const { flags, positionals } = parseArgs('load', argv, LOAD_FLAGS);
  if (flags.has('help')) {
    printOut(formatHelp('snap-pipe load IMG [options] > STREAM, or snap-pipe load IMG --connect unix:PATH [options]', LOAD_ABOUT, LOAD_FLAGS));
    return 0;
  }
  const path = onePath('load', positionals);
  const queueDepth = integerFlag('load', flags, 'queue-depth', 1, LOAD_QUEUE_DEPTH_MAX, DEFAULT_LOAD_QUEUE_DEPTH);
  const stats = flags.get('stats');
  const io = parseIo('load', flags.get('io'));
  const postcopy = flags.get('postcopy');
  const precopyPercent = postcopy === undefined ? undefined : postcopy === true ? 0 : parseInteger('load', 'postcopy', postcopy, 0, 100);
  const connectSpec = flags.get('connect');
  const connect = connectSpec === undefined ? undefined : unixSocketPath('load: --connect', connectSpec);
  const channels = integerFlag('load', flags, 'multifd-channels', 0, MULTIFD_CHANNELS_MAX, 0);
  if (!connect && flags.has('multifd-channels')) usage('load: --multifd-channels goes with --connect (QEMU takes multifd channels over a socket only)');
  if (connect && precopyPercent !== undefined) usage('load: --postcopy goes with exec: (stdin is the return path), not with --connect');
  // isatty, not process.stdout: touching process.stdout could switch fd 1 to non-blocking mode.
  if (!connect && isatty(STDOUT_FD)) usage('load: stdout is a terminal; redirect it or run under QEMU (see snap-pipe load --help)');
  if (precopyPercent !== undefined && isatty(STDIN_FD)) {
    usage('load: --postcopy: stdin is a terminal; it must be QEMU\'s return path (run under migrate_incoming exec:)');
  }

  if (precopyPercent !== undefined) {
    // Imported only here: a plain load (QEMU waits for its first bytes) starts without compiling it.
    const { runPostcopyLoad } = await import('../load/postcopy/session.js');
    const report = await runPostcopyLoad({
      path,
      out: STDOUT_FD,
      rpIn: STDIN_FD,
      direct: !flags.has('no-direct'),
      verify: !flags.has('no-verify'),
      queueDepth,
      io,
      precopyPercent,
      onNote: (line) => tellErr(`snap-pipe: ${printable(line)}\n`),
      onProgress: (p) => (progress.bytesOut = p.bytesOut),
    });
    writeStats(stats, () => formatPostcopyReport(report), report);
    return 0;
  }

  if (connect) progress.streamOnStdout = false;
  const conns = connect ? await (await import('../load/connect.js')).StreamConnections.open(connect, channels) : undefined;
  try {
    const report = await runLoad({
      path,
      out: conns ? conns.main : STDOUT_FD,
      multifdFds: conns && channels > 0 ? conns.channels : undefined,
      direct: !flags.has('no-direct'),
      verify: !flags.has('no-verify'),
      queueDepth,
      io,
      onNote: (line) => tellErr(`snap-pipe: ${printable(line)}\n`),
      onProgress: (p) => (progress.bytesOut = p.bytesOut),
    });
    writeStats(stats, () => formatLoadReport(report), report);
    return 0;
  } finally {
    conns?.close();
  }
}
