// `snap-pipe info IMG [--json]`: what an image holds, for people and for scripts.
import { jsonText, printable } from '../format/text.js';
import { formatBytes } from '../format/text.js';
import { readInfo, type ImageInfo } from '../image/info.js';
import { incompleteWhy } from '../image/reader.js';
import { printOut } from '../output.js';
import { formatHelp, onePath, parseArgs, type FlagSpec } from './args.js';

const INFO_FLAGS: Record<string, FlagSpec> = {
  json: { kind: 'bool', help: 'print JSON' },
  help: { kind: 'bool', help: 'show this help' },
};

export async function cmdInfo(argv: string[]): Promise<number> {
  const { flags, positionals } = parseArgs('info', argv, INFO_FLAGS);
  if (flags.has('help')) {
    printOut(formatHelp('snap-pipe info IMG [--json]', 'Shows what a snap-pipe image holds: RAM blocks, pages stored as data and as zero, clusters, device state, whether the save completed.', INFO_FLAGS));
    return 0;
  }
  const info = readInfo(onePath('info', positionals));
  printOut(flags.has('json') ? jsonText(info) + '\n' : formatInfo(info) + '\n');
  return 0;
}

export function formatInfo(info: ImageInfo): string {
  const lines: string[] = [];
  lines.push(`image:          ${info.path}`);
  lines.push(`status:         ${info.complete ? 'complete' : `INCOMPLETE: ${incompleteWhy(info.failure)}`}`);
  lines.push(`format version: ${info.formatVersion}`);
  lines.push(`file size:      ${formatBytes(info.fileBytes)} (${formatBytes(info.clusterBytes)} clusters)`);
  if (!info.complete) return lines.map(printable).join('\n');
  if (info.machineType !== undefined) lines.push(`machine type:   ${info.machineType}`);
  if (info.virtualBytes !== undefined) lines.push(`virtual size:   ${formatBytes(info.virtualBytes)}`);
  if (info.dataClusters !== undefined) {
    lines.push(`data clusters:  ${info.dataClusters} (${formatBytes(info.dataClusters * info.clusterBytes)})`);
  }
  if (info.deviceStateBytes !== undefined) lines.push(`device state:   ${formatBytes(info.deviceStateBytes)}`);
  if (info.dataPages !== undefined) {
    lines.push(
      `pages:          ${info.dataPages} data, ${info.zeroPages ?? 0} zero, ${info.resentPages ?? 0} re-sent` +
        (info.sawRamEnd === undefined ? '' : info.sawRamEnd ? ' (migration with RAM end)' : ' (no RAM end section)'),
    );
  }
  if (info.capabilities !== undefined && info.capabilities.length > 0) {
    lines.push(`capabilities:   ${info.capabilities.join(', ')}`);
  }
  if (info.switchoverStarts) lines.push(`switch-over:    SWITCHOVER_START (QEMU 10.0 or later), replayed by load`);
  if (info.savedAt !== undefined) lines.push(`saved at:       ${info.savedAt}${info.writer ? ` by ${info.writer}` : ''}`);
  if (info.blocks !== undefined && info.blocks.length > 0) {
    lines.push('RAM blocks:');
    // A loop, not Math.max(...ids): spreading an image's block list into one call overflows the stack (150k blocks
    // did).
    const ids = info.blocks.map((b) => printable(b.id));
    let idWidth = 0;
    for (const id of ids) idWidth = Math.max(idWidth, id.length);
    info.blocks.forEach((b, i) => {
      lines.push(
        `  ${ids[i].padEnd(idWidth)}  ${formatBytes(b.lengthBytes).padStart(10)} at ${formatBytes(b.virtOffsetBytes).padStart(10)}` +
          `  ${b.dataPages} data, ${b.zeroPages} zero, ${b.unsentPages} unsent of ${b.pages} pages`,
      );
    });
  }
  // Every field read from the image (machine type, block names, writer, capabilities) with its control characters
  // escaped: each stays on its line and none reaches a terminal raw.
  return lines.map(printable).join('\n');
}
