// snap-pipe load --connect unix:PATH, against a scripted destination on a real unix socket that accepts every
// connection and decodes what arrives (the multifd decoder for the channels, the stream parser for the main
// channel): the main channel connects first, each channel's init names it in order, every data page of the image
// arrives exactly once across the channels with its content, the zero pages come on the main channel, and every
// channel sends one SYNC packet per sync point of the main channel (MULTIFD_FLUSH for an 8.1+ machine type, EOS
// before). Without multifd, one connection carries what `load > stdout` writes, byte for byte, also when load starts
// before anything listens. Refusals: nothing listening in time, a bad image (before any wait), and flags that do not
// go together. (--postcopy over --connect: test/integration/postcopy.test.ts.)
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { decodeInit, decodeRamPacket, MULTIFD_INIT_BYTES, MULTIFD_RAM_PACKET_BYTES, MULTIFD_WIRE_ANY } from '../../src/format/stream/multifd.js';
import { ROOT, loadStream, runCli, type RunResult } from '../helpers/cli.js';
import { SMALL_PC_BLOCKS, buildStream, sequentialOps } from '../helpers/model.js';
import { parseAll } from '../helpers/parse.js';
import { recordConnections } from '../helpers/listen.js';

let dir: string;
beforeAll(() => {
  if (!existsSync(join(ROOT, 'dist', 'main.js'))) throw new Error('dist/ is missing: run npm run build');
  dir = mkdtempSync(join(tmpdir(), 'snap-pipe-connect-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const BLOCKS = SMALL_PC_BLOCKS;
const RUN_MS_MAX = 30_000;

async function saveImage(name: string, machineType: string): Promise<{ img: string; stream: Uint8Array }> {
  const m = buildStream(BLOCKS, sequentialOps(BLOCKS, 11), { ramEnd: true, machineType });
  const img = join(dir, `${name}.qcow2`);
  const r = await runCli(['save', '--no-direct', img], m.bytes);
  if (r.code !== 0) throw new Error(`save: ${r.stderr}`);
  return { img, stream: m.bytes };
}

function runLoad(args: string[]): Promise<RunResult> {
  return runCli(['load', '--no-direct', ...args]);
}

/** Every page a channel carries, by block name and offset, and its SYNC packets. */
function decodeChannel(bytes: Uint8Array, id: number): { pages: Map<string, Uint8Array>; syncs: number } {
  expect(decodeInit(bytes.subarray(0, MULTIFD_INIT_BYTES), 16).channelId).toBe(id);
  const pages = new Map<string, Uint8Array>();
  let syncs = 0;
  for (let at = MULTIFD_INIT_BYTES; at < bytes.length; ) {
    const p = decodeRamPacket(bytes.subarray(at, at + MULTIFD_RAM_PACKET_BYTES), MULTIFD_WIRE_ANY);
    at += MULTIFD_RAM_PACKET_BYTES;
    p.offsets.forEach((o, i) => pages.set(`${p.block}@${o}`, bytes.subarray(at + i * 4096, at + (i + 1) * 4096)));
    at += p.dataBytes;
    if (p.sync) syncs++;
  }
  return { pages, syncs };
}

describe('load --connect unix:PATH', () => {
  for (const [machineType, syncBy] of [['pc-i440fx-7.2', 'eos'], ['pc-q35-10.0', 'flush']] as const) {
    it(`multifd (${machineType}): main channel first, every data page once across 3 channels, a SYNC per sync point (${syncBy})`, async () => {
      const { img, stream } = await saveImage(`mfd-${syncBy}`, machineType);
      const want = parseAll(stream);
      const sock = join(dir, `${syncBy}.sock`);
      const dst = await recordConnections(sock);
      const r = await runLoad([img, '--connect', `unix:${sock}`, '--multifd-channels', '3']);
      expect(r.code, r.stderr).toBe(0);
      const [main, ...channels] = (await dst.done(RUN_MS_MAX)).conns;
      expect(channels).toHaveLength(3);
      const got = parseAll(main, 1, 65536, undefined, 0, { multifd: true });
      expect(got.parsed.multifdSyncs?.by).toBe(syncBy);
      const decoded = channels.map((c, i) => decodeChannel(c, i));
      for (const d of decoded) expect(d.syncs).toBe(got.parsed.multifdSyncs!.count);
      // The main channel carries the zero pages only; the channels every data page, once, with its content.
      expect(got.kindRuns.filter((k) => k === 'd')).toEqual([]);
      const all = new Map<string, Uint8Array>();
      for (const d of decoded) for (const [k, v] of d.pages) {
        expect(all.has(k), `${k} sent twice`).toBe(false);
        all.set(k, v);
      }
      let dataPages = 0;
      want.data.forEach((pages, b) =>
        pages.forEach((isData, page) => {
          if (!isData) return;
          dataPages++;
          const bytes = all.get(`${BLOCKS[b].id}@${page * 4096}`);
          expect(bytes && Buffer.compare(bytes, want.ram[b].subarray(page * 4096, (page + 1) * 4096)), `${BLOCKS[b].id} page ${page}`).toBe(0);
        }),
      );
      expect(all.size).toBe(dataPages);
      // Zero pages: the main channel's ZERO records name each page whose last version was zero.
      want.sent.forEach((pages, b) => pages.forEach((sent, page) => sent && !want.data[b][page] && expect(got.sent[b][page]).toBe(true)));
    });
  }

  it('without multifd: one connection carries what load writes to stdout, byte for byte', async () => {
    const { img } = await saveImage('plain', 'pc-i440fx-7.2');
    const sock = join(dir, 'plain.sock');
    const dst = await recordConnections(sock);
    const r = await runLoad([img, '--connect', `unix:${sock}`]);
    expect(r.code, r.stderr).toBe(0);
    const { conns } = await dst.done(RUN_MS_MAX);
    expect(conns).toHaveLength(1);
    expect(Buffer.compare(conns[0], loadStream(img))).toBe(0);
  });

  it('started before QEMU listens: waits for the socket, then sends the same bytes', async () => {
    const { img } = await saveImage('early', 'pc-i440fx-7.2');
    const sock = join(dir, 'early.sock');
    const load = runLoad([img, '--connect', `unix:${sock}`, '--connect-timeout', '20']);
    await new Promise((resolve) => setTimeout(resolve, 500));
    const dst = await recordConnections(sock);
    const r = await load;
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr.trim().split('\n')).toEqual([`snap-pipe: load: waiting for QEMU to listen on unix:${sock} (up to 20 s)`]);
    const { conns } = await dst.done(RUN_MS_MAX);
    expect(conns).toHaveLength(1);
    expect(Buffer.compare(conns[0], loadStream(img))).toBe(0);
  });

  it('refuses with one line: nothing listening in time, a bad image before it waits, flags that do not go together, a path that is not unix: or too long', async () => {
    const { img } = await saveImage('refused', 'pc-i440fx-7.2');
    const sock = join(dir, 'nobody.sock');
    const junk = join(dir, 'junk.qcow2');
    writeFileSync(junk, Buffer.alloc(65536, 7));
    // Nothing listening: the progress line, then the failure after --connect-timeout.
    const late = await runLoad([img, '--connect', `unix:${sock}`, '--connect-timeout', '1']);
    expect(late.code).toBe(1);
    expect(late.stderr.trim().split('\n')).toEqual([
      `snap-pipe: load: waiting for QEMU to listen on unix:${sock} (up to 1 s)`,
      `snap-pipe: --connect: nothing listened at ${sock} within 1 s (is QEMU's migrate_incoming "unix:PATH" running?)`,
    ]);
    for (const [args, line] of [
      // The image is checked first: refused at once, not after --connect-timeout.
      [[junk, '--connect', `unix:${sock}`, '--connect-timeout', '600'], `snap-pipe: ${junk}: not a QCOW2 image`],
      [[img, '--multifd-channels', '2'], 'snap-pipe: load: --multifd-channels goes with --connect (QEMU takes multifd channels over a socket only)'],
      [[img, '--connect-timeout', '5'], 'snap-pipe: load: --connect-timeout goes with --connect'],
      [[img, '--connect', `unix:${sock}`, '--connect-timeout', '0'], 'snap-pipe: load: --connect-timeout 0: must be from 1 to 86400'],
      [[img, '--connect', `unix:${sock}`, '--multifd-channels', '2', '--postcopy'], 'snap-pipe: load: --postcopy goes over one socket, not with --multifd-channels (QEMU 10.0 refuses postcopy-ram with multifd)'],
      [[img, '--connect', 'tcp:127.0.0.1:4444'], 'snap-pipe: load: --connect takes unix:PATH (got tcp:127.0.0.1:4444)'],
      [[img, '--connect', `unix:/${'d'.repeat(120)}`], `snap-pipe: load: --connect: /${'d'.repeat(120)} is longer than a unix socket path may be (107 bytes)`],
    ] as const) {
      const r = await runLoad([...args]);
      expect(r.code, line).not.toBe(0);
      expect(r.stderr.trim().split('\n'), line).toEqual([line]);
    }
  });
});
