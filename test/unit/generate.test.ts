// perf/generate.ts: the benchmark's stream generator makes streams that the parser and the real `snap-pipe save`
// accept, holding the pages its summary says, in bounded pieces, the same for the same seed.
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { blockList, generate, ORDERS, parseSizeBytes, type GenerateOptions, type GenerateSummary } from '../../perf/generate.js';
import { info, ROOT, runCli } from '../helpers/cli.js';
import { parseAll } from '../helpers/parse.js';

let dir: string;
beforeAll(() => {
  if (!existsSync(join(ROOT, 'dist', 'main.js'))) throw new Error('dist/ is missing: run npm run build');
  dir = mkdtempSync(join(tmpdir(), 'snap-pipe-generate-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const RAM_BYTES = 8 << 20;

function collect(opts: GenerateOptions): { bytes: Uint8Array; summary: GenerateSummary; maxChunk: number } {
  const chunks: Uint8Array[] = [];
  const summary = generate(opts, (c) => chunks.push(c.slice()));
  const bytes = new Uint8Array(chunks.reduce((a, c) => a + c.length, 0));
  let at = 0;
  for (const c of chunks) {
    bytes.set(c, at);
    at += c.length;
  }
  return { bytes, summary, maxChunk: Math.max(...chunks.map((c) => c.length)) };
}

describe('generate', () => {
  it('parses sizes', () => {
    expect(parseSizeBytes('4G')).toBe(4 * 2 ** 30);
    expect(parseSizeBytes('512M')).toBe(512 << 20);
    expect(parseSizeBytes('16GiB')).toBe(16 * 2 ** 30);
    expect(() => parseSizeBytes('four')).toThrow(/bad size/);
    expect(() => blockList(4097)).toThrow(/multiple of 4 KiB/);
  });

  it('is deterministic per seed and streams in bounded pieces', () => {
    const opts: GenerateOptions = { ramBytes: RAM_BYTES, zeroShare: 0.3, order: 'background', seed: 7, pagesPerSection: 64 };
    const a = collect(opts);
    const b = collect(opts);
    const c = collect({ ...opts, seed: 8 });
    const sha = (x: Uint8Array) => createHash('sha256').update(x).digest('hex');
    expect(sha(a.bytes)).toBe(sha(b.bytes));
    expect(sha(a.bytes)).not.toBe(sha(c.bytes));
    expect(a.summary.streamBytes).toBe(a.bytes.length);
    // One PART section of 64 records at most (plus a block name), never the whole stream.
    expect(a.maxChunk).toBeLessThan(64 * (4096 + 8) + 512);
  });

  it('makes no zero pages at --zero 0 and only zero pages at --zero 1 (first pass)', () => {
    const none = collect({ ramBytes: RAM_BYTES, zeroShare: 0, order: 'ascending', seed: 1 }).summary;
    expect(none.zeroRecords).toBe(0);
    const all = collect({ ramBytes: RAM_BYTES, zeroShare: 1, order: 'background', seed: 1 }).summary;
    expect(all.dataRecords).toBe(0);
  });

  for (const order of ORDERS) {
    it(`${order}: the parser sees what the summary says`, () => {
      const { bytes, summary } = collect({ ramBytes: RAM_BYTES, zeroShare: 0.3, order, seed: 3, pagesPerSection: 100 });
      const got = parseAll(bytes, 3, 1 << 20);
      expect(got.parsed.blocks.map((b) => [b.id, b.lengthBytes])).toEqual(blockList(RAM_BYTES).map((b) => [b.id, b.lengthBytes]));
      expect(got.parsed.sawRamEnd).toBe(order !== 'background');
      expect(got.parsed.machineType).toBe('pc-i440fx-7.2');
      summary.blocks.forEach((s, i) => {
        expect(got.data[i].filter(Boolean).length, s.id).toBe(s.dataPages);
        expect(got.sent[i].filter((x, p) => x && !got.data[i][p]).length, s.id).toBe(s.zeroPages);
        expect(s.unsentPages).toBe(0);
      });
      const pages = summary.blocks.reduce((a, s) => a + s.pages, 0);
      expect(summary.dataPages + summary.zeroPages).toBe(pages);
      // Zero share as asked, within sampling noise (whole 2 MiB regions make it coarse on small streams).
      expect(summary.zeroRecords / (summary.dataRecords + summary.zeroRecords)).toBeGreaterThan(0.05);
      expect(summary.zeroRecords / (summary.dataRecords + summary.zeroRecords)).toBeLessThan(0.6);
      if (order === 'precopy') expect(summary.resentRecords).toBeGreaterThan(0);
      else expect(summary.resentRecords).toBe(0);
      // No data page is all zeros, and page versions differ (precopy re-sends new content).
      const ram = got.ram[0];
      for (let p = 0; p < ram.length / 4096; p++) if (got.data[0][p]) expect(ram[p * 4096]).toBe(0x5a);
    });

    it(`${order}: snap-pipe save accepts it and info --json shows its page counts`, async () => {
      const { bytes, summary } = collect({ ramBytes: RAM_BYTES, zeroShare: 0.3, order, seed: 5 });
      const img = join(dir, `${order}.qcow2`);
      const saved = await runCli(['save', img], bytes);
      expect(saved.code, saved.stderr).toBe(0);
      const inf = await info(img);
      expect(inf.complete).toBe(true);
      expect(inf.dataPages).toBe(summary.dataPages);
      expect(inf.zeroPages).toBe(summary.zeroPages);
      expect(inf.resentPages).toBe(summary.resentRecords);
      expect(inf.streamBytes).toBe(summary.streamBytes);
      expect(inf.deviceStateBytes).toBe(summary.deviceStateBytes);
      expect(inf.blocks!.map((b) => [b.id, b.dataPages, b.zeroPages, b.unsentPages])).toEqual(
        summary.blocks.map((b) => [b.id, b.dataPages, b.zeroPages, b.unsentPages]),
      );
    });
  }
});
