// Real QEMU bytes for the multifd decoder (src/format/stream/multifd.ts): a paused guest migrates with `multifd` on
// and 2 channels to `unix:SOCK`, where a listener here accepts every connection and records its bytes (a multifd
// destination sends nothing back: docs/MULTIFD.md). Then every multifd channel is decoded, the pages named in the
// packets plus the main channel's cover the guest's RAM, the sync points pair up, and 1000 random data pages and
// 200 zero pages equal a pmemsave dump taken before the migration. Fails (never skips) when QEMU or the guest is missing.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, test } from 'vitest';
import {
  decodeInit,
  decodePacketHeader,
  decodeRamPacket,
  MULTIFD_HEADER_BYTES,
  MULTIFD_INIT_BYTES,
  MULTIFD_MAGIC,
  wireForQemu,
  type MultifdWire,
} from '../../src/format/stream/multifd.js';
import { QEVM_MAGIC } from '../../src/format/stream/constants.js';
import { PAGE_BYTES } from '../../src/format/units.js';
import { Guest, guestFiles } from '../../tools/qemu/guest.js';
import { LEGACY_WINDOW } from '../../tools/qemu/compare.js';
import { testedQemus } from '../../tools/qemu/versions.js';
import { rng } from '../helpers/model.js';
import { readMainChannel, type MainChannelRam } from '../helpers/mainchannel.js';
import { recordConnections } from '../helpers/listen.js';

const MiB = 1024 * 1024;
const memMiB = 256;
const fillMiB = 64;
const channels = 2;

interface ChannelSummary {
  id: number;
  packets: number;
  syncs: number;
  normal: number;
  zero: number;
  /** Pages of each block: offset -> position of its data in the channel, or 'zero'. */
  pages: Map<string, Map<number, number | 'zero'>>;
  bytes: Uint8Array;
}

/** Decodes one multifd channel from its first byte to its last, with the decoder under test. */
function decodeChannel(bytes: Uint8Array, wire: MultifdWire): ChannelSummary {
  const init = decodeInit(bytes.subarray(0, MULTIFD_INIT_BYTES), channels);
  expect([...init.uuid].every((b) => b === 0), 'no -uuid: the init carries a zero uuid').toBe(true);
  const s: ChannelSummary = { id: init.channelId, packets: 0, syncs: 0, normal: 0, zero: 0, pages: new Map(), bytes };
  let at = MULTIFD_INIT_BYTES;
  while (at < bytes.length) {
    const header = decodePacketHeader(bytes.subarray(at, at + MULTIFD_HEADER_BYTES), wire);
    expect(header.kind).toBe('ram');
    const p = decodeRamPacket(bytes.subarray(at, at + header.packetBytes), wire);
    at += header.packetBytes;
    s.packets++;
    if (p.sync) s.syncs++;
    s.normal += p.normalPages;
    s.zero += p.zeroPages;
    const pages = s.pages.get(p.block) ?? new Map<number, number | 'zero'>();
    if (p.offsets.length > 0) s.pages.set(p.block, pages);
    p.offsets.forEach((o, i) => pages.set(o, i < p.normalPages ? at + i * PAGE_BYTES : 'zero'));
    at += p.dataBytes;
  }
  expect(at, 'the channel ends where its last packet does').toBe(bytes.length);
  return s;
}

function magicOf(b: Uint8Array): number {
  return b.length < 4 ? -1 : ((b[0] << 24) | (b[1] << 16) | (b[2] << 8) | b[3]) >>> 0;
}

/** Every page of every block is named by the main channel or a multifd channel. */
function expectCoverage(main: MainChannelRam, chans: ChannelSummary[]): void {
  for (const b of main.blocks) {
    const named = new Set<number>(main.pages.get(b.id)?.keys() ?? []);
    for (const c of chans) for (const o of c.pages.get(b.id)?.keys() ?? []) named.add(o);
    const missing = Math.ceil(b.lengthBytes / PAGE_BYTES) - named.size;
    expect(missing, `${b.id}: pages named by no channel`).toBe(0);
    for (const o of named) expect(o, `${b.id} offset inside the block`).toBeLessThan(b.lengthBytes);
  }
}

/** `count` random pc.ram pages of `kind` from the packets equal the dump (outside the legacy window). */
function expectSample(chans: ChannelSummary[], dump: Uint8Array, kind: 'data' | 'zero', count: number, seed: number): void {
  const found: [ChannelSummary, number, number | 'zero'][] = [];
  for (const c of chans) {
    for (const [o, where] of c.pages.get('pc.ram') ?? []) {
      if ((where === 'zero') === (kind === 'zero') && (o < LEGACY_WINDOW[0] || o >= LEGACY_WINDOW[1])) found.push([c, o, where]);
    }
  }
  expect(found.length, `${kind} pages of pc.ram in the packets`).toBeGreaterThanOrEqual(count);
  const r = rng(seed);
  for (let i = 0; i < count; i++) {
    const [c, o, where] = found[Math.floor(r() * found.length)];
    const want = dump.subarray(o, o + PAGE_BYTES);
    const got = where === 'zero' ? new Uint8Array(PAGE_BYTES) : c.bytes.subarray(where, where + PAGE_BYTES);
    expect(Buffer.compare(Buffer.from(got), Buffer.from(want)), `pc.ram page 0x${o.toString(16)} (${kind}) vs pmemsave`).toBe(0);
  }
}

describe.each(testedQemus())('multifd capture from a real migration: $label', (qemu) => {
  const dir = mkdtempSync(join(tmpdir(), 'snap-pipe-multifd-'));
  let guest: Guest | null = null;

  afterAll(async () => {
    await guest?.quit();
    rmSync(dir, { recursive: true, force: true });
  });

  test(`a paused ${memMiB} MiB guest over ${channels} multifd channels: every packet decodes, pages cover RAM and match pmemsave`, async () => {
    guestFiles();
    const wire = wireForQemu(qemu.major, qemu.minor);
    const dumpPath = join(dir, 'pc-ram.pmem');
    guest = await Guest.start({ qemu, name: 'multifd-capture', memMiB, fillMiB });
    await guest.waitReady(180_000);
    await guest.stop();
    await guest.pmemsave(0, memMiB * MiB, dumpPath, 120_000);
    await guest.setCapabilities({ multifd: true });
    await guest.setMigrationParams({ 'multifd-channels': channels });
    await guest.unthrottle();

    const sock = join(dir, 'migrate.sock');
    const { done } = await recordConnections(sock);
    const t0 = Date.now();
    await guest.migrate(`unix:${sock}`);
    const status = await guest.waitMigration(120_000);
    if (status.status !== 'completed') throw guest.failure(`migration ${status.status}: ${status['error-desc'] ?? ''}`);
    const capture = await done(30_000);
    const ms = Date.now() - t0;

    const magics = capture.conns.map(magicOf);
    expect(magics.filter((m) => m === QEVM_MAGIC).length, 'one main channel').toBe(1);
    expect(magics.filter((m) => m === MULTIFD_MAGIC).length, 'multifd channels').toBe(channels);
    const main = readMainChannel(capture.conns[magics.indexOf(QEVM_MAGIC)]);
    const chans = capture.conns.filter((_, i) => magics[i] === MULTIFD_MAGIC).map((b) => decodeChannel(b, wire));
    expect(chans.map((c) => c.id).sort()).toEqual([0, 1]);

    expectCoverage(main, chans);
    // Each main-channel sync point has one SYNC packet per channel: MULTIFD_FLUSH when the stream has any (8.1+
    // default), else EOS (multifd-flush-after-each-section, and every QEMU before 8.1).
    const syncPoints = main.flushes > 0 ? main.flushes : main.eos;
    for (const c of chans) expect(c.syncs, `channel ${c.id} SYNC packets`).toBe(syncPoints);

    const dump = new Uint8Array(readFileSync(dumpPath));
    expectSample(chans, dump, 'data', 1000, 1);
    const zeroInPackets = chans.reduce((n, c) => n + c.zero, 0);
    if (wire.zeroPages) expectSample(chans, dump, 'zero', 200, 2);
    else expect(zeroInPackets, 'zero pages before 9.0 travel on the main channel').toBe(0);

    const mainPages = [...main.pages.values()].reduce((n, m) => n + m.size, 0);
    process.stdout.write(
      `${qemu.label}: ${ms} ms; accept order ${magics.map((m) => (m === QEVM_MAGIC ? 'main' : 'multifd')).join(',')}; ` +
        `main: ${main.machineType}, ${main.ramSections} RAM sections, ${mainPages} pages, EOS ${main.eos}, FLUSH ${main.flushes}, ` +
        `sync order ${main.syncOrder}; ` +
        chans.map((c) => `ch${c.id}: ${c.bytes.length} B, ${c.packets} packets, ${c.syncs} SYNC, ${c.normal} data, ${c.zero} zero`).join('; ') +
        '\n',
    );
  });
});
