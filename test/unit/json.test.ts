// The one-pass JSON check against JSON.parse itself, and the device-state tail search it serves: linear on a device
// state built to look like a VM description at every few bytes, and the same answers as trying every position.
import { describe, expect, it } from 'vitest';
import { SnapPipeError } from '../../src/errors.js';
import { StreamBuilder } from '../../src/format/stream/encoder.js';
import { isJsonText } from '../../src/format/stream/json.js';
import { checkDeviceStateEnd, vmdescCandidates, vmdescStart } from '../../src/format/stream/parser.js';
import { rng } from '../helpers/model.js';

function parses(bytes: Uint8Array): boolean {
  try {
    JSON.parse(new TextDecoder().decode(bytes));
    return true;
  } catch {
    return false;
  }
}

const enc = new TextEncoder();
const CORPUS = [
  '{"page_size":4096,"devices":[{"name":"timer","instance_id":0,"vmsd_name":"timer","version":2,"fields":[{"name":"cpu_ticks_offset","type":"int64","size":8}]}]}',
  '[]', '{}', ' [ ] ', '\t{\r\n}\n', '0', '-0', '-0.5e+10', '1E-3', '12.25', 'true', 'false', 'null', '""', '"\\u00e9\\n\\"\\\\\\/"',
  '[1,[2,{"a":[3,{}]}],"x"]', '{"a":{"b":{"c":[[[[]]]]}}}', '"\u00e9\u2028\ufffd"', '\ufeff{"bom":1}', '"\x7f"',
  '', ' ', '[', ']', '{', '{"a"}', '{"a":}', '{"a":1,}', '[1,]', '[,1]', '01', '1.', '.5', '+1', '-', '1e', '1e+', '0x10',
  'tru', 'nul', 'True', '[1 2]', '{"a" 1}', '{a:1}', "'a'", '"\\x41"', '"\\u12"', '"\\u12G4"', '"abc', '"a\tb"', '"a\nb"',
  '[] []', '{}x', 'NaN', 'Infinity', '\ufeff\ufeff{}', '{"a":1}\u0000', '\u0000', '[\u00a0]',
];

describe('isJsonText', () => {
  it('agrees with JSON.parse on hand-picked texts', () => {
    for (const text of CORPUS) {
      const b = enc.encode(text);
      expect(isJsonText(b), JSON.stringify(text)).toBe(parses(b));
    }
    for (const bytes of [[0xc0, 0x22], [0x22, 0xc0, 0x22], [0x22, 0xe2, 0x22], [0x22, 0xff, 0xfe, 0x22], [0xef, 0xbb], [0xef, 0xbb, 0xbf], [0x5b, 0x80, 0x5d]]) {
      const b = Uint8Array.from(bytes);
      expect(isJsonText(b), bytes.join(',')).toBe(parses(b));
    }
  });

  it('agrees with JSON.parse on 20000 random mutations of JSON texts', () => {
    const r = rng(77);
    const alphabet = enc.encode('{}[]",:\\ -+.0123456789eEtrufalsn\u0000\t\n\r/bu');
    for (let i = 0; i < 20000; i++) {
      const src = enc.encode(CORPUS[Math.floor(r() * 20)]);
      const b = Array.from(src);
      for (let k = 0; k < 1 + Math.floor(r() * 3); k++) {
        const at = Math.floor(r() * (b.length + 1));
        const what = r();
        const byte = r() < 0.8 ? alphabet[Math.floor(r() * alphabet.length)] : Math.floor(r() * 256);
        if (what < 0.4) b.splice(at, 1);
        else if (what < 0.7) b.splice(at, 0, byte);
        else b[Math.min(at, b.length - 1)] = byte;
      }
      const u = Uint8Array.from(b);
      if (isJsonText(u) !== parses(u)) throw new Error(`disagrees with JSON.parse on ${JSON.stringify(new TextDecoder().decode(u))}`);
    }
  });

  it('takes deep nesting without recursion', () => {
    const deep = enc.encode('['.repeat(1_000_000) + ']'.repeat(1_000_000));
    expect(isJsonText(deep)).toBe(true);
    expect(isJsonText(deep.subarray(1))).toBe(false);
  });
});

/** The search as it was: every position tried, latest first (quadratic; for small inputs only). */
function vmdescStartEveryPosition(dev: Uint8Array): number {
  for (let k = dev.length - 6; k >= 0; k--) {
    if (dev[k] !== 0 || dev[k + 1] !== 6) continue;
    const len = ((dev[k + 2] << 24) | (dev[k + 3] << 16) | (dev[k + 4] << 8) | dev[k + 5]) >>> 0;
    if (len === dev.length - k - 6 && parses(dev.subarray(k + 6))) return k;
  }
  return -1;
}

/**
 * A device state of about `bytes` built to be as slow as possible to search: `00 06 <length to the end>` followed by
 * JSON-looking text, over and over, so that every few bytes an EOF + VMDESCRIPTION pair claims the rest of it.
 */
function candidateFlood(bytes: number, tail: 'json' | 'broken'): Uint8Array {
  const unit = enc.encode('{"page_size":4096}');
  const step = 6 + unit.length;
  const count = Math.floor(bytes / step);
  const dev = new Uint8Array(1 + count * step);
  dev[0] = 0x04; // a FULL section's type byte, as a device state starts
  const view = new DataView(dev.buffer);
  for (let i = 0; i < count; i++) {
    const k = 1 + i * step;
    dev[k + 1] = 6;
    view.setUint32(k + 2, dev.length - k - 6);
    dev.set(unit, k + 6);
  }
  if (tail === 'broken') dev[dev.length - 1] = 0x2c; // the last "JSON" no longer parses
  return dev;
}

describe('the VM description at the end of a device state', () => {
  it('is found where trying every position finds it, on real tails and mutated ones', () => {
    const r = rng(5);
    const b = new StreamBuilder().u8(4).be32(3).str8('timer').be32(0).be32(2).bytes(new Uint8Array(300).map((_, i) => i & 0xff)).u8(0x7e).be32(3);
    const vmdesc = { page_size: 4096, devices: [{ name: 'timer', fields: [] }] };
    const real = b.eof(vmdesc).build();
    expect(vmdescStart(real)).toBe(real.length - 6 - enc.encode(JSON.stringify(vmdesc)).length);
    for (let i = 0; i < 3000; i++) {
      const dev = real.slice(0, real.length - (i % 5 === 0 ? Math.floor(r() * 40) : 0));
      for (let k = 0; k < Math.floor(r() * 3); k++) dev[Math.floor(r() * dev.length)] = [0, 6, 0x7d, 0x22, Math.floor(r() * 256)][Math.floor(r() * 5)];
      expect(vmdescStart(dev)).toBe(vmdescStartEveryPosition(dev));
    }
  });

  it('looks at no more than 6 positions, however many EOF + VMDESCRIPTION pairs claim the rest (300 KiB flood)', { timeout: 5_000 }, () => {
    for (const tail of ['json', 'broken'] as const) {
      const dev = candidateFlood(300 << 10, tail);
      // Every unit is a candidate by its header and length; the old search parsed the rest of the input at each.
      let pairs = 0;
      for (let k = 0; k + 6 <= dev.length; k++) if (dev[k] === 0 && dev[k + 1] === 6 && new DataView(dev.buffer).getUint32(k + 2) === dev.length - k - 6) pairs++;
      expect(pairs).toBeGreaterThan(12_000);
      expect(vmdescCandidates(dev).length).toBeLessThanOrEqual(6);
      // The flood's last unit is a real VM description; once it is broken, nothing else may pass for one.
      expect(vmdescStart(dev)).toBe(tail === 'json' ? dev.length - 6 - 18 : -1);
      if (tail === 'json') expect(checkDeviceStateEnd(dev, 0)).toBe(true);
      else expect(() => checkDeviceStateEnd(dev, 0)).toThrow(SnapPipeError);
    }
  });
});
