// Output through the real CLI (built dist/) into real pipes: all of it arrives, however slowly the reader takes it,
// also when the pipe was left non-blocking by another process sharing it; a reader that goes away ends the command
// with exit 1 and one line. And images with many RAM blocks: the most a save accepts (MAX_BLOCKS), the most load and
// verify accept, and as many as an image may hold (written through the image writer) for info; 150k blocks, far past
// that, are refused in one line. Before, info into a pipe stopped at 64 KiB with exit 0, and info on 150k blocks, like
// 200k arguments after --, died of a stack overflow.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ImageInfo } from '../../src/image/info.js';
import { BLOCKS_MAX } from '../../src/format/image/limits.js';
import { MAX_BLOCKS } from '../../src/save/ring/layout.js';
import { BIN, ROOT, runCli } from '../helpers/cli.js';
import { writeManyBlockImage } from '../helpers/manyblocks.js';
import { buildStream, type BlockSpec, type Op } from '../helpers/model.js';
import { parseAll } from '../helpers/parse.js';

/** The most RAM blocks load and verify accept (load.ts checkStreamParts). */
const LOAD_BLOCKS_MAX = 4096;
const O_NONBLOCK = 0o4000;

let dir: string;
let img: string;
let blocks: BlockSpec[];

beforeAll(async () => {
  if (!existsSync(join(ROOT, 'dist', 'main.js'))) throw new Error('dist/ is missing: run npm run build');
  dir = mkdtempSync(join(tmpdir(), 'snap-pipe-output-'));
  // As many blocks as a save takes, one or two pages each, every other one with a data page.
  blocks = [];
  for (let i = 0; i < MAX_BLOCKS; i++) blocks.push({ id: `/rom@etc/block-${String(i).padStart(4, '0')}`, lengthBytes: (1 + (i % 2)) * 4096 });
  const ops: Op[] = blocks.map((_, i) => (i % 2 === 0 ? { kind: 'page', block: i, page: 0, seed: i } : { kind: 'zero', block: i, page: 1 }));
  img = join(dir, 'many.qcow2');
  const saved = await runCli(['save', img], buildStream(blocks, ops).bytes);
  expect(saved.code, saved.stderr).toBe(0);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Runs `script` under bash with $SNAP = node bin/snap-pipe; returns its exit status, stderr and the file $OUT. */
function bash(script: string, env: Record<string, string> = {}): { code: number | null; stderr: string; out: string } {
  const out = join(dir, `out-${process.hrtime.bigint()}`);
  const r = spawnSync('bash', ['-c', script], {
    encoding: 'utf8',
    env: { ...process.env, SNAP: `${process.execPath} ${BIN}`, OUT: out, READY: `${out}.ready`, ...env },
    timeout: 60_000,
  });
  expect(r.error).toBeUndefined();
  const text = existsSync(out) ? readFileSync(out, 'utf8') : '';
  rmSync(out, { force: true });
  rmSync(`${out}.ready`, { force: true });
  return { code: r.status, stderr: r.stderr, out: text };
}

/** `snap-pipe ARGS > file`: the reference output. */
function toFile(args: string): string {
  const r = bash(`$SNAP ${args} > "$OUT"`);
  expect(r.code, r.stderr).toBe(0);
  return r.out;
}

describe('output into a pipe', () => {
  it(`info and info --json of ${MAX_BLOCKS} RAM blocks, into a pipe read after 0.5 s: all of it, exit 0`, () => {
    for (const args of [`info "${'$'}IMG"`, `info --json "${'$'}IMG"`]) {
      const whole = toFile(args.replace('$IMG', img));
      expect(whole.length, 'more than a pipe holds').toBeGreaterThan(64 * 1024);
      const r = bash(`$SNAP ${args} | (sleep 0.5; cat) > "$OUT"; exit \${PIPESTATUS[0]}`, { IMG: img });
      expect(r.code, r.stderr).toBe(0);
      expect(r.stderr).toBe('');
      expect(r.out.length).toBe(whole.length);
      expect(r.out === whole, `${args}: the same bytes as into a file`).toBe(true);
    }
    const json = JSON.parse(toFile(`info --json "${img}"`)) as ImageInfo;
    expect(json.blocks!.map((b) => b.id)).toEqual(blocks.map((b) => b.id));
    const text = toFile(`info "${img}"`);
    for (const b of blocks) expect(text.includes(`\n  ${b.id} `), b.id).toBe(true);
  });

  it('into a pipe another process made non-blocking (EAGAIN): all of it, exit 0', () => {
    const whole = toFile(`info --json "${img}"`);
    // A Node process that touched its process.stdout holds the pipe's shared file description non-blocking while it
    // runs; snap-pipe starts once it has, checks the flag on its own stdout, and writes into the pipe read late.
    const holder = `process.stdout.write(''); require('fs').writeFileSync(process.env.READY, ''); setTimeout(() => {}, 30000)`;
    const r = bash(
      `{ ${JSON.stringify(process.execPath)} -e "$HOLDER" & h=$!; ` +
        `while [ ! -e "$READY" ]; do sleep 0.01; done; ` +
        `grep '^flags' /proc/self/fdinfo/3 3>&1 >&2; ` +
        `$SNAP info --json "$IMG"; s=$?; kill $h; exit $s; } | (sleep 0.5; cat) > "$OUT"; exit \${PIPESTATUS[0]}`,
      { IMG: img, HOLDER: holder },
    );
    expect(r.code, r.stderr).toBe(0);
    const flags = /^flags:\s+([0-7]+)$/m.exec(r.stderr);
    expect(flags, r.stderr).not.toBeNull();
    expect(parseInt(flags![1], 8) & O_NONBLOCK, 'stdout is non-blocking').toBe(O_NONBLOCK);
    expect(r.out === whole, 'the same bytes as into a file').toBe(true);
  });

  it('a reader that closed the pipe: exit 1, one line, no stack trace', () => {
    for (const args of ['info "$IMG"', 'info --json "$IMG"', 'verify "$IMG"', 'verify --json "$IMG"', '--help', 'info --help']) {
      // snap-pipe starts only once the reader has closed its end.
      const r = bash(`{ while [ ! -e "$READY" ]; do sleep 0.01; done; $SNAP ${args}; } | (exec 0<&-; : > "$READY"; sleep 0.2); exit \${PIPESTATUS[0]}`, {
        IMG: img,
      });
      expect(r.code, `${args}: ${r.stderr}`).toBe(1);
      expect(r.stderr, args).toBe('snap-pipe: stdout: the reader closed it before the output was complete (EPIPE)\n');
    }
  });
});

describe('long lists: many RAM blocks, many arguments', () => {
  it(`info on ${BLOCKS_MAX} blocks, the most an image may hold (written through the image writer): every block, text and JSON, into a slow pipe`, () => {
    const count = BLOCKS_MAX;
    const many = join(dir, `many-${count}.qcow2`);
    const written = writeManyBlockImage(many, count);
    const text = bash(`$SNAP info "$IMG" | (sleep 0.5; cat) > "$OUT"; exit \${PIPESTATUS[0]}`, { IMG: many });
    expect(text.code, text.stderr).toBe(0);
    expect(text.stderr).toBe('');
    const lines = text.out.split('\n');
    const first = lines.indexOf('RAM blocks:');
    expect(first).toBeGreaterThan(0);
    expect(lines.length - first - 2, 'one line per block').toBe(count);
    expect(lines[first + 1]).toMatch(/^  \/rom@many-000000  +4 KiB at +0 bytes  0 data, 1 zero, 0 unsent of 1 pages$/);
    expect(lines[first + count]).toMatch(new RegExp(`^  /rom@many-00${count - 1}  +4 KiB at +[0-9.]+ GiB  0 data, [01] zero, [01] unsent of 1 pages$`));
    const json = bash(`$SNAP info --json "$IMG" | (sleep 0.5; cat) > "$OUT"; exit \${PIPESTATUS[0]}`, { IMG: many });
    expect(json.code, json.stderr).toBe(0);
    const info = JSON.parse(json.out) as ImageInfo;
    expect(info.blocks!.length).toBe(count);
    expect(info.blocks!.every((b, i) => b.id === written[i].id && b.zeroPages === (i % 3 === 0 ? 1 : 0))).toBe(true);
    rmSync(many);
  });

  it('info on 150000 blocks, far past what an image may hold: one line, no stack overflow', () => {
    const many = join(dir, 'many-150k.qcow2');
    writeManyBlockImage(many, 150_000);
    for (const args of ['info "$IMG"', 'info --json "$IMG"']) {
      const r = bash(`$SNAP ${args} > "$OUT"`, { IMG: many });
      expect(r.code, args).toBe(1);
      expect(r.stderr, args).toMatch(/^snap-pipe: \S*many-150k\.qcow2: metadata damaged: scalar section of \d+ bytes \(at most \d+\)\n$/);
    }
    rmSync(many);
  });

  it('200000 arguments after --: the usage error, not a stack overflow', async () => {
    const r = await runCli(['info', '--', ...new Array<string>(200_000).fill('x')]);
    expect(r.code, r.stderr).toBe(2);
    expect(r.stderr).toBe("snap-pipe: info: unexpected argument 'x'\n");
  });

  it(`load and verify on ${LOAD_BLOCKS_MAX} blocks, the most they accept`, () => {
    const most = join(dir, `many-${LOAD_BLOCKS_MAX}.qcow2`);
    const written = writeManyBlockImage(most, LOAD_BLOCKS_MAX);
    const verify = bash(`$SNAP verify "$IMG" | (sleep 0.2; cat) > "$OUT"; exit \${PIPESTATUS[0]}`, { IMG: most });
    expect(verify.code, verify.stderr).toBe(0);
    expect(verify.out).toMatch(new RegExp(`: sound\\n[^]*${LOAD_BLOCKS_MAX} RAM blocks`));
    const stream = join(dir, 'many.stream');
    const load = bash(`$SNAP load "$IMG" | (sleep 0.2; cat) > "$STREAM"; exit \${PIPESTATUS[0]}`, { IMG: most, STREAM: stream });
    expect(load.code, load.stderr).toBe(0);
    const parsed = parseAll(new Uint8Array(readFileSync(stream)), 1, 1 << 20);
    expect(parsed.parsed.blocks.map((b) => b.id)).toEqual(written.map((b) => b.id));
    expect(parsed.sent.map((s) => s[0])).toEqual(written.map((_, i) => i % 3 === 0));
  });
});

describe('--stats=FILE', () => {
  it('a FILE that cannot be written is one line naming it, exit 1, never a stack trace; the image itself is saved', async () => {
    const saved = join(dir, 'stats.qcow2');
    const file = join(dir, 'no-such-dir', 'stats.json');
    const r = await runCli(['save', saved, `--stats=${file}`], buildStream(blocks.slice(0, 4), [{ kind: 'page', block: 0, page: 0, seed: 1 }]).bytes);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe(`snap-pipe: writing the --stats file ${file}: ENOENT (no such file or directory)\n`);
    const info = spawnSync(process.execPath, [BIN, 'info', saved, '--json'], { encoding: 'utf8' });
    expect((JSON.parse(info.stdout) as ImageInfo).complete).toBe(true);

    const loaded = bash(`$SNAP load "$IMG" --stats="$FILE" > "$OUT"`, { IMG: saved, FILE: file });
    expect(loaded.code).toBe(1);
    expect(loaded.stderr).toBe(`snap-pipe: writing the --stats file ${file}: ENOENT (no such file or directory)\n`);
  });
});
