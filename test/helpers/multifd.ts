// Builds multifd bytes as QEMU's sender lays them out (multifd.c multifd_send_initial_packet, multifd_send_fill_packet,
// multifd-nocomp.c multifd_ram_fill_packet), for unit tests only. Every field can be overridden to build damage.
import {
  MULTIFD_DEVICE_STATE_PACKET_BYTES,
  MULTIFD_FLAG_DEVICE_STATE,
  MULTIFD_INIT_BYTES,
  MULTIFD_MAGIC,
  MULTIFD_PAGES_MAX,
  MULTIFD_RAM_PACKET_BYTES,
  MULTIFD_VERSION,
} from '../../src/format/stream/multifd.js';
import { PAGE_BYTES } from '../../src/format/units.js';

function put32(b: Uint8Array, at: number, v: number): void {
  new DataView(b.buffer, b.byteOffset).setUint32(at, v >>> 0);
}

function put64(b: Uint8Array, at: number, v: number | bigint): void {
  new DataView(b.buffer, b.byteOffset).setBigUint64(at, BigInt(v));
}

function putName(b: Uint8Array, at: number, name: string, fieldBytes = 256): void {
  for (let i = 0; i < name.length && i < fieldBytes; i++) b[at + i] = name.charCodeAt(i) & 0xff;
}

export function encodeInit(opts: { id: number; magic?: number; version?: number; uuid?: Uint8Array }): Uint8Array {
  const b = new Uint8Array(MULTIFD_INIT_BYTES);
  put32(b, 0, opts.magic ?? MULTIFD_MAGIC);
  put32(b, 4, opts.version ?? MULTIFD_VERSION);
  if (opts.uuid) b.set(opts.uuid, 8);
  b[24] = opts.id;
  return b;
}

export interface RamPacketSpec {
  flags?: number;
  packetNum?: number | bigint;
  block?: string;
  /** Offsets of data pages; each gets a page of data filled with `fill(i)`. */
  normal?: (number | bigint)[];
  zero?: (number | bigint)[];
  pagesAlloc?: number;
  /** Overrides of the counts and size (default: what the offsets say). */
  normalPages?: number;
  zeroPages?: number;
  nextPacketSize?: number;
  magic?: number;
  version?: number;
}

/** The packet's fixed part (1344 bytes), then its page data: page i filled with byte (i + 1). */
export function encodeRamPacket(s: RamPacketSpec): { fixed: Uint8Array; data: Uint8Array } {
  const normal = s.normal ?? [];
  const zero = s.zero ?? [];
  const fixed = new Uint8Array(MULTIFD_RAM_PACKET_BYTES);
  put32(fixed, 0, s.magic ?? MULTIFD_MAGIC);
  put32(fixed, 4, s.version ?? MULTIFD_VERSION);
  put32(fixed, 8, s.flags ?? 0);
  put32(fixed, 12, s.pagesAlloc ?? MULTIFD_PAGES_MAX);
  put32(fixed, 16, s.normalPages ?? normal.length);
  put32(fixed, 20, s.nextPacketSize ?? normal.length * PAGE_BYTES);
  put64(fixed, 24, s.packetNum ?? 0);
  put32(fixed, 32, s.zeroPages ?? zero.length);
  if (s.block !== undefined) putName(fixed, 64, s.block);
  [...normal, ...zero].slice(0, MULTIFD_PAGES_MAX).forEach((o, i) => put64(fixed, 320 + 8 * i, o));
  const data = new Uint8Array(normal.length * PAGE_BYTES);
  for (let i = 0; i < normal.length; i++) data.fill((i + 1) & 0xff, i * PAGE_BYTES, (i + 1) * PAGE_BYTES);
  return { fixed, data };
}

export function encodeDeviceStatePacket(s: { idstr: string; instanceId?: number; dataBytes: number; flags?: number }): Uint8Array {
  const b = new Uint8Array(MULTIFD_DEVICE_STATE_PACKET_BYTES);
  put32(b, 0, MULTIFD_MAGIC);
  put32(b, 4, MULTIFD_VERSION);
  put32(b, 8, s.flags ?? MULTIFD_FLAG_DEVICE_STATE);
  putName(b, 12, s.idstr);
  put32(b, 268, s.instanceId ?? 0);
  put32(b, 272, s.dataBytes);
  return b;
}
