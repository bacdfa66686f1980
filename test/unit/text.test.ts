// Text from images on its way out: printable() and jsonText() leave no control character raw, JSON stays JSON and
// gives every string back; formatInfo escapes every field and survives an image's worth of blocks.
import { describe, expect, it } from 'vitest';
import { formatInfo } from '../../src/commands/info.js';
import type { BlockSummary, ImageInfo } from '../../src/image/info.js';
import { jsonText, printable } from '../../src/format/text.js';

const CONTROL = /[\u0000-\u001f\u007f-\u009f]/;

/** Every code unit 0x0000-0x00ff, and a few beyond (a lone surrogate, U+2028, an astral character). */
const ALL_LATIN1 = Array.from({ length: 256 }, (_, c) => String.fromCharCode(c)).join('') + '\ud800\u2028\u{1f600}';

describe('printable', () => {
  it('escapes C0, DEL and C1 as \\xNN and leaves everything else', () => {
    expect(printable('a\x1b[31mb\nc\x9bd\x7fe\x00')).toBe('a\\x1b[31mb\\x0ac\\x9bd\\x7fe\\x00');
    expect(printable('pc-i440fx-7.2 é ü \u00a0')).toBe('pc-i440fx-7.2 é ü \u00a0');
    expect(CONTROL.test(printable(ALL_LATIN1))).toBe(false);
    expect(printable(printable(ALL_LATIN1)), 'idempotent').toBe(printable(ALL_LATIN1));
  });
});

describe('jsonText', () => {
  it('escapes DEL and C1 too, and parses back to the same value', () => {
    const value = { name: ALL_LATIN1, list: ['\x9b', '\x7f', 'x'] };
    const text = jsonText(value);
    expect(CONTROL.test(text.replace(/\n/g, ''))).toBe(false);
    expect(text).toContain('\\u009b');
    expect(text).toContain('\\u007f');
    expect(JSON.parse(text)).toEqual(value);
    expect(jsonText({ a: 1 })).toBe(JSON.stringify({ a: 1 }, null, 2));
  });
});

function summary(id: string, i: number): BlockSummary {
  return { id, lengthBytes: 4096, virtOffsetBytes: i * 1048576, pages: 1, dataPages: 0, zeroPages: 1, unsentPages: 0 };
}

function infoOf(blocks: BlockSummary[], machineType = 'pc-i440fx-7.2'): ImageInfo {
  return {
    path: '/x/vm.qcow2',
    complete: true,
    formatVersion: 2,
    machineType,
    fileBytes: 1 << 30,
    virtualBytes: blocks.length * 1048576,
    clusterBytes: 1048576,
    dataClusters: 0,
    deviceStateBytes: 100,
    blocks,
    dataPages: 0,
    zeroPages: blocks.length,
    resentPages: 0,
    capabilities: ['x-ignore-shared\x1b]0;title\x07'],
    savedAt: '2025-01-01T00:00:00.000Z',
    writer: 'snap-pipe\x9b1m',
  };
}

describe('formatInfo', () => {
  it('every field from the image escaped, each block on its own line, names aligned on their escaped width', () => {
    const text = formatInfo(infoOf([summary('pc.ram', 0), summary('evil\x1b[2J\nname\x9b', 1)], 'pc\x1b[31m\n'));
    expect(CONTROL.test(text.replace(/\n/g, ''))).toBe(false);
    const lines = text.split('\n');
    expect(lines).toContain('machine type:   pc\\x1b[31m\\x0a');
    expect(lines).toContain('capabilities:   x-ignore-shared\\x1b]0;title\\x07');
    expect(lines.some((l) => l.endsWith('by snap-pipe\\x9b1m'))).toBe(true);
    const blockLines = lines.slice(lines.indexOf('RAM blocks:') + 1);
    expect(blockLines).toHaveLength(2);
    expect(blockLines[1].startsWith('  evil\\x1b[2J\\x0aname\\x9b  ')).toBe(true);
    expect(blockLines[0].indexOf(' 4 KiB'), 'aligned').toBe(blockLines[1].indexOf(' 4 KiB'));
  });

  it('150000 blocks: no stack overflow, one line each', () => {
    const count = 150_000;
    const blocks = Array.from({ length: count }, (_, i) => summary(`/rom@many-${i}`, i));
    const lines = formatInfo(infoOf(blocks)).split('\n');
    expect(lines.length - lines.indexOf('RAM blocks:') - 1).toBe(count);
  });
});
