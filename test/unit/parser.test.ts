import { describe, expect, it } from 'vitest';
import { SnapPipeError } from '../../src/errors.js';
import { StreamBuilder } from '../../src/format/stream/encoder.js';
import { buildStream, pageContent, rng, sequentialOps, type BlockSpec } from '../helpers/model.js';
import { parseAll } from '../helpers/parse.js';

function expectError(fn: () => unknown, code: string, pattern: RegExp): void {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  expect(caught, 'expected an error').toBeInstanceOf(SnapPipeError);
  expect((caught as SnapPipeError).code).toBe(code);
  expect((caught as SnapPipeError).message).toMatch(pattern);
}

const BLOCKS: BlockSpec[] = [
  { id: 'pc.ram', lengthBytes: 2 << 20 },
  { id: 'pc.bios', lengthBytes: 256 << 10 },
  { id: '/rom@etc/acpi/rsdp', lengthBytes: 4096 },
];

describe('StreamParser', () => {
  it('reconstructs RAM, block list and verbatim parts from a stream read in random pieces through a wrapping ring', () => {
    const m = buildStream(BLOCKS, sequentialOps(BLOCKS), { ramEnd: true });
    expect(m.bytes.length).toBeGreaterThan(100_000);
    // Ring positions are int32 that wrap: start at 0, just below the sign flip (2^31), and just below 2^32.
    for (const [seed, start] of [[1, 0], [2, 0x7fff_0000], [3, -50_000]]) {
      const c = parseAll(m.bytes, seed, 65536, 9000, start);
      expect(c.parsed.blocks).toEqual(BLOCKS);
      expect(c.parsed.machineType).toBe('pc-i440fx-7.2');
      expect(c.parsed.sawRamEnd).toBe(true);
      expect(c.parsed.vmdescPresent).toBe(true);
      expect(c.parsed.streamBytes).toBe(m.bytes.length);
      expect(Buffer.compare(c.parsed.deviceState, m.deviceState)).toBe(0);
      c.ram.forEach((r, i) => expect(Buffer.compare(r, m.ram[i]), `block ${i}`).toBe(0));
      expect(c.sent).toEqual(m.sent);
      expect(c.data).toEqual(m.data);
    }
  });

  it('keeps the header + configuration and the RAM setup section byte for byte', () => {
    const m = buildStream(BLOCKS, sequentialOps(BLOCKS));
    const c = parseAll(m.bytes);
    const head = new StreamBuilder().header().configuration('pc-i440fx-7.2').build();
    const setup = new StreamBuilder().ramSetup(2, BLOCKS).build();
    expect(Buffer.compare(c.parsed.head, head)).toBe(0);
    expect(Buffer.compare(c.parsed.ramSetup, setup)).toBe(0);
    expect(Buffer.compare(m.bytes.subarray(0, head.length + setup.length), Buffer.concat([head, setup]))).toBe(0);
    expect(c.parsed.sawRamEnd).toBe(false);
  });

  it('lets the last record of a page win, including data later re-sent as zero', () => {
    const ops = [
      ...sequentialOps(BLOCKS),
      { kind: 'page' as const, block: 0, page: 3, seed: 99 },
      { kind: 'zero' as const, block: 0, page: 5 },
      { kind: 'page' as const, block: 0, page: 5, seed: 100 },
      { kind: 'zero' as const, block: 0, page: 1 },
    ];
    const m = buildStream(BLOCKS, ops, { perSection: 50 });
    const c = parseAll(m.bytes);
    expect(Buffer.compare(c.ram[0].subarray(3 * 4096, 4 * 4096), pageContent(99))).toBe(0);
    expect(Buffer.compare(c.ram[0].subarray(5 * 4096, 6 * 4096), pageContent(100))).toBe(0);
    expect(c.ram[0].subarray(4096, 8192).every((b) => b === 0)).toBe(true);
    expect(c.data[0][1]).toBe(false);
  });

  it('reads x-ignore-shared block addresses and capability names', () => {
    const b = new StreamBuilder().header().configuration('pc-q35-7.2', ['x-ignore-shared']);
    b.ramSetup(5, [{ id: 'pc.ram', lengthBytes: 8192, addr: 0x100000 }]);
    b.ramPart(5).page('pc.ram', 4096, pageContent(1)).zero('pc.ram', 0).ramEos(5).eof();
    const c = parseAll(b.build());
    expect(c.parsed.capabilities).toEqual(['x-ignore-shared']);
    expect(c.parsed.blocks).toEqual([{ id: 'pc.ram', lengthBytes: 8192, addr: 0x100000 }]);
    expect(c.parsed.ramSectionId).toBe(5);
  });

  describe('refuses bad streams with one clear error naming the byte offset', () => {
    const good = buildStream(BLOCKS, sequentialOps(BLOCKS).slice(0, 300), { ramEnd: true }).bytes;

    it('wrong magic, wrong version, empty', () => {
      const bad = good.slice();
      bad[0] = 0x51 + 1;
      expectError(() => parseAll(bad), 'BAD_STREAM', /not a QEMU migration stream .* at byte 0/);
      const v2 = good.slice();
      v2[7] = 2;
      expectError(() => parseAll(v2), 'UNSUPPORTED', /version 2/);
      expectError(() => parseAll(new Uint8Array(0)), 'TRUNCATED', /empty/);
    });

    it('truncated at any point', () => {
      const r = rng(7);
      const cuts = [1, 5, 8, 20, 40, 100, 5000, good.length - 1, good.length - 10, good.length - 200];
      for (let i = 0; i < 40; i++) cuts.push(1 + Math.floor(r() * (good.length - 1)));
      for (const cut of cuts) {
        let caught: unknown;
        try {
          parseAll(good.subarray(0, cut));
        } catch (err) {
          caught = err;
        }
        expect(caught, `cut at ${cut}`).toBeInstanceOf(SnapPipeError);
        expect((caught as SnapPipeError).code, `cut at ${cut}: ${(caught as Error).message}`).toMatch(/TRUNCATED|BAD_STREAM/);
      }
    });

    it('unknown section type, non-RAM iterable section, migration command', () => {
      expectError(() => parseAll(new StreamBuilder().header().configuration('pc').ramSetup(2, BLOCKS).u8(0x42).build()), 'BAD_STREAM', /unknown section type 0x42/);
      const blk = new StreamBuilder().header().configuration('pc').sectionStart(1, 3, 'block', 0, 1).build();
      expectError(() => parseAll(blk), 'UNSUPPORTED', /iterable section 'block'/);
      const cmd = (n: number, payload = new Uint8Array(0)) =>
        new StreamBuilder().header().configuration('pc').ramSetup(2, BLOCKS).ramPart(2).ramEos(2).command(n, payload).build();
      expectError(() => parseAll(cmd(1)), 'UNSUPPORTED', /\(1\) from the return-path capability .*does not accept at byte \d+$/);
      expectError(() => parseAll(cmd(2, new Uint8Array(4))), 'UNSUPPORTED', /\(2\) from the return-path capability/);
      for (const n of [4, 5, 6, 7]) expectError(() => parseAll(cmd(n)), 'UNSUPPORTED', /from the postcopy-ram capability.*turn postcopy-ram off/);
      expectError(() => parseAll(cmd(3, new Uint8Array(16))), 'UNSUPPORTED', /from the postcopy-ram capability.*turn postcopy-ram off/);
      expectError(() => parseAll(cmd(8)), 'UNSUPPORTED', /\(8\) from COLO \(x-colo\)/);
      expectError(() => parseAll(cmd(9)), 'UNSUPPORTED', /\(9\) from postcopy recovery/);
      expectError(() => parseAll(cmd(12)), 'UNSUPPORTED', /\(12\) from a command snap-pipe does not know/);
    });

    it('QEMU 8.1.0-8.1.2\'s bare MULTIFD_FLUSH without multifd: skipped, kept out of the stored RAM setup, CONTINUE still refers to the block before it', () => {
      const flush = () => b.be64(0x200);
      const b = new StreamBuilder().header().configuration('pc-i440fx-8.1');
      // ram START with the flush after the block list, before EOS (ram.c ram_save_setup in 8.1.0).
      b.sectionStart(1, 2, 'ram', 0, 4).be64(BLOCKS.reduce((n, x) => n + x.lengthBytes, 0) + 4);
      for (const x of BLOCKS) b.str8(x.id).be64(x.lengthBytes);
      flush();
      b.ramEos(2);
      // A PART: two pages of pc.ram, the flush at the end of a pass, then a CONTINUE record for the same block.
      b.ramPart(2).page('pc.ram', 0, pageContent(1)).page('pc.ram', 4096, pageContent(2));
      flush();
      b.page('pc.ram', 8192, pageContent(3)).ramEos(2);
      b.ramEnd(2).zero('pc.ram', 4096);
      flush();
      b.ramEos(2).device(3, 'timer', new Uint8Array(10)).eof();
      const bytes = b.build();
      // The third page really was written as a CONTINUE record right after the flush.
      const third = Buffer.from(bytes).indexOf(Buffer.from('0000000000002028', 'hex'));
      expect(Buffer.from(bytes.subarray(third - 8, third)).toString('hex')).toBe('0000000000000200');

      const c = parseAll(bytes);
      expect(Buffer.compare(c.parsed.ramSetup, new StreamBuilder().ramSetup(2, BLOCKS).build())).toBe(0);
      expect(Buffer.compare(c.ram[0].subarray(0, 12288), Buffer.concat([pageContent(1), new Uint8Array(4096), pageContent(3)]))).toBe(0);
      expect(c.data[0].slice(0, 3)).toEqual([true, false, true]);
      expect(c.parsed.sawRamEnd).toBe(true);
      expect(c.parsed.bareFlushes).toBe(3);
      // With anything else in the record, it is a multifd stream (or damage): still refused.
      const multifd = new StreamBuilder().header().configuration('pc').ramSetup(2, BLOCKS).ramPart(2).be64(4096 + 0x200).str8('pc.ram').build();
      expectError(() => parseAll(multifd), 'UNSUPPORTED', /multifd flag/);
    });

    it('a multifd main channel of QEMU 8.1+: each MULTIFD_FLUSH is a sync point, in stream order, kept out of the stored RAM setup; EOS is not', () => {
      const b = new StreamBuilder().header().configuration('pc-i440fx-10.0');
      // ram.c ram_save_setup: the block list, MULTIFD_FLUSH, EOS; then a round's zero page, its FLUSH at the wrap.
      b.sectionStart(1, 2, 'ram', 0, 4).be64(BLOCKS.reduce((n, x) => n + x.lengthBytes, 0) + 4);
      for (const x of BLOCKS) b.str8(x.id).be64(x.lengthBytes);
      b.be64(0x200).ramEos(2);
      b.ramPart(2).zero('pc.ram', 0).be64(0x200).zero('pc.ram', 4096).ramEos(2);
      b.ramEnd(2).be64(0x200).ramEos(2).device(3, 'timer', new Uint8Array(10)).eof();
      const c = parseAll(b.build(), 1, 65536, undefined, 0, { multifd: true });
      expect(c.kindRuns).toEqual(['s', 'z', 's', 'z', 's']);
      expect(c.parsed.multifdSyncs).toEqual({ count: 3, by: 'flush' });
      expect(Buffer.compare(c.parsed.ramSetup, new StreamBuilder().ramSetup(2, BLOCKS).build())).toBe(0);
      expect(c.parsed.bareFlushes).toBe(0);
    });

    it('a multifd main channel of QEMU up to 8.0: the EOS of every RAM section is a sync point; a MULTIFD_FLUSH after that choice is refused', () => {
      const start = () => new StreamBuilder().header().configuration('pc-i440fx-7.2').ramSetup(2, BLOCKS);
      const bytes = start().ramPart(2).zero('pc.ram', 0).ramEos(2).ramPart(2).ramEos(2).ramEnd(2).ramEos(2).device(3, 'timer', new Uint8Array(10)).eof().build();
      const c = parseAll(bytes, 1, 65536, undefined, 0, { multifd: true });
      expect(c.kindRuns).toEqual(['s', 'z', 's', 's', 's']);
      expect(c.parsed.multifdSyncs).toEqual({ count: 4, by: 'eos' });
      // Without multifd the same stream has no sync points at all.
      expect(parseAll(bytes).kindRuns).toEqual(['z']);
      const mixed = start().ramPart(2).be64(0x200).build();
      expectError(() => parseAll(mixed, 1, 65536, undefined, 0, { multifd: true }), 'BAD_STREAM', /a MULTIFD_FLUSH record in a stream whose RAM setup marked its sync points by EOS at byte/);
    });

    it('commands right after the configuration are refused there, naming the capability', () => {
      const early = (n: number, payload = new Uint8Array(0)) => new StreamBuilder().header().configuration('pc').command(n, payload).build();
      expectError(() => parseAll(early(1)), 'UNSUPPORTED', /\(1\) from the return-path capability.* at byte 15$/);
      expectError(() => parseAll(early(3, new Uint8Array(16))), 'UNSUPPORTED', /postcopy-ram capability/);
      expectError(() => parseAll(early(3)), 'UNSUPPORTED', /dirty-bitmaps capability/);
      expectError(() => parseAll(early(8)), 'UNSUPPORTED', /COLO \(x-colo\)/);
      expectError(() => parseAll(early(11)), 'BAD_STREAM', /SWITCHOVER_START command before the RAM setup at byte 15$/);
    });

    it('a virtio-mem device\'s early state before the RAM pages is refused, naming it', () => {
      const s = new StreamBuilder().header().configuration('pc-q35-10.0').ramSetup(2, BLOCKS)
        .device(3, '0000:00:03.0/virtio-mem-device-early', new Uint8Array(20)).ramPart(2).page('pc.ram', 0, pageContent(1)).ramEos(2)
        .device(4, 'timer', new Uint8Array(10)).eof().build();
      expectError(() => parseAll(s), 'UNSUPPORTED', /device section '0000:00:03\.0\/virtio-mem-device-early' before the RAM pages: .*virtio-mem/);
    });

    it('a section without its footer names the sources that send none', () => {
      const s = new StreamBuilder().header().configuration('pc-i440fx-2.3').sectionStart(1, 2, 'ram', 0, 4).be64(4096 + 4).str8('a').be64(4096).be64(0x10).u8(0x02).build();
      expectError(() => parseAll(s), 'BAD_STREAM', /expected a section footer, found PART \(sources with send-section-footer=off/);
    });

    it('QEMU 10\'s SWITCHOVER_START: kept for load to replay; a payload or a flood of them is refused', () => {
      const m = buildStream(BLOCKS, sequentialOps(BLOCKS), { ramEnd: true, switchoverStart: true });
      const c = parseAll(m.bytes);
      expect(Array.from(c.parsed.switchoverCommands)).toEqual([0x08, 0, 11, 0, 0]);
      expect(c.parsed.sawRamEnd).toBe(true);
      expect(Buffer.compare(c.parsed.deviceState, m.deviceState)).toBe(0);
      c.ram.forEach((r, i) => expect(Buffer.compare(r, m.ram[i]), `block ${i}`).toBe(0));
      // Without it (QEMU before 10.0, or send-switchover-start=off): none kept.
      expect(parseAll(buildStream(BLOCKS, sequentialOps(BLOCKS), { ramEnd: true }).bytes).parsed.switchoverCommands.length).toBe(0);
      const base = () => new StreamBuilder().header().configuration('pc').ramSetup(2, BLOCKS).ramPart(2).ramEos(2);
      expectError(() => parseAll(base().command(11, new Uint8Array(1)).build()), 'BAD_STREAM', /SWITCHOVER_START command with a 1-byte payload/);
      const flood = base();
      for (let i = 0; i < 9; i++) flood.command(11);
      expectError(() => parseAll(flood.build()), 'BAD_STREAM', /more than 8 switch-over commands/);
      const eight = base();
      for (let i = 0; i < 8; i++) eight.command(11);
      const ok = parseAll(eight.device(3, 'timer', new Uint8Array(10)).eof().build());
      expect(ok.parsed.switchoverCommands.length).toBe(40);
    });

    it('unknown or undecodable RAM flags', () => {
      const mk = (flags: number) =>
        new StreamBuilder().header().configuration('pc').ramSetup(2, BLOCKS).ramPart(2).be64(4096 + flags).str8('pc.ram').build();
      expectError(() => parseAll(mk(0x40)), 'UNSUPPORTED', /xbzrle/);
      expectError(() => parseAll(mk(0x100)), 'UNSUPPORTED', /compress/);
      expectError(() => parseAll(mk(0x400)), 'BAD_STREAM', /unknown flags 0x400/);
    });

    it('pages for unknown blocks, beyond a block, or before the setup', () => {
      const base = () => new StreamBuilder().header().configuration('pc').ramSetup(2, BLOCKS).ramPart(2);
      expectError(() => parseAll(base().page('nope', 0, pageContent(1)).build()), 'BAD_STREAM', /'nope', which the setup never named/);
      expectError(() => parseAll(base().page('pc.bios', 256 << 10, pageContent(1)).build()), 'BAD_STREAM', /beyond RAM block 'pc.bios'/);
      const cont = new StreamBuilder().header().configuration('pc').ramSetup(2, BLOCKS).ramPart(2).be64(0x28).build();
      expectError(() => parseAll(cont), 'BAD_STREAM', /continues a block but none was named/);
    });

    it('a RAM setup whose block sizes do not add up', () => {
      const s = new StreamBuilder().header().configuration('pc').sectionStart(1, 2, 'ram', 0, 4).be64(8192 + 4).str8('a').be64(16384).build();
      expectError(() => parseAll(s), 'BAD_STREAM', /add up to more than the announced total/);
    });

    it('device state cut short (no EOF + VM description at the end)', () => {
      const m = buildStream(BLOCKS, sequentialOps(BLOCKS).slice(0, 10));
      expectError(() => parseAll(m.bytes.subarray(0, m.bytes.length - 3)), 'TRUNCATED', /cut short/);
    });
  });
});
