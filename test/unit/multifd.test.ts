// The multifd decoder (src/format/stream/multifd.ts) on packets built as each QEMU generation lays them out
// (test/helpers/multifd.ts), every refusal with its exact line, and random damage: only SnapPipeError comes out.
import { describe, expect, it } from 'vitest';
import { SnapPipeError } from '../../src/errors.js';
import {
  decodeDeviceStatePacket,
  decodeInit,
  decodePacketHeader,
  decodeRamPacket,
  encodeMultifdInit,
  encodeRamPacketFixed,
  MULTIFD_DEVICE_STATE_PACKET_BYTES,
  MULTIFD_FLAG_DEVICE_STATE,
  MULTIFD_FLAG_SYNC,
  MULTIFD_HEADER_BYTES,
  MULTIFD_INIT_BYTES,
  MULTIFD_RAM_PACKET_BYTES,
  MULTIFD_WIRE_10_0,
  MULTIFD_WIRE_7_2,
  MULTIFD_WIRE_9_0,
  MULTIFD_WIRE_ANY,
  wireForQemu,
  type MultifdWire,
} from '../../src/format/stream/multifd.js';
import { PAGE_BYTES } from '../../src/format/units.js';
import { encodeDeviceStatePacket, encodeInit, encodeRamPacket, type RamPacketSpec } from '../helpers/multifd.js';
import { rng } from '../helpers/model.js';

function expectError(fn: () => unknown, code: string, line: string): void {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  expect(caught, 'expected an error').toBeInstanceOf(SnapPipeError);
  expect((caught as SnapPipeError).code).toBe(code);
  expect((caught as SnapPipeError).message).toBe(line);
}

const ram = (s: RamPacketSpec, wire: MultifdWire = MULTIFD_WIRE_ANY) => decodeRamPacket(encodeRamPacket(s).fixed, wire);

describe('multifd channel init', () => {
  it('decodes magic, version, uuid and channel id', () => {
    const uuid = Uint8Array.from({ length: 16 }, (_, i) => i + 1);
    const init = decodeInit(encodeInit({ id: 1, uuid }), 2);
    expect(init.channelId).toBe(1);
    expect([...init.uuid]).toEqual([...uuid]);
  });

  it('refuses a short init, a wrong magic or version, and a channel id past multifd-channels', () => {
    expectError(() => decodeInit(new Uint8Array(10), 2), 'TRUNCATED', 'multifd channel init: 10 bytes, expected 64');
    expectError(() => decodeInit(encodeInit({ id: 0, magic: 0x5145564d }), 2), 'BAD_STREAM', 'multifd channel init: magic 0x5145564d, expected 0x11223344');
    expectError(() => decodeInit(encodeInit({ id: 0, version: 2 }), 2), 'UNSUPPORTED', 'multifd channel init: version 2 (snap-pipe knows version 1, QEMU 4.0 to 10.2)');
    expectError(() => decodeInit(encodeInit({ id: 2 }), 2), 'BAD_STREAM', 'multifd channel init: channel id 2, expected below 2 (multifd-channels)');
  });
});

describe('multifd wires by QEMU version', () => {
  it('picks the generation of each QEMU and refuses versions it has not read', () => {
    expect(wireForQemu(5, 2)).toBe(MULTIFD_WIRE_7_2);
    expect(wireForQemu(8, 2)).toBe(MULTIFD_WIRE_7_2);
    expect(wireForQemu(9, 0)).toBe(MULTIFD_WIRE_9_0);
    expect(wireForQemu(9, 2)).toBe(MULTIFD_WIRE_9_0);
    expect(wireForQemu(10, 2)).toBe(MULTIFD_WIRE_10_0);
    expectError(() => wireForQemu(3, 1), 'UNSUPPORTED', 'multifd from QEMU 3.1: multifd came in QEMU 4.0');
    expectError(() => wireForQemu(11, 0), 'UNSUPPORTED', 'multifd from QEMU 11.0: snap-pipe knows the multifd wire of QEMU 4.0 to 10.2');
  });
});

describe('multifd RAM packets', () => {
  it('QEMU 7.2: data pages, and a SYNC packet that keeps a stale size and name (multifd_send_fill_packet)', () => {
    const { fixed, data } = encodeRamPacket({ block: 'pc.ram', normal: [0, 4096, 0x10000], packetNum: 7 });
    const header = decodePacketHeader(fixed.subarray(0, MULTIFD_HEADER_BYTES), MULTIFD_WIRE_7_2);
    expect(header).toEqual({ kind: 'ram', flags: 0, sync: false, packetBytes: MULTIFD_RAM_PACKET_BYTES });
    const p = decodeRamPacket(fixed, MULTIFD_WIRE_7_2);
    expect(p).toMatchObject({ packetNum: 7, pagesAlloc: 128, normalPages: 3, zeroPages: 0, block: 'pc.ram', offsets: [0, 4096, 0x10000] });
    expect(p.dataBytes).toBe(data.length);
    const sync = ram({ flags: MULTIFD_FLAG_SYNC, block: 'pc.ram', nextPacketSize: 512 * 1024, packetNum: 8 }, MULTIFD_WIRE_7_2);
    expect(sync).toMatchObject({ sync: true, normalPages: 0, block: '', offsets: [], dataBytes: 0 });
    // Before 9.0 a SYNC packet may carry pages.
    expect(ram({ flags: MULTIFD_FLAG_SYNC, block: 'pc.ram', normal: [8192] }, MULTIFD_WIRE_7_2).offsets).toEqual([8192]);
  });

  it('QEMU 9.0+: zero pages after the data pages; a SYNC packet with pages_alloc 0 and no name', () => {
    const p = ram({ block: '0000:00:02.0/vga.vram', normal: [4096], zero: [0, 8192] }, MULTIFD_WIRE_9_0);
    expect(p).toMatchObject({ normalPages: 1, zeroPages: 2, offsets: [4096, 0, 8192], dataBytes: PAGE_BYTES });
    expect(ram({ flags: MULTIFD_FLAG_SYNC, pagesAlloc: 0, packetNum: 2 ** 40 }, MULTIFD_WIRE_10_0)).toMatchObject({ sync: true, pagesAlloc: 0, packetNum: 2 ** 40 });
  });

  it('reads a block name as latin1, as the stream parser does', () => {
    expect(ram({ block: 'caf\xe9', normal: [0] }).block).toBe('caf\xe9');
  });

  it('refuses compression by name, unknown flags and the device-state flag before 10.0', () => {
    const line = (m: string) => `multifd packet with ${m} compression (multifd-compression=${m}): snap-pipe takes uncompressed multifd only`;
    for (const [bits, name] of [[1, 'zlib'], [2, 'zstd'], [4, 'qpl'], [8, 'uadk'], [16, 'qatzip']] as const) {
      expectError(() => ram({ flags: bits << 1 }), 'UNSUPPORTED', line(name));
    }
    expectError(() => ram({ flags: 3 << 1 }), 'UNSUPPORTED', 'multifd packet with an unknown compression method (3): snap-pipe takes uncompressed multifd only');
    expectError(() => ram({ flags: 0x80 }), 'UNSUPPORTED', 'multifd packet flags 0x00000080: bits 0x00000080 unknown to the any QEMU 4.0-10.2 wire');
    expectError(() => ram({ flags: 0x40 }, MULTIFD_WIRE_9_0), 'UNSUPPORTED', 'multifd packet flags 0x00000040: bits 0x00000040 unknown to the QEMU 9.0-9.2 wire');
  });

  it('refuses a wrong magic or version, and a short packet', () => {
    expectError(() => ram({ magic: 0 }), 'BAD_STREAM', 'multifd packet: magic 0x00000000, expected 0x11223344');
    expectError(() => ram({ version: 0 }), 'UNSUPPORTED', 'multifd packet: version 0 (snap-pipe knows version 1, QEMU 4.0 to 10.2)');
    expectError(() => decodePacketHeader(new Uint8Array(11), MULTIFD_WIRE_ANY), 'TRUNCATED', 'multifd packet header: 11 bytes, expected 12');
    expectError(() => decodeRamPacket(new Uint8Array(320), MULTIFD_WIRE_ANY), 'TRUNCATED', 'multifd RAM packet: 320 bytes, expected 1344');
  });

  it('refuses counts past their bounds before reading any offset', () => {
    expectError(() => ram({ pagesAlloc: 129 }), 'BAD_STREAM', 'multifd packet: pages_alloc 129, at most 128 (512 KiB of 4 KiB pages)');
    expectError(() => ram({ pagesAlloc: 2 ** 32 - 1 }), 'BAD_STREAM', 'multifd packet: pages_alloc 4294967295, at most 128 (512 KiB of 4 KiB pages)');
    expectError(() => ram({ pagesAlloc: 4, normalPages: 5 }), 'BAD_STREAM', 'multifd packet: 5 data pages, more than pages_alloc 4');
    expectError(() => ram({ pagesAlloc: 4, normalPages: 3, zeroPages: 2 }), 'BAD_STREAM', 'multifd packet: 2 zero pages, more than the 1 pages_alloc leaves');
    expectError(() => ram({ block: 'pc.ram', zero: [0] }, MULTIFD_WIRE_7_2), 'BAD_STREAM', 'multifd packet: zero_pages 1 in a field the QEMU 4.0-8.2 wire keeps zero');
    expectError(() => ram({ flags: MULTIFD_FLAG_SYNC, block: 'pc.ram', zero: [0] }, MULTIFD_WIRE_10_0), 'BAD_STREAM', 'multifd SYNC packet with 1 pages (the QEMU 10.0-10.2 wire sends SYNC alone)');
  });

  it('refuses a size that disagrees with the pages, a missing block name, and offsets that are not pages', () => {
    expectError(() => ram({ block: 'pc.ram', normal: [0], nextPacketSize: 100 }), 'BAD_STREAM', 'multifd packet: next_packet_size 100 for 1 data pages (expected 4096)');
    expectError(() => ram({ normal: [0] }), 'BAD_STREAM', 'multifd packet: 1 pages but no block name');
    expectError(() => ram({ block: 'x'.repeat(256), normal: [0] }), 'BAD_STREAM', 'multifd packet: 1 pages but an unterminated block name');
    expectError(() => ram({ block: 'pc.ram', normal: [0, 100] }), 'BAD_STREAM', "multifd packet: page 1's offset 100 is not a 4 KiB page below 16 TiB");
    expectError(() => ram({ block: 'pc.ram', normal: [2 ** 44] }), 'BAD_STREAM', `multifd packet: page 0's offset ${2 ** 44} is not a 4 KiB page below 16 TiB`);
    expectError(() => ram({ block: 'pc.ram', zero: [2n ** 64n - 4096n] }), 'BAD_STREAM', "multifd packet: page 0's offset of 2^53 or more is not a 4 KiB page below 16 TiB");
    expectError(() => ram({ packetNum: 2n ** 63n }), 'BAD_STREAM', 'multifd packet: packet_num of 2^53 or more');
  });
});

describe('multifd encoding (load --connect)', () => {
  it('an init and RAM packets that every wire decodes back to what was encoded, byte for byte as the test builder lays them out', () => {
    expect(decodeInit(encodeMultifdInit(3), 4)).toEqual({ uuid: new Uint8Array(16), channelId: 3 });
    expect(Buffer.compare(encodeMultifdInit(3), encodeInit({ id: 3 }))).toBe(0);
    const offsets = [0, 4096, 1 << 30, 2 ** 40];
    const block = Uint8Array.from('pc.ram', (c) => c.charCodeAt(0));
    const fixed = encodeRamPacketFixed({ sync: false, packetNum: 2 ** 33 + 5, block, offsets, count: 4 });
    expect(Buffer.compare(fixed, encodeRamPacket({ block: 'pc.ram', normal: offsets, packetNum: 2 ** 33 + 5 }).fixed)).toBe(0);
    for (const wire of [MULTIFD_WIRE_7_2, MULTIFD_WIRE_9_0, MULTIFD_WIRE_10_0]) {
      expect(decodeRamPacket(fixed, wire)).toMatchObject({ sync: false, packetNum: 2 ** 33 + 5, normalPages: 4, zeroPages: 0, block: 'pc.ram', offsets, dataBytes: 4 * 4096 });
      // A SYNC packet alone: no pages, no name, next_packet_size 0; pages_alloc 128 as 7.2 sends it, which 10.x accepts.
      const sync = encodeRamPacketFixed({ sync: true, packetNum: 9, block, offsets, count: 0 });
      expect(decodeRamPacket(sync, wire)).toMatchObject({ sync: true, normalPages: 0, zeroPages: 0, block: '', offsets: [], dataBytes: 0 });
    }
    expect(() => encodeRamPacketFixed({ sync: false, packetNum: 0, block, offsets: new Array(129).fill(0), count: 129 })).toThrow(RangeError);
  });
});

describe('multifd device-state packets (QEMU 10.0+)', () => {
  it('decodes the header and the device, and refuses what QEMU never sends', () => {
    const bytes = encodeDeviceStatePacket({ idstr: '0000:00:04.0/vfio', instanceId: 3, dataBytes: 1 << 20 });
    const header = decodePacketHeader(bytes.subarray(0, MULTIFD_HEADER_BYTES), MULTIFD_WIRE_10_0);
    expect(header).toEqual({ kind: 'device-state', flags: MULTIFD_FLAG_DEVICE_STATE, sync: false, packetBytes: MULTIFD_DEVICE_STATE_PACKET_BYTES });
    expect(decodeDeviceStatePacket(bytes, MULTIFD_WIRE_10_0)).toEqual({ idstr: '0000:00:04.0/vfio', instanceId: 3, dataBytes: 1 << 20 });
    expectError(() => decodeDeviceStatePacket(encodeDeviceStatePacket({ idstr: 'v', dataBytes: 0 }), MULTIFD_WIRE_10_0), 'BAD_STREAM', "multifd device-state packet for 'v': 0 bytes of state, expected 1 to 1073741824");
    expectError(() => decodeDeviceStatePacket(encodeDeviceStatePacket({ idstr: '', dataBytes: 1 }), MULTIFD_WIRE_10_0), 'BAD_STREAM', 'multifd device-state packet: no device name');
    const sync = encodeDeviceStatePacket({ idstr: 'v', dataBytes: 1, flags: MULTIFD_FLAG_DEVICE_STATE | MULTIFD_FLAG_SYNC });
    expectError(() => decodePacketHeader(sync, MULTIFD_WIRE_10_0), 'BAD_STREAM', 'multifd device-state packet with the SYNC flag (QEMU never sends one)');
    const padded = new Uint8Array(MULTIFD_RAM_PACKET_BYTES);
    padded.set(bytes);
    expectError(() => decodeRamPacket(padded, MULTIFD_WIRE_10_0), 'BAD_STREAM', 'multifd packet: a device-state packet where a RAM packet was announced');
    expectError(() => decodeDeviceStatePacket(encodeRamPacket({}).fixed, MULTIFD_WIRE_10_0), 'BAD_STREAM', 'multifd packet: a RAM packet where a device-state packet was announced');
  });
});

describe('multifd decoder under random damage', () => {
  const wires = [MULTIFD_WIRE_7_2, MULTIFD_WIRE_9_0, MULTIFD_WIRE_10_0, MULTIFD_WIRE_ANY];
  const seeds = [
    encodeInit({ id: 1 }),
    encodeRamPacket({ block: 'pc.ram', normal: Array.from({ length: 60 }, (_, i) => i * 4096), zero: [1 << 20] }).fixed,
    encodeRamPacket({ flags: MULTIFD_FLAG_SYNC, pagesAlloc: 0 }).fixed,
    encodeDeviceStatePacket({ idstr: 'dev', dataBytes: 10 }),
  ];

  /** Flips bits, overwrites big-endian fields with edge values, or cuts the bytes short. */
  function damage(src: Uint8Array, r: () => number): Uint8Array {
    const b = src.slice(0, r() < 0.1 ? Math.floor(r() * src.length) : src.length);
    const edits = 1 + Math.floor(r() * 4);
    for (let e = 0; e < edits && b.length > 0; e++) {
      const at = Math.floor(r() * Math.min(b.length, r() < 0.7 ? 80 : b.length));
      if (r() < 0.5) b[at] ^= 1 << Math.floor(r() * 8);
      else if ((at & ~3) + 4 <= b.length) new DataView(b.buffer).setUint32(at & ~3, [0, 1, 0x7f, 0x80, 128, 129, 0xffffffff, 0x40, 0x11223344][Math.floor(r() * 9)] >>> 0);
    }
    return b;
  }

  function decodeAll(b: Uint8Array, wire: MultifdWire): void {
    if (b.length === MULTIFD_INIT_BYTES) decodeInit(b, 4);
    const h = decodePacketHeader(b, wire);
    if (h.kind === 'ram') decodeRamPacket(b, wire);
    else decodeDeviceStatePacket(b, wire);
  }

  it('5000 damaged inits and packets: a result or a one-line SnapPipeError, never anything else, each in bounded time', () => {
    const r = rng(20240601);
    const codes = new Set<string>();
    const t0 = Date.now();
    for (let i = 0; i < 5000; i++) {
      const input = damage(seeds[i % seeds.length], r);
      const wire = wires[Math.floor(r() * wires.length)];
      try {
        decodeAll(input, wire);
      } catch (err) {
        if (!(err instanceof SnapPipeError)) throw new Error(`case ${i}: ${String(err)}`);
        expect(err.message).not.toMatch(/\n/);
        codes.add(err.code);
      }
    }
    expect([...codes].sort()).toEqual(['BAD_STREAM', 'TRUNCATED', 'UNSUPPORTED']);
    expect(Date.now() - t0).toBeLessThan(10_000);
  });
});
