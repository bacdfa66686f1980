// `snap-pipe verify IMG`: reads the whole image, checks its structure and every cluster checksum, prints a summary.
// Exit 0 only for a sound image; otherwise the summary (when the structure allowed one) and one line on stderr.
import { formatHelp, integerFlag, onePath, parseArgs, parseIo, type FlagSpec } from './args.js';
import { SnapPipeError } from '../errors.js';
import { formatBytes } from '../format/text.js';
import { printOut, tellErr } from '../output.js';
import { jsonText, printable } from '../format/text.js';
import {
  DEFAULT_VERIFY_QUEUE_DEPTH,
  VERIFY_QUEUE_DEPTH_MAX,
  VERIFY_THREADS_MAX,
  runVerify,
  type VerifyReport,
} from '../verify/verify.js';

/**
 * CRCs on the main thread by default. Measured on the 2-core machine (1 GiB of data clusters, best runs): O_DIRECT
 * from disk, main thread ~1.6-2.2 GB/s vs a piscina pool of 2 threads ~1.3-2.0 GB/s (the disk bounds both, the pool
 * adds a message per cluster); from the page cache (--no-direct) 2.6 GB/s vs 1.9 GB/s. (Those figures
 * were taken with zlib's CRC-32, ~5.5 GB/s on one core; CRC-32C by the CPU instruction runs at ~16 GB/s, so the
 * checksum is even further from being the bottleneck.) --threads N keeps the pool for machines where it is.
 */
export const DEFAULT_VERIFY_THREADS = 0;

export const VERIFY_FLAGS: Record<string, FlagSpec> = {
  threads: { kind: 'value', valueName: 'N', help: `CRC threads (piscina pool; 0 = on the main thread; default ${DEFAULT_VERIFY_THREADS})` },
  io: { kind: 'value', valueName: 'uring|sync', help: 'I/O backend (default: uring where io_uring works, else sync)' },
  'no-direct': { kind: 'bool', help: 'buffered reads, for file systems without O_DIRECT' },
  'queue-depth': { kind: 'value', valueName: 'N', help: `cluster reads kept in flight (default ${DEFAULT_VERIFY_QUEUE_DEPTH})` },
  json: { kind: 'bool', help: 'print the summary as JSON' },
  help: { kind: 'bool', help: 'show this help' },
};

const VERIFY_ABOUT = `Reads the whole of IMG (written by snap-pipe save) and checks it: the QCOW2 header, tables and refcounts
against the layout snap-pipe writes, the metadata and its checksums, the stream parts load would send, and the
CRC-32C of every data cluster against the one recorded at save. Prints a summary; exits 0 only for a sound image.`;

export function formatVerifyReport(r: VerifyReport): string {
  const lines = [
    `snap-pipe verify: ${r.path}: ${r.sound ? 'sound' : 'DAMAGED'}`,
    `  structure: ok (QCOW2 header, L1/L2 tables, refcounts, metadata, stream parts)`,
    `  clusters:  ${r.dataClusters} data clusters checked, ${r.badClusters} with a bad checksum`,
    `  pages:     ${r.dataPages} data, ${r.zeroPages} zero, ${r.unsentPages} never sent; ${r.blocks} RAM blocks; device state ${formatBytes(r.deviceStateBytes)}`,
    `  read:      ${formatBytes(r.bytesRead)} in ${r.seconds.toFixed(2)}s (${r.readMBps.toFixed(0)} MB/s), ${r.io} reads${r.direct ? '' : ' (buffered)'} at queue depth ${r.queueDepth}, CRCs ${r.threads === 0 ? 'on the main thread' : `on ${r.threads} threads`}`,
  ];
  for (const m of r.mismatches) {
    lines.push(
      `  bad: block ${m.block} offset 0x${m.blockOffsetBytes.toString(16)} (chunk ${m.chunk}), cluster at byte ${m.hostOffsetBytes}: ` +
        `stored 0x${m.storedCrc32.toString(16).padStart(8, '0')}, read 0x${m.readCrc32.toString(16).padStart(8, '0')}`,
    );
  }
  if (r.badClusters > r.mismatches.length) lines.push(`  ... and ${r.badClusters - r.mismatches.length} more`);
  return lines.map(printable).join('\n');
}

export async function cmdVerify(argv: string[]): Promise<number> {
  const { flags, positionals } = parseArgs('verify', argv, VERIFY_FLAGS);
  if (flags.has('help')) {
    printOut(formatHelp('snap-pipe verify IMG [options]', VERIFY_ABOUT, VERIFY_FLAGS));
    return 0;
  }
  const path = onePath('verify', positionals);
  const threads = integerFlag('verify', flags, 'threads', 0, VERIFY_THREADS_MAX, DEFAULT_VERIFY_THREADS);
  const queueDepth = integerFlag('verify', flags, 'queue-depth', 1, VERIFY_QUEUE_DEPTH_MAX, DEFAULT_VERIFY_QUEUE_DEPTH);
  const io = parseIo('verify', flags.get('io'));

  const report = await runVerify({
    path,
    direct: !flags.has('no-direct'),
    io,
    queueDepth,
    threads,
    onNote: (line) => tellErr(`snap-pipe: ${printable(line)}\n`),
  });
  printOut(flags.has('json') ? jsonText(report) + '\n' : formatVerifyReport(report) + '\n');
  if (!report.sound) {
    const m = report.mismatches[0];
    throw new SnapPipeError(
      'CHECKSUM',
      `${path}: ${report.badClusters} of ${report.dataClusters} data clusters fail their checksum ` +
        `(first: block ${m.block} offset 0x${m.blockOffsetBytes.toString(16)}, cluster at byte ${m.hostOffsetBytes}); load would refuse them`,
    );
  }
  return 0;
}
