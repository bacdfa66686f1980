// Images with more RAM blocks than a save accepts (MAX_BLOCKS), written through the image writer directly: what a
// hostile or future image may hold, for the commands that read images. The stream parts (head, RAM setup, device
// state) come from a real stream parsed in this thread, so load and verify find them consistent.
import { ImageWriter } from '../../src/image/writer.js';
import { layoutBlocks } from '../../src/format/image/qcow2.js';
import { FORMAT_VERSION, type SnapshotMeta } from '../../src/format/image/types.js';
import { PAGE_BYTES } from '../../src/format/units.js';
import { buildStream, type BlockSpec, type Op } from './model.js';
import { parseAll } from './parse.js';
import { streamParts } from '../../src/format/stream/parts.js';

/** `count` blocks of one page each, named `/rom@many-NNNNNN`; every third page sent as a zero page, no data. */
export function writeManyBlockImage(img: string, count: number): BlockSpec[] {
  const blocks: BlockSpec[] = [];
  for (let i = 0; i < count; i++) blocks.push({ id: `/rom@many-${String(i).padStart(6, '0')}`, lengthBytes: PAGE_BYTES });
  const ops: Op[] = [];
  for (let i = 0; i < count; i += 3) ops.push({ kind: 'zero', block: i, page: 0 });
  const stream = buildStream(blocks, ops, { perSection: 30_000, ramEnd: true });
  const p = parseAll(stream.bytes, 1, 1 << 20).parsed;
  const { virtOffsetsBytes } = layoutBlocks(blocks.map((b) => b.lengthBytes));
  const meta: SnapshotMeta = {
    formatVersion: FORMAT_VERSION,
    ...streamParts(p),
    blocks: blocks.map((b, i) => ({ id: b.id, lengthBytes: b.lengthBytes, virtOffsetBytes: virtOffsetsBytes[i] })),
    pages: blocks.map((_, i) => ({ sent: new Uint8Array([i % 3 === 0 ? 1 : 0]), data: new Uint8Array(1) })),
    chunkCrc32c: blocks.map(() => new Uint32Array(1)),
    counters: {
      dataPages: 0,
      zeroPages: ops.length,
      resentPages: 0,
      streamBytes: stream.bytes.length,
      dataClusters: 0,
      rewrittenClusters: 0,
    },
    savedAt: '2025-01-01T00:00:00.000Z',
    writer: 'snap-pipe test (writer API)',
  };
  const writer = ImageWriter.create(img, { direct: false, force: true });
  try {
    writer.finish(meta);
  } finally {
    writer.close();
  }
  return blocks;
}
