// QEMU's multifd wire format (migration `multifd` capability over a socket), decoded from bytes in hand: the init
// message that opens each multifd channel, the packet header, the RAM packet with its page offsets, and the
// device-state packet of QEMU 10.0+. Pure: the caller reads a channel and hands the bytes over; nothing here
// allocates in proportion to a number read from the wire. At the end, the encoders of the init and of a RAM packet's
// fixed part, for load as a multifd source. docs/MULTIFD.md gives the per-version facts and sources.
//
// All integers big-endian. Byte layouts (QEMU 10.2 names; migration/multifd.c MultiFDInit_t, multifd.h):
//
//   init (64 bytes, once per channel)     packet header (12 bytes, every packet)
//     0  be32 magic 0x11223344              0  be32 magic 0x11223344
//     4  be32 version 1                     4  be32 version 1
//     8  16   uuid (0 unless -uuid)          8  be32 flags
//    24  u8   channel id
//    25  7+32 reserved (zero)
//
//   RAM packet (1344 bytes, then normal_pages * 4 KiB of page data; next_packet_size can be stale, see below)
//     0  header (12)                      32  be32 zero_pages (9.0+; reserved and zero before)
//    12  be32 pages_alloc (<= 128)        36  4+24 reserved
//    16  be32 normal_pages                64  char[256] ramblock (NUL-terminated idstr)
//    20  be32 next_packet_size           320  be64 offset[128]: normal pages first, then zero pages
//    24  be64 packet_num (one counter over all channels)
//
//   device-state packet (QEMU 10.0+, flag 0x40; 276 bytes, then next_packet_size bytes of device state)
//     0  header (12)   12  char[256] idstr   268  be32 instance_id   272  be32 next_packet_size
import { SnapPipeError } from '../../errors.js';
import { PAGE_BYTES } from '../units.js';

/**
 * Multifd channels snap-pipe takes or opens at most (save --listen, load --connect). QEMU allows 255 (options.c,
 * multifd-channels), but each channel costs a thread and a ring in save, and on this project's machines the disk is
 * saturated by 2 to 4 channels.
 */
export const MULTIFD_CHANNELS_MAX = 16;

export const MULTIFD_MAGIC = 0x11223344;
export const MULTIFD_VERSION = 1;
export const MULTIFD_INIT_BYTES = 64;
export const MULTIFD_HEADER_BYTES = 12;

/** multifd.h MULTIFD_PACKET_SIZE (512 KiB) / x86's 4 KiB target page: pages per packet, and offset slots on the wire. */
export const MULTIFD_PAGES_MAX = (512 * 1024) / PAGE_BYTES;
const RAM_PAGES_ALLOC_AT = 12;
const RAM_NORMAL_AT = 16;
const RAM_NEXT_SIZE_AT = 20;
const RAM_PACKET_NUM_AT = 24;
const RAM_ZERO_AT = 32;
const RAM_BLOCK_AT = 64;
const NAME_BYTES = 256;
const RAM_OFFSETS_AT = 320;
/** sizeof(MultiFDPacket_t) + 8 * page count: a RAM packet always carries all 128 offset slots (multifd_send_setup). */
export const MULTIFD_RAM_PACKET_BYTES = RAM_OFFSETS_AT + 8 * MULTIFD_PAGES_MAX;
/** sizeof(MultiFDPacketDeviceState_t) (QEMU 10.0+). */
export const MULTIFD_DEVICE_STATE_PACKET_BYTES = 276;
/**
 * QEMU puts no bound on a device-state packet's data (multifd-device-state.c multifd_queue_device_state sends what
 * the device hands it; VFIO hands buffers of its data-buffer size, 1 MiB by default). 1 GiB is far past that.
 */
export const MULTIFD_DEVICE_STATE_DATA_BYTES_MAX = 1 << 30;
/** A page offset at or past 16 TiB is damage (the parser's RAM_TOTAL_BYTES_MAX bounds a whole guest there). */
const OFFSET_BYTES_MAX = 2 ** 44;

export const MULTIFD_FLAG_SYNC = 0x01;
export const MULTIFD_FLAG_DEVICE_STATE = 0x40;
/**
 * Flag bits 1-5 name the compression method (multifd.h MULTIFD_FLAG_COMPRESSION_MASK: 3 bits in 7.2, 5 bits in
 * 10.0 for qpl, uadk and qatzip). Every wire reads all five as compression: any of them set is refused by name.
 */
const COMPRESSION_MASK = 0x3e;
const COMPRESSION_SHIFT = 1;

/**
 * What one QEMU generation may put on the wire. The init message and the packet version are 1 in every QEMU from
 * 4.0 to 10.2, so they cannot tell generations apart; each later field sits where earlier QEMUs wrote zeros.
 * A receiver that knows its source's version decodes strictly with wireForQemu(); one that does not uses
 * MULTIFD_WIRE_ANY, the newest layout, which decodes every older packet the same way.
 */
export interface MultifdWire {
  readonly label: string;
  /** The zero_pages field and its offsets (9.0+: zero-page-detection=multifd); before, the field is reserved. */
  readonly zeroPages: boolean;
  /** Device-state packets (10.0+, flag 0x40). */
  readonly deviceState: boolean;
  /** SYNC packets may carry pages (before 9.0); from 9.0 a SYNC packet carries none (multifd_send_thread). */
  readonly syncCarriesPages: boolean;
}

export const MULTIFD_WIRE_7_2: MultifdWire = { label: 'QEMU 4.0-8.2', zeroPages: false, deviceState: false, syncCarriesPages: true };
export const MULTIFD_WIRE_9_0: MultifdWire = { label: 'QEMU 9.0-9.2', zeroPages: true, deviceState: false, syncCarriesPages: false };
export const MULTIFD_WIRE_10_0: MultifdWire = { label: 'QEMU 10.0-10.2', zeroPages: true, deviceState: true, syncCarriesPages: false };
/** For a source of unknown version: every field and flag of the newest layout; SYNC packets with pages allowed. */
export const MULTIFD_WIRE_ANY: MultifdWire = { ...MULTIFD_WIRE_10_0, label: 'any QEMU 4.0-10.2', syncCarriesPages: true };

/** The wire of QEMU major.minor (4.0 to 10.2); throws for a QEMU snap-pipe has not read. */
export function wireForQemu(major: number, minor: number): MultifdWire {
  const v = major * 100 + minor;
  if (v < 400) throw new SnapPipeError('UNSUPPORTED', `multifd from QEMU ${major}.${minor}: multifd came in QEMU 4.0`);
  if (v > 1002) throw new SnapPipeError('UNSUPPORTED', `multifd from QEMU ${major}.${minor}: snap-pipe knows the multifd wire of QEMU 4.0 to 10.2`);
  if (v >= 1000) return MULTIFD_WIRE_10_0;
  if (v >= 900) return MULTIFD_WIRE_9_0;
  return MULTIFD_WIRE_7_2;
}

export interface MultifdInit {
  uuid: Uint8Array;
  channelId: number;
}

export interface MultifdPacketHeader {
  kind: 'ram' | 'device-state';
  flags: number;
  sync: boolean;
  /** The whole fixed part of this packet, header included: read this many bytes before decoding it. */
  packetBytes: number;
}

export interface MultifdRamPacket {
  flags: number;
  sync: boolean;
  packetNum: number;
  pagesAlloc: number;
  normalPages: number;
  zeroPages: number;
  /** The RAM block's idstr; '' when the packet names no page (QEMU 7.2 leaves a stale name there). */
  block: string;
  /**
   * Byte offsets in the block: normalPages data pages first, then zeroPages zero pages. Data page i's 4 KiB is at
   * i * PAGE_BYTES from the end of the packet's fixed part (multifd-nocomp.c multifd_send_prepare_iovs).
   */
  offsets: number[];
  /** The page data after the fixed part: normalPages * PAGE_BYTES (next_packet_size, checked when there are pages). */
  dataBytes: number;
}

export interface MultifdDeviceStatePacket {
  idstr: string;
  instanceId: number;
  dataBytes: number;
}

const latin1 = new TextDecoder('latin1');

/** Compression methods by their value in the flags' compression bits (multifd.h MULTIFD_FLAG_ZLIB ...). */
const COMPRESSION_NAMES: [number, string][] = [
  [1, 'zlib'],
  [2, 'zstd'],
  [4, 'qpl'],
  [8, 'uadk'],
  [16, 'qatzip'],
];

function hex(n: number): string {
  return `0x${n.toString(16).padStart(8, '0')}`;
}

function be32(b: Uint8Array, at: number): number {
  return ((b[at] << 24) | (b[at + 1] << 16) | (b[at + 2] << 8) | b[at + 3]) >>> 0;
}

/** A be64 as a number; null when it is 2^53 or more (no exact number holds it). */
function be64(b: Uint8Array, at: number): number | null {
  const hi = be32(b, at);
  if (hi >= 0x20_0000) return null;
  return hi * 0x1_0000_0000 + be32(b, at + 4);
}

function need(bytes: Uint8Array, n: number, what: string): void {
  if (bytes.length < n) throw new SnapPipeError('TRUNCATED', `${what}: ${bytes.length} bytes, expected ${n}`);
}

/** A NUL-terminated name in a 256-byte field, or null when no NUL ends it. */
function cName(bytes: Uint8Array, at: number): string | null {
  const field = bytes.subarray(at, at + NAME_BYTES);
  const end = field.indexOf(0);
  return end < 0 ? null : latin1.decode(field.subarray(0, end));
}

function checkMagicVersion(bytes: Uint8Array, what: string): void {
  const magic = be32(bytes, 0);
  if (magic !== MULTIFD_MAGIC) throw new SnapPipeError('BAD_STREAM', `${what}: magic ${hex(magic)}, expected ${hex(MULTIFD_MAGIC)}`);
  const version = be32(bytes, 4);
  if (version !== MULTIFD_VERSION) {
    throw new SnapPipeError('UNSUPPORTED', `${what}: version ${version} (snap-pipe knows version 1, QEMU 4.0 to 10.2)`);
  }
}

/**
 * The first 64 bytes of a multifd channel (multifd.c multifd_send_initial_packet). `channels`: how many channels
 * the source was told to open; the id must be below it (QEMU's own check, multifd_recv_initial_packet, lets
 * id == channels through).
 */
export function decodeInit(bytes: Uint8Array, channels: number): MultifdInit {
  need(bytes, MULTIFD_INIT_BYTES, 'multifd channel init');
  checkMagicVersion(bytes, 'multifd channel init');
  const channelId = bytes[24];
  if (channelId >= channels) {
    throw new SnapPipeError('BAD_STREAM', `multifd channel init: channel id ${channelId}, expected below ${channels} (multifd-channels)`);
  }
  return { uuid: bytes.slice(8, 24), channelId };
}

/** What the compression bits name, for the line that refuses them. */
function compressionName(bits: number): string {
  const known = COMPRESSION_NAMES.find(([v]) => v === bits);
  return known ? `${known[1]} compression (multifd-compression=${known[1]})` : `an unknown compression method (${bits})`;
}

/**
 * The 12-byte header every packet starts with (multifd.c multifd_recv_unfill_packet_header): says which packet
 * follows and how many bytes its fixed part takes. Refuses compression and flags `wire` does not know.
 */
export function decodePacketHeader(bytes: Uint8Array, wire: MultifdWire): MultifdPacketHeader {
  need(bytes, MULTIFD_HEADER_BYTES, 'multifd packet header');
  checkMagicVersion(bytes, 'multifd packet');
  const flags = be32(bytes, 8);
  const known = MULTIFD_FLAG_SYNC | COMPRESSION_MASK | (wire.deviceState ? MULTIFD_FLAG_DEVICE_STATE : 0);
  if ((flags & ~known) !== 0) {
    throw new SnapPipeError('UNSUPPORTED', `multifd packet flags ${hex(flags)}: bits ${hex((flags & ~known) >>> 0)} unknown to the ${wire.label} wire`);
  }
  const compression = (flags & COMPRESSION_MASK) >>> COMPRESSION_SHIFT;
  if (compression !== 0) throw new SnapPipeError('UNSUPPORTED', `multifd packet with ${compressionName(compression)}: snap-pipe takes uncompressed multifd only`);
  const deviceState = (flags & MULTIFD_FLAG_DEVICE_STATE) !== 0;
  const sync = (flags & MULTIFD_FLAG_SYNC) !== 0;
  if (deviceState && sync) throw new SnapPipeError('BAD_STREAM', 'multifd device-state packet with the SYNC flag (QEMU never sends one)');
  return deviceState
    ? { kind: 'device-state', flags, sync, packetBytes: MULTIFD_DEVICE_STATE_PACKET_BYTES }
    : { kind: 'ram', flags, sync, packetBytes: MULTIFD_RAM_PACKET_BYTES };
}

/** The page counts of a RAM packet, each checked before use (multifd-nocomp.c multifd_ram_unfill_packet). */
function ramCounts(bytes: Uint8Array, wire: MultifdWire, sync: boolean): { pagesAlloc: number; normalPages: number; zeroPages: number } {
  const pagesAlloc = be32(bytes, RAM_PAGES_ALLOC_AT);
  if (pagesAlloc > MULTIFD_PAGES_MAX) {
    throw new SnapPipeError('BAD_STREAM', `multifd packet: pages_alloc ${pagesAlloc}, at most ${MULTIFD_PAGES_MAX} (512 KiB of 4 KiB pages)`);
  }
  const normalPages = be32(bytes, RAM_NORMAL_AT);
  if (normalPages > pagesAlloc) throw new SnapPipeError('BAD_STREAM', `multifd packet: ${normalPages} data pages, more than pages_alloc ${pagesAlloc}`);
  const zeroPages = be32(bytes, RAM_ZERO_AT);
  if (zeroPages !== 0 && !wire.zeroPages) {
    throw new SnapPipeError('BAD_STREAM', `multifd packet: zero_pages ${zeroPages} in a field the ${wire.label} wire keeps zero`);
  }
  if (zeroPages > pagesAlloc - normalPages) {
    throw new SnapPipeError('BAD_STREAM', `multifd packet: ${zeroPages} zero pages, more than the ${pagesAlloc - normalPages} pages_alloc leaves`);
  }
  if (sync && !wire.syncCarriesPages && normalPages + zeroPages > 0) {
    throw new SnapPipeError('BAD_STREAM', `multifd SYNC packet with ${normalPages + zeroPages} pages (the ${wire.label} wire sends SYNC alone)`);
  }
  return { pagesAlloc, normalPages, zeroPages };
}

/** `count` page offsets from the packet's offset array: page-aligned and below 16 TiB. */
function pageOffsets(bytes: Uint8Array, count: number): number[] {
  const offsets: number[] = [];
  for (let i = 0; i < count; i++) {
    const offset = be64(bytes, RAM_OFFSETS_AT + 8 * i);
    if (offset === null || offset >= OFFSET_BYTES_MAX || offset % PAGE_BYTES !== 0) {
      const shown = offset === null ? 'of 2^53 or more' : String(offset);
      throw new SnapPipeError('BAD_STREAM', `multifd packet: page ${i}'s offset ${shown} is not a 4 KiB page below 16 TiB`);
    }
    offsets.push(offset);
  }
  return offsets;
}

/**
 * A RAM packet's fixed part (MULTIFD_RAM_PACKET_BYTES, header included), as decodePacketHeader announced it. The
 * block name and offsets are read only when the packet names pages; the caller checks the offsets against the
 * block's length, which only the main channel's RAM setup knows.
 */
export function decodeRamPacket(bytes: Uint8Array, wire: MultifdWire): MultifdRamPacket {
  need(bytes, MULTIFD_RAM_PACKET_BYTES, 'multifd RAM packet');
  const header = decodePacketHeader(bytes, wire);
  if (header.kind !== 'ram') throw new SnapPipeError('BAD_STREAM', 'multifd packet: a device-state packet where a RAM packet was announced');
  const { pagesAlloc, normalPages, zeroPages } = ramCounts(bytes, wire, header.sync);
  // The data is normalPages pages whatever next_packet_size says (multifd-nocomp.c multifd_nocomp_recv reads
  // normal_num pages): QEMU before 9.0 leaves the previous packet's size in a packet without pages.
  const dataBytes = normalPages * PAGE_BYTES;
  const nextPacketSize = be32(bytes, RAM_NEXT_SIZE_AT);
  if (normalPages > 0 && nextPacketSize !== dataBytes) {
    throw new SnapPipeError('BAD_STREAM', `multifd packet: next_packet_size ${nextPacketSize} for ${normalPages} data pages (expected ${dataBytes})`);
  }
  const packetNum = be64(bytes, RAM_PACKET_NUM_AT);
  if (packetNum === null) throw new SnapPipeError('BAD_STREAM', 'multifd packet: packet_num of 2^53 or more');
  const pages = normalPages + zeroPages;
  let block = '';
  if (pages > 0) {
    const name = cName(bytes, RAM_BLOCK_AT);
    if (name === null || name === '') throw new SnapPipeError('BAD_STREAM', `multifd packet: ${pages} pages but ${name === null ? 'an unterminated' : 'no'} block name`);
    block = name;
  }
  return { flags: header.flags, sync: header.sync, packetNum, pagesAlloc, normalPages, zeroPages, block, offsets: pageOffsets(bytes, pages), dataBytes };
}

/** A device-state packet's fixed part (QEMU 10.0+: multifd.c multifd_recv_unfill_packet_device_state). */
export function decodeDeviceStatePacket(bytes: Uint8Array, wire: MultifdWire): MultifdDeviceStatePacket {
  need(bytes, MULTIFD_DEVICE_STATE_PACKET_BYTES, 'multifd device-state packet');
  const header = decodePacketHeader(bytes, wire);
  if (header.kind !== 'device-state') throw new SnapPipeError('BAD_STREAM', 'multifd packet: a RAM packet where a device-state packet was announced');
  const idstr = cName(bytes, MULTIFD_HEADER_BYTES);
  if (idstr === null || idstr === '') throw new SnapPipeError('BAD_STREAM', `multifd device-state packet: ${idstr === null ? 'an unterminated' : 'no'} device name`);
  const dataBytes = be32(bytes, 272);
  // multifd.c multifd_recv_thread: "received empty device state packet"
  if (dataBytes === 0 || dataBytes > MULTIFD_DEVICE_STATE_DATA_BYTES_MAX) {
    throw new SnapPipeError('BAD_STREAM', `multifd device-state packet for '${idstr}': ${dataBytes} bytes of state, expected 1 to ${MULTIFD_DEVICE_STATE_DATA_BYTES_MAX}`);
  }
  return { idstr, instanceId: be32(bytes, 268), dataBytes };
}

// Encoding, for `load --connect` (snap-pipe as a multifd source). The same layouts as above; the fields a destination
// checks are filled as QEMU's sender fills them (multifd.c multifd_send_initial_packet, multifd_send_fill_packet;
// multifd-nocomp.c multifd_ram_fill_packet).

function put32(b: Uint8Array, at: number, v: number): void {
  b[at] = v >>> 24;
  b[at + 1] = (v >>> 16) & 0xff;
  b[at + 2] = (v >>> 8) & 0xff;
  b[at + 3] = v & 0xff;
}

function put64(b: Uint8Array, at: number, v: number): void {
  put32(b, at, Math.floor(v / 0x1_0000_0000));
  put32(b, at + 4, v >>> 0);
}

/**
 * A channel's init message. The uuid is all zeros: a destination compares it with its own qemu_uuid, zero unless it
 * was started with -uuid (multifd.c multifd_recv_initial_packet, "received uuid ... and expected uuid").
 */
export function encodeMultifdInit(channelId: number): Uint8Array {
  if (!Number.isInteger(channelId) || channelId < 0 || channelId > 255) throw new RangeError(`channel id ${channelId}`);
  const b = new Uint8Array(MULTIFD_INIT_BYTES);
  put32(b, 0, MULTIFD_MAGIC);
  put32(b, 4, MULTIFD_VERSION);
  b[24] = channelId;
  return b;
}

export interface RamPacketFields {
  sync: boolean;
  packetNum: number;
  /** The block's idstr as its stream bytes (latin1), at most 255 bytes. */
  block: Uint8Array;
  /** Byte offsets of the data pages in the block, at most MULTIFD_PAGES_MAX; their 4 KiB follow the fixed part. */
  offsets: ArrayLike<number>;
  count: number;
}

/**
 * A RAM packet's fixed part (MULTIFD_RAM_PACKET_BYTES) for `count` data pages and no zero pages, pages_alloc 128
 * as every QEMU sends it (a SYNC packet alone: no pages, no block name, next_packet_size 0).
 */
export function encodeRamPacketFixed(f: RamPacketFields, into = new Uint8Array(MULTIFD_RAM_PACKET_BYTES)): Uint8Array {
  if (f.count < 0 || f.count > MULTIFD_PAGES_MAX) throw new RangeError(`${f.count} pages in one multifd packet`);
  if (f.block.length > NAME_BYTES - 1) throw new RangeError('a block name of more than 255 bytes');
  into.fill(0);
  put32(into, 0, MULTIFD_MAGIC);
  put32(into, 4, MULTIFD_VERSION);
  put32(into, 8, f.sync ? MULTIFD_FLAG_SYNC : 0);
  put32(into, RAM_PAGES_ALLOC_AT, MULTIFD_PAGES_MAX);
  put32(into, RAM_NORMAL_AT, f.count);
  put32(into, RAM_NEXT_SIZE_AT, f.count * PAGE_BYTES);
  put64(into, RAM_PACKET_NUM_AT, f.packetNum);
  if (f.count > 0) into.set(f.block, RAM_BLOCK_AT);
  for (let i = 0; i < f.count; i++) put64(into, RAM_OFFSETS_AT + 8 * i, f.offsets[i]);
  return into;
}
