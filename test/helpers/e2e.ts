// Shared pieces of the end-to-end tests: exec: URIs for snap-pipe, running a command, snap-pipe info, and an image's
// pc.ram compared with a pmemsave dump (the comparison itself lives in tools/qemu/compare.ts).
import { spawnSync } from 'node:child_process';
import { statSync } from 'node:fs';
import { expect } from 'vitest';
import type { ImageInfo } from '../../src/image/info.js';
import { firstDifference, LEGACY_WINDOW } from '../../tools/qemu/compare.js';
import { shellQuote, snapPipeBin } from '../../tools/qemu/guest.js';
import type { Qemu } from '../../tools/qemu/versions.js';

const MiB = 1024 * 1024;
const pageBytes = 4096;

/** What `snap-pipe info --json` prints for a complete image: every optional field is there. */
export type Info = Required<ImageInfo>;

export function saveUri(img: string, args: string[] = []): string {
  return `exec:${[snapPipeBin(), 'save', img, ...args].map(shellQuote).join(' ')}`;
}

export function loadUri(img: string, args: string[] = []): string {
  return `exec:${[snapPipeBin(), 'load', img, ...args].map(shellQuote).join(' ')}`;
}

export { firstDifference, LEGACY_WINDOW };

export function run(cmd: string, args: string[], timeoutMs: number, env: Record<string, string> = {}): { stdout: string; stderr: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: timeoutMs, maxBuffer: 64 * MiB, env: { ...process.env, ...env } });
  if (r.error) throw new Error(`${cmd} ${args.join(' ')}: ${r.error.message}`);
  if (r.status !== 0) {
    throw new Error(`${cmd} ${args.join(' ')} exited ${r.status ?? r.signal}\n${r.stdout}\n${r.stderr}`.trim());
  }
  return { stdout: r.stdout, stderr: r.stderr };
}

export function snapPipeInfo(img: string): Info {
  const { stdout } = run(process.execPath, [snapPipeBin(), 'info', img, '--json'], 60_000);
  try {
    return JSON.parse(stdout) as Info;
  } catch {
    throw new Error(`snap-pipe info --json printed no JSON:\n${stdout.slice(0, 2000)}`);
  }
}

/** Copies [offsetBytes, offsetBytes + lengthBytes) of the image's virtual disk to a raw file, with qemu-img. */
export function extractRegion(qemu: Qemu, img: string, offsetBytes: number, lengthBytes: number, rawPath: string): void {
  const opts = `driver=raw,offset=${offsetBytes},size=${lengthBytes},file.driver=qcow2,file.file.filename=${img.replace(/,/g, ',,')}`;
  run(qemu.img, ['convert', '--image-opts', opts, '-O', 'raw', rawPath], 300_000, qemu.env);
}

/** The image's pc.ram, extracted with qemu-img, equals the pmemsave dump byte for byte (outside the legacy window). */
export async function expectPcRamMatches(qemu: Qemu, img: string, info: Info, dump: string, raw: string): Promise<void> {
  const ram = info.blocks.find((b) => b.id === 'pc.ram')!;
  extractRegion(qemu, img, ram.virtOffsetBytes, ram.lengthBytes, raw);
  expect(statSync(raw).size).toBe(ram.lengthBytes);
  const diff = await firstDifference(dump, raw, ram.lengthBytes, [LEGACY_WINDOW]);
  expect(
    diff,
    diff < 0 ? '' : `pc.ram differs from pmemsave at 0x${diff.toString(16)} (page 0x${(diff - (diff % pageBytes)).toString(16)})`,
  ).toBe(-1);
}
