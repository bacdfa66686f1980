// The return-path decoder (QEMU destination -> snap-pipe) against hand-written bytes in QEMU 7.2's format
// (migration.c migrate_send_rp_message / migrate_send_rp_message_req_pages), split at every possible point; the
// refusals QEMU's own source_return_path_thread makes; and the fault-latency histogram.
import { describe, expect, it } from 'vitest';
import { SnapPipeError } from '../../src/errors.js';
import { LatencyHistogram } from '../../src/load/postcopy/latency.js';
import { ReturnPathDecoder, encodePong, encodeReqPages, encodeShut, encodeSwitchoverAck, type RpMessage } from '../../src/format/stream/returnpath.js';

function hex(s: string): Uint8Array {
  return Uint8Array.from(Buffer.from(s.replace(/\s+/g, ''), 'hex'));
}

function decodeAll(bytes: Uint8Array, cuts: number[] = []): RpMessage[] {
  const d = new ReturnPathDecoder();
  const out: RpMessage[] = [];
  let at = 0;
  for (const c of [...cuts, bytes.length]) {
    d.push(bytes.subarray(at, c));
    at = c;
    for (let m = d.next(); m; m = d.next()) out.push(m);
  }
  expect(d.pending).toBe(0);
  return out;
}

function expectBad(bytes: Uint8Array, pattern: RegExp): void {
  const d = new ReturnPathDecoder();
  d.push(bytes);
  let err: unknown;
  try {
    while (d.next());
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(SnapPipeError);
  expect((err as SnapPipeError).code).toBe('BAD_STREAM');
  expect((err as SnapPipeError).message).toMatch(pattern);
}

describe('return path decoder', () => {
  // As QEMU writes them: REQ_PAGES_ID for pc.ram page 0x1234 (4096 bytes), REQ_PAGES for the next one, PONG 3,
  // SHUT 0.
  const wire = hex(`
    0003 0013  0000000001234000 00001000 06 70632e72616d
    0004 000c  0000000001235000 00001000
    0002 0004  00000003
    0001 0004  00000000`);
  const want: RpMessage[] = [
    { type: 'req', block: 'pc.ram', startBytes: 0x1234000, lengthBytes: 4096 },
    { type: 'req', block: undefined, startBytes: 0x1235000, lengthBytes: 4096 },
    { type: 'pong', value: 3 },
    { type: 'shut', status: 0 },
  ];

  it('decodes QEMU 7.2 messages', () => {
    expect(decodeAll(wire)).toEqual(want);
  });

  it('decodes them split at every byte boundary, and byte by byte', () => {
    for (let cut = 1; cut < wire.length; cut++) expect(decodeAll(wire, [cut])).toEqual(want);
    expect(decodeAll(wire, Array.from({ length: wire.length - 1 }, (_, i) => i + 1))).toEqual(want);
  });

  it('encoders write the same bytes', () => {
    const enc = Buffer.concat([encodeReqPages('pc.ram', 0x1234000, 4096), encodeReqPages(undefined, 0x1235000, 4096), encodePong(3), encodeShut(0)]);
    expect(Buffer.from(wire).equals(enc)).toBe(true);
  });

  it('keeps 64-bit offsets, long names and many messages (buffer growth)', () => {
    const name = 'x'.repeat(255);
    const parts: Uint8Array[] = [];
    const expected: RpMessage[] = [];
    for (let i = 0; i < 2000; i++) {
      const start = (2 ** 40 + i) * 4096;
      parts.push(encodeReqPages(i % 3 === 0 ? name : undefined, start, 8192));
      expected.push({ type: 'req', block: i % 3 === 0 ? name : undefined, startBytes: start, lengthBytes: 8192 });
    }
    const all = Buffer.concat(parts);
    expect(decodeAll(all, [1, 5000, 5001, 40000])).toEqual(expected);
    const d = new ReturnPathDecoder();
    d.push(all);
    while (d.next());
    expect(d.count).toBe(2000);
    expect(d.bytes).toBe(all.length);
  });

  it('decodes the recovery messages it may be sent', () => {
    expect(decodeAll(hex('0005 0007 06 70632e72616d'))).toEqual([{ type: 'recv-bitmap', block: 'pc.ram' }]);
    expect(decodeAll(hex('0006 0004 00000001'))).toEqual([{ type: 'resume-ack', value: 1 }]);
  });

  it('decodes QEMU 8.1+\'s SWITCHOVER_ACK (type 7, no payload)', () => {
    expect(decodeAll(hex('0007 0000 0002 0004 00000001'))).toEqual([{ type: 'switchover-ack' }, { type: 'pong', value: 1 }]);
    expect(Buffer.from(encodeSwitchoverAck()).toString('hex')).toBe('00070000');
  });

  it('refuses what QEMU\'s source refuses', () => {
    expectBad(hex('0000 0000'), /unknown message type 0x0000/);
    expectBad(hex('0008 0000'), /unknown message type 0x0008/);
    expectBad(hex('0007 0001 00'), /SWITCHOVER_ACK message with length 1 \(expected 0\)/);
    expectBad(hex('0001 0005 0000000000'), /SHUT message with length 5 \(expected 4\)/);
    expectBad(hex('0002 0002 0000'), /PONG message with length 2/);
    expectBad(hex('0004 000d 00000000000000000000100000'), /REQ_PAGES message with length 13 \(expected 12\)/);
    expectBad(hex('0003 0010 0000000000000000 00001000 06 706372'), /REQ_PAGES_ID message with length 16 for a name of 6 bytes/);
    expectBad(hex('0003 0201'), /REQ_PAGES_ID message with length 513/);
  });

  it('waits for the rest of a message', () => {
    const d = new ReturnPathDecoder();
    d.push(hex('0001 00'));
    expect(d.next()).toBeUndefined();
    d.push(hex('04 0000'));
    expect(d.next()).toBeUndefined();
    expect(d.pending).toBe(6);
    d.push(hex('0001'));
    expect(d.next()).toEqual({ type: 'shut', status: 1 });
  });
});

describe('fault latency histogram', () => {
  it('buckets cover every value, quantiles within one bucket (12.5%), exact min/max/mean', () => {
    for (let i = 1; i < 300; i++) expect(LatencyHistogram.upperUs(i)).toBeGreaterThan(LatencyHistogram.upperUs(i - 1));
    for (const us of [0, 0.3, 1, 1.5, 8, 8.01, 9, 15.99, 16, 17, 100, 1000, 1234.5, 65536, 1e6, 3.7e7]) {
      const i = LatencyHistogram.indexOf(us);
      expect(us).toBeLessThanOrEqual(LatencyHistogram.upperUs(i));
      if (i > 0) expect(us).toBeGreaterThan(LatencyHistogram.upperUs(i - 1));
    }
    const h = new LatencyHistogram();
    for (let i = 1; i <= 1000; i++) h.add(i / 100); // 0.01 .. 10 ms
    const s = h.summary();
    expect(s.count).toBe(1000);
    expect(s.minMs).toBeCloseTo(0.01, 10);
    expect(s.maxMs).toBeCloseTo(10, 10);
    expect(s.meanMs).toBeCloseTo(5.005, 6);
    expect(s.p50Ms).toBeGreaterThanOrEqual(5);
    expect(s.p50Ms).toBeLessThanOrEqual(5 * 1.125);
    expect(s.p99Ms).toBeGreaterThanOrEqual(9.9);
    expect(s.p99Ms).toBeLessThanOrEqual(10);
    expect(s.buckets.reduce((a, b) => a + b.count, 0)).toBe(1000);
    expect(new LatencyHistogram().summary()).toMatchObject({ count: 0, p50Ms: 0, maxMs: 0 });
  });
});
