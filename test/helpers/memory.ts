// Guest memory as QEMU itself maps it, for comparing a guest with an image block by block: the flat view of the
// "memory" address space (HMP `info mtree -f`) lists each guest-physical range backed by RAM or ROM with the
// memory region behind it and the offset in that region. A RAM block is named after its region (a device's blocks
// carry the device path in front: `0000:00:01.0/vga.vram` for region `vga.vram`). pmemsave of a range reads exactly
// those bytes, so a dump of each range is an oracle that shares no code with snap-pipe, and it follows the PCI hole
// and NUMA nodes wherever QEMU puts them.
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { expect } from 'vitest';
import type { ImageInfo } from '../../src/image/info.js';
import { firstDifference } from '../../tools/qemu/compare.js';
import type { Guest } from '../../tools/qemu/guest.js';

export interface MappedRange {
  gpa: number;
  bytes: number;
  /** The memory region's name, as the flat view prints it. */
  region: string;
  /** Offset of the range's first byte in the region. */
  offset: number;
}

/** The RAM and ROM ranges of the address space `as` in `info mtree -f` output. */
export function parseFlatView(text: string, as = 'memory'): MappedRange[] {
  // HMP output through QMP ends its lines with CR LF.
  const views = text.replace(/\r\n/g, '\n').split(/^FlatView #\d+\n/m);
  const view = views.find((v) => new RegExp(`^ AS "${as}", root:`, 'm').test(v));
  if (!view) throw new Error(`no flat view for address space "${as}" in:\n${text.slice(0, 2000)}`);
  const out: MappedRange[] = [];
  const line = /^ +([0-9a-f]{16})-([0-9a-f]{16}) \(prio -?\d+, (?:ram|rom)\): (\S+)(?: @([0-9a-f]{16}))?/gm;
  for (let m = line.exec(view); m; m = line.exec(view)) {
    const gpa = parseInt(m[1], 16);
    out.push({ gpa, bytes: parseInt(m[2], 16) + 1 - gpa, region: m[3], offset: m[4] ? parseInt(m[4], 16) : 0 });
  }
  return out;
}

export async function mappedRanges(g: Guest): Promise<MappedRange[]> {
  return parseFlatView(await g.execute<string>('human-monitor-command', { 'command-line': 'info mtree -f' }));
}

/** The block a range's region belongs to: the block of that name, or the one whose name ends in '/' + region. */
export function blockOf(info: Required<Pick<ImageInfo, 'blocks'>>, region: string): NonNullable<ImageInfo['blocks']>[number] | undefined {
  return info.blocks.find((b) => b.id === region || b.id.endsWith(`/${region}`));
}

export interface RangeDumps {
  ranges: MappedRange[];
  /** One pmemsave file per range, in the order of `ranges`. */
  files: string[];
}

/** pmemsave of every RAM/ROM range of the guest into `dir` (prefix `name`). */
export async function dumpRanges(g: Guest, dir: string, name: string): Promise<RangeDumps> {
  const ranges = await mappedRanges(g);
  const files: string[] = [];
  for (const [i, r] of ranges.entries()) {
    const file = join(dir, `${name}-${i}.pmem`);
    await g.pmemsave(r.gpa, r.bytes, file, 300_000);
    expect(statSync(file).size).toBe(r.bytes);
    files.push(file);
  }
  return { ranges, files };
}

/**
 * Every range of RAM blocks in the image (raw: the image's virtual disk converted by qemu-img) equals its dump,
 * byte for byte; `blocks` must each be covered by at least one range. Returns the bytes compared per block.
 */
export async function expectRangesMatchImage(
  dumps: RangeDumps,
  info: Required<Pick<ImageInfo, 'blocks'>>,
  raw: string,
  blocks: string[],
): Promise<Map<string, number>> {
  const compared = new Map<string, number>();
  for (const [i, r] of dumps.ranges.entries()) {
    const b = blockOf(info, r.region);
    if (!b) continue; // a region that is not a migrated RAM block (none seen so far; counted below)
    expect(r.offset + r.bytes, `${r.region} @${r.offset.toString(16)} inside ${b.id}`).toBeLessThanOrEqual(b.lengthBytes);
    const diff = await firstDifference(dumps.files[i], raw, r.bytes, [], { bOffset: b.virtOffsetBytes + r.offset });
    expect(diff, diff < 0 ? '' : `${b.id} differs at block offset 0x${(r.offset + diff).toString(16)} (guest-physical 0x${(r.gpa + diff).toString(16)})`).toBe(-1);
    compared.set(b.id, (compared.get(b.id) ?? 0) + r.bytes);
  }
  for (const id of blocks) expect(compared.get(id) ?? 0, `bytes of ${id} compared`).toBeGreaterThan(0);
  return compared;
}

/** Two guests' dumps of the same ranges are equal, range by range. */
export async function expectSameRanges(a: RangeDumps, b: RangeDumps): Promise<void> {
  expect(b.ranges).toEqual(a.ranges);
  for (const [i, r] of a.ranges.entries()) {
    const diff = await firstDifference(a.files[i], b.files[i], r.bytes, []);
    expect(diff, diff < 0 ? '' : `${r.region} differs at region offset 0x${(r.offset + diff).toString(16)} (guest-physical 0x${(r.gpa + diff).toString(16)})`).toBe(-1);
  }
}
