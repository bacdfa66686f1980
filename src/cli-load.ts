// `snap-pipe load IMG`: writes the migration stream stored in IMG to stdout, for a QEMU started with -incoming defer.
// Only --help prints to stdout; everything else for people goes to stderr (stdout is the stream).
import { writeFileSync } from 'node:fs';
import { isatty } from 'node:tty';
import { formatHelp, parseArgs, parseInteger, type FlagSpec } from './args.js';
import { SnapPipeError } from './errors.js';
import { formatBytes } from './image/info.js';
import { DEFAULT_LOAD_QUEUE_DEPTH, LOAD_QUEUE_DEPTH_MAX, runLoad, type LoadReport } from './pipeline/load.js';

const STDOUT_FD = 1;

export const LOAD_FLAGS: Record<string, FlagSpec> = {
  io: { kind: 'value', valueName: 'uring|sync', help: 'I/O backend (default: uring where io_uring works, else sync)' },
  'no-direct': { kind: 'bool', help: 'buffered reads, for file systems without O_DIRECT (tmpfs)' },
  'no-verify': { kind: 'bool', help: 'send clusters even if their CRC-32 does not match the one stored at save' },
  'queue-depth': { kind: 'value', valueName: 'N', help: `cluster reads kept in flight (default ${DEFAULT_LOAD_QUEUE_DEPTH})` },
  stats: { kind: 'optional-value', valueName: 'FILE', help: 'at the end, a summary on stderr; with =FILE, JSON to FILE' },
  help: { kind: 'bool', help: 'show this help' },
};

const LOAD_ABOUT = `Writes the migration stream stored in IMG (by snap-pipe save) to stdout, for a QEMU started with the same
machine, memory size and devices plus -incoming defer:
  (qemu) migrate_incoming "exec:snap-pipe load /path/vm.qcow2"
The image is checked before anything is written; zero pages go first, then the data clusters in file order, each
checked against the CRC-32 recorded at save (a mismatch stops the stream before the device state, so QEMU fails
the migration instead of running on damaged memory), then the device state. Then 'cont' resumes the guest.`;

function usage(msg: string): never {
  throw new SnapPipeError('USAGE', msg);
}

function formatLoadReport(r: LoadReport): string {
  const ms = (x: number) => `${(x / 1000).toFixed(2)}s`;
  return [
    `snap-pipe load: ${r.path}: ${formatBytes(r.bytesOut)} of stream in ${r.seconds.toFixed(2)}s (${r.outMBps.toFixed(0)} MB/s)`,
    `  pages: ${r.dataPages} data, ${r.zeroPages} zero, ${r.unsentPages} never sent; ${r.blocks} RAM blocks; device state ${formatBytes(r.deviceStateBytes)}`,
    `  read: ${formatBytes(r.bytesRead)} in ${r.dataClusters} clusters${r.direct ? '' : ' (buffered)'}, ${r.readBackend} reads, queue depth ${r.queueDepth}`,
    `  time: reading ${ms(r.readMs)}, ${r.verified ? `verifying ${ms(r.verifyMs)}` : 'not verified'}, writing to the pipe ${ms(r.writeMs)} (${r.writeCalls} writes, ${r.ramSections} ram sections)`,
  ].join('\n');
}

export async function cmdLoad(argv: string[]): Promise<number> {
  const { flags, positionals } = parseArgs('load', argv, LOAD_FLAGS);
  if (flags.has('help')) {
    process.stdout.write(formatHelp('snap-pipe load IMG [options] > STREAM', LOAD_ABOUT, LOAD_FLAGS));
    return 0;
  }
  if (positionals.length === 0) usage('load: missing IMG (see snap-pipe load --help)');
  if (positionals.length > 1) usage(`load: unexpected argument '${positionals[1]}'`);
  const path = positionals[0];
  const queueDepth = flags.has('queue-depth')
    ? parseInteger('load', 'queue-depth', flags.get('queue-depth') as string, 1, LOAD_QUEUE_DEPTH_MAX)
    : DEFAULT_LOAD_QUEUE_DEPTH;
  const stats = flags.get('stats');
  const io = flags.get('io') ?? 'auto';
  if (io !== 'uring' && io !== 'sync' && io !== 'auto') usage(`load: --io ${io}: must be uring or sync`);
  // isatty, not process.stdout: touching process.stdout could switch fd 1 to non-blocking mode.
  if (isatty(STDOUT_FD)) usage('load: stdout is a terminal; redirect it or run under QEMU (see snap-pipe load --help)');

  const report = await runLoad({
    path,
    out: STDOUT_FD,
    direct: !flags.has('no-direct'),
    verify: !flags.has('no-verify'),
    queueDepth,
    io,
    onNote: (line) => process.stderr.write(`snap-pipe: ${line}\n`),
  });
  if (stats === true) process.stderr.write(formatLoadReport(report) + '\n');
  else if (typeof stats === 'string') writeFileSync(stats, JSON.stringify(report, null, 2) + '\n');
  return 0;
}
