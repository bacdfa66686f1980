// The end of a stream whose input stays open (QEMU's return path): VmdescEnd says "complete" exactly when the bytes
// so far end with a whole VM description, whatever the pieces they came in, and stays linear on hostile input.
// Also the parser with acceptReturnPath: OPEN_RETURN_PATH and PING reach the sink, and the parse ends at the VM
// description.
import { describe, expect, it } from 'vitest';
import { StreamBuilder } from '../../src/format/stream/encoder.js';
import { CMD_OPEN_RETURN_PATH, CMD_PING } from '../../src/format/stream/constants.js';
import { knowsSwitchoverAck } from '../../src/format/stream/parser.js';
import { VmdescEnd } from '../../src/format/stream/vmdesc-end.js';
import { buildStream, rng, sequentialOps, SMALL_PC_BLOCKS } from '../helpers/model.js';
import { parseAll } from '../helpers/parse.js';

/** Feeds `bytes` in pieces of 1..maxPiece bytes; returns the offsets after which push() said complete. */
function feed(bytes: Uint8Array, seed: number, maxPiece: number): { completeAt: number[]; end: VmdescEnd } {
  const end = new VmdescEnd();
  const r = rng(seed);
  const completeAt: number[] = [];
  for (let at = 0; at < bytes.length; ) {
    const n = Math.min(bytes.length - at, 1 + Math.floor(r() * maxPiece));
    if (end.push(bytes.subarray(at, at + n))) completeAt.push(at + n);
    at += n;
  }
  return { completeAt, end };
}

/** Two device sections, EOF, and the VM description when given (none: the stream ends at its EOF byte). */
const device = (vmdesc: object | null) => {
  const b = new StreamBuilder().device(3, 'timer', new Uint8Array(5000).map((_, i) => i % 7)).device(4, 'cpu', new Uint8Array(300));
  return (vmdesc ? b.eof(vmdesc) : b.u8(0)).build();
};

describe('VmdescEnd', () => {
  it('is complete after the last byte of the VM description, and not before, in any pieces', () => {
    const dev = device({ page_size: 4096, devices: [{ name: 'timer', instance_id: 0 }] });
    for (const [seed, maxPiece] of [[1, 1], [2, 7], [3, 1000], [4, 100000]]) {
      const { completeAt, end } = feed(dev, seed, maxPiece);
      expect(completeAt, `pieces up to ${maxPiece}`).toEqual([dev.length]);
      expect(Buffer.compare(end.bytes, dev)).toBe(0);
    }
  });

  it('is never complete without a VM description, or with one cut short or followed by more bytes', () => {
    expect(feed(device(null), 5, 50).completeAt).toEqual([]);
    const whole = device({ page_size: 4096, devices: [] });
    expect(feed(whole.subarray(0, whole.length - 1), 6, 50).completeAt).toEqual([]);
    const longer = new Uint8Array(whole.length + 1);
    longer.set(whole);
    longer[whole.length] = 0x20;
    expect(feed(longer, 7, 1).completeAt).toEqual([whole.length]);
  });

  it('stays linear on a device state full of VM description look-alikes whose lengths all run to a far end', () => {
    // 400 KiB of EOF + VMDESCRIPTION + a length that points at the end, each followed by JSON-looking text: every
    // look-alike is a candidate, but each is checked once at most, and only near the last 0x00 byte.
    const unit = new TextEncoder().encode('{"page_size": 4096, "devices": [');
    const count = Math.floor((400 * 1024) / (6 + unit.length));
    const total = count * (6 + unit.length);
    const dev = new Uint8Array(total);
    for (let i = 0, at = 0; i < count; i++, at += 6 + unit.length) {
      dev[at] = 0x00;
      dev[at + 1] = 0x06;
      new DataView(dev.buffer).setUint32(at + 2, total - at - 6);
      dev.set(unit, at + 6);
    }
    expect(feed(dev, 8, 64).completeAt).toEqual([]); // nothing here is valid JSON
  }, 5_000);
});

describe('the parser with a return path', () => {
  it('hands OPEN_RETURN_PATH and PING to the sink, says whether the machine type knows SWITCHOVER_ACK, and ends at the VM description', () => {
    const m = buildStream(SMALL_PC_BLOCKS, sequentialOps(SMALL_PC_BLOCKS), { ramEnd: true, machineType: 'pc-q35-8.1' });
    const head = new StreamBuilder().header().configuration('pc-q35-8.1').build();
    const cmds = new StreamBuilder().command(CMD_OPEN_RETURN_PATH).command(CMD_PING, Uint8Array.of(0, 0, 0, 1)).build();
    const stream = Buffer.concat([head, cmds, m.bytes.subarray(head.length)]);
    const events: string[] = [];
    const c = parseAll(stream, 3, 1 << 20, 9000, 0, {
      acceptReturnPath: true,
      sink: {
        returnPathOpened: (ack) => events.push(`open ack=${ack}`),
        ping: (v) => events.push(`ping ${v}`),
        deviceState: () => events.push('device state'),
      },
    });
    expect(events).toEqual(['open ack=true', 'ping 1', 'device state']);
    expect(c.parsed.returnPath).toBe(true);
    expect(Buffer.compare(c.parsed.deviceState, m.deviceState)).toBe(0);
    c.ram.forEach((r, i) => expect(Buffer.compare(r, m.ram[i])).toBe(0));
  });

  it('knows which machine types only a QEMU with SWITCHOVER_ACK (8.1+) runs', () => {
    for (const [name, want] of [['pc-i440fx-7.2', false], ['pc-q35-8.0', false], ['pc-q35-8.1', true], ['pc-i440fx-10.0', true], ['pc-q35-9.2', true], ['microvm', false], ['pc', false]] as const) {
      expect(knowsSwitchoverAck(name), name).toBe(want);
    }
  });
});
