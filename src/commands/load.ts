// `snap-pipe load IMG`: writes the migration stream stored in IMG to stdout, for a QEMU started with -incoming defer.
// Only --help prints to stdout; everything else for people goes to stderr (stdout is the stream).
import { fstatSync, writeSync } from 'node:fs';
import { isatty } from 'node:tty';
import { formatHelp, integerFlag, onePath, parseArgs, parseInteger, parseIo, unixSocketPath, usage, type FlagSpec, type Parsed } from './args.js';
import { MULTIFD_CHANNELS_MAX } from '../format/stream/multifd.js';
import { printOut, tellErr, writeStats } from '../output.js';
import { formatBytes, printable } from '../format/text.js';
import { runLoad, type LoadReport } from '../load/precopy.js';
import { DEFAULT_LOAD_QUEUE_DEPTH, LOAD_QUEUE_DEPTH_MAX } from '../load/source.js';
import type { PostcopyReport } from '../load/postcopy/session.js';
import type { OpenTarget, StreamConnections } from '../load/connect.js';

const STDIN_FD = 0;
const STDOUT_FD = 1;
/** --connect-timeout's default and bound, seconds. */
const DEFAULT_CONNECT_WAIT_S = 10;
const CONNECT_WAIT_S_MAX = 24 * 3600;

export const LOAD_FLAGS: Record<string, FlagSpec> = {
  io: { kind: 'value', valueName: 'uring|sync', help: 'I/O backend (default: uring where io_uring works, else sync)' },
  'no-direct': { kind: 'bool', help: 'buffered reads, for file systems without O_DIRECT (tmpfs)' },
  'no-verify': { kind: 'bool', help: 'send clusters even if their CRC-32C does not match the one stored at save' },
  'queue-depth': { kind: 'value', valueName: 'N', help: `cluster reads kept in flight (default ${DEFAULT_LOAD_QUEUE_DEPTH})` },
  postcopy: {
    kind: 'optional-value',
    valueName: 'PERCENT',
    help: 'postcopy: the guest runs once the device state is in, pages it touches are served first (QEMU asks for them on stdin, or on the --connect socket); with =PERCENT, that share of the data pages goes first (default 0)',
  },
  connect: {
    kind: 'value',
    valueName: 'unix:PATH',
    help: 'send the stream to a QEMU waiting in migrate_incoming "unix:PATH" (or started with -incoming unix:PATH) instead of stdout; with --postcopy the return path comes back on it',
  },
  'connect-timeout': {
    kind: 'value',
    valueName: 'SECONDS',
    help: `with --connect: how long to wait for QEMU to listen there (default ${DEFAULT_CONNECT_WAIT_S}): load may start first, and the image is checked before it waits`,
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
load --connect may start before QEMU listens (it waits --connect-timeout): started beforehand, its own start-up is
out of the restore's time.
With --postcopy the destination needs the postcopy-ram capability (migrate_set_capability postcopy-ram on, before
migrate_incoming): the device state goes first and the guest runs (at once unless QEMU was started with -S) while
the pages follow, the ones it touches ahead of the rest. QEMU asks for those pages on its return path: stdin under
exec:, the socket itself with --connect (one socket: not with --multifd-channels).`;


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
  const dest = parseDestination(flags, precopyPercent !== undefined);
  const common = {
    path,
    direct: !flags.has('no-direct'),
    verify: !flags.has('no-verify'),
    queueDepth,
    io,
    onNote: (line: string) => tellErr(`snap-pipe: ${printable(line)}\n`),
    onProgress: (p: { bytesOut: number }) => (progress.bytesOut = p.bytesOut),
  };
  if (dest.socket) progress.streamOnStdout = false;
  const { target, close } = destinationOpener(dest);
  try {
    if (precopyPercent !== undefined) {
      // Imported only here: a plain load (QEMU waits for its first bytes) starts without compiling it.
      const { runPostcopyLoad } = await import('../load/postcopy/session.js');
      const report = await runPostcopyLoad({ ...common, target, precopyPercent });
      writeStats(stats, () => formatPostcopyReport(report), report);
    } else {
      const report = await runLoad({ ...common, target });
      writeStats(stats, () => formatLoadReport(report), report);
    }
    return 0;
  } finally {
    close();
  }
}

/** Where the stream goes: stdout (QEMU's exec:), or with `socket` a QEMU listening there, over `channels` more. */
interface Destination {
  socket?: string;
  channels: number;
  /** --connect-timeout, seconds. */
  waitS: number;
}

function parseDestination(flags: Parsed['flags'], postcopy: boolean): Destination {
  const spec = flags.get('connect');
  const socket = spec === undefined ? undefined : unixSocketPath('load: --connect', spec);
  const channels = integerFlag('load', flags, 'multifd-channels', 0, MULTIFD_CHANNELS_MAX, 0);
  const waitS = integerFlag('load', flags, 'connect-timeout', 1, CONNECT_WAIT_S_MAX, DEFAULT_CONNECT_WAIT_S);
  if (!socket && flags.has('multifd-channels')) usage('load: --multifd-channels goes with --connect (QEMU takes multifd channels over a socket only)');
  if (!socket && flags.has('connect-timeout')) usage('load: --connect-timeout goes with --connect');
  if (postcopy && channels > 0) usage('load: --postcopy goes over one socket, not with --multifd-channels (QEMU 10.0 refuses postcopy-ram with multifd)');
  // isatty, not process.stdout: touching process.stdout could switch fd 1 to non-blocking mode.
  if (!socket && isatty(STDOUT_FD)) usage('load: stdout is a terminal; redirect it or run under QEMU (see snap-pipe load --help)');
  if (!socket && postcopy && isatty(STDIN_FD)) {
    usage('load: --postcopy: stdin is a terminal; it must be QEMU\'s return path (run under migrate_incoming exec:, or use --connect)');
  }
  return { socket, channels, waitS };
}

/**
 * The target runLoad or runPostcopyLoad opens once the image is checked (a bad image is refused before QEMU is
 * touched), and `close` for the connections it made.
 */
function destinationOpener(d: Destination): { target: OpenTarget; close: () => void } {
  let conns: StreamConnections | undefined;
  const target: OpenTarget = async () => {
    if (!d.socket) return { out: STDOUT_FD, returnPath: STDIN_FD };
    const { StreamConnections } = await import('../load/connect.js');
    const onWait = () => tellErr(`snap-pipe: load: waiting for QEMU to listen on unix:${printable(d.socket!)} (up to ${d.waitS} s)\n`);
    conns = await StreamConnections.open(d.socket, d.channels, d.waitS * 1000, onWait);
    return { out: conns.main, multifdFds: d.channels > 0 ? conns.channels : undefined, returnPath: conns.main, returnPathSocket: conns.mainSocket };
  };
  return { target, close: () => conns?.close() };
}
