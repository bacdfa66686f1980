// The save pipeline's shared memory, declared once. Every field names its single writer; the other side waits on it.
// Counters are free-running, wrapping at 2^32 in Int32 slots, masked by power-of-two sizes. Input ring and descriptor
// positions are also kept as int32 in JavaScript (`| 0`, distances `(a - b) | 0`; ring/input.ts says why).
// Hot fields sit 64 bytes (16 Int32 slots) apart so two threads never share a cache line.

import { MULTIFD_CHANNELS_MAX } from '../../format/stream/multifd.js';

const LINE = 16; // Int32 slots per 64-byte cache line

export const CTRL = {
  /** Set to a non-zero reason by whichever thread fails first (any writer; first wins via compareExchange). */
  FAILED: 0 * LINE,
  /** Input ring: bytes read from stdin into the ring. Writer: reader. */
  IN_WRITTEN: 1 * LINE,
  /** Input ring: bytes the reader may overwrite again. Writer: coalescer. */
  IN_RELEASED: 2 * LINE,
  /** Descriptor ring: descriptors published. Writer: reader. */
  DESC_HEAD: 3 * LINE,
  /** Descriptor ring: descriptors consumed. Writer: coalescer. */
  DESC_TAIL: 4 * LINE,
  /** Filled-chunk queue: slot numbers published for writing. Writer: coalescer. */
  FILL_HEAD: 5 * LINE,
  /** Filled-chunk queue: consumed. Writer: writer. */
  FILL_TAIL: 6 * LINE,
  /** Free-slot queue: slot numbers handed back (starts at the slot count). Writer: writer. */
  FREE_HEAD: 7 * LINE,
  /** Free-slot queue: consumed. Writer: coalescer. */
  FREE_TAIL: 8 * LINE,
  /** RAM block table: number of blocks, valid once a SETUP descriptor is published. Writer: reader. */
  BLOCK_COUNT: 9 * LINE,
  /**
   * QEMU's return path (its return-path capability): RP_NONE, RP_OPEN once the stream's OPEN_RETURN_PATH was read,
   * RP_OPEN_ACK when the machine type also says the source knows SWITCHOVER_ACK (8.1 or later). Writer: reader; the
   * main thread, which owns stdout, answers on it.
   */
  RETURN_PATH: 10 * LINE,
  /** PING commands read so far, and the value of the last one (answered with PONGs). Writer: reader. */
  PINGS: 11 * LINE,
  PING_VALUE: 11 * LINE + 1,
  /** 1 once the reader is past the RAM, in the device state (the stream's last part). Writer: reader. */
  IN_DEVICE_STATE: 12 * LINE,
  /** 1 once the block table and the block names are filled in (multifd channel readers wait for it). Writer: reader. */
  SETUP_DONE: 13 * LINE,
  /**
   * Bumped by every lane's reader each time it publishes descriptors: the coalescer, reading several lanes (multifd),
   * waits on this one field for any of them. Writers: every reader.
   */
  DESC_BELL: 14 * LINE,
} as const;
/** Where the multifd channels' lanes begin (see channelLane). */
const CHANNEL_LANES_AT = 15 * LINE;

/**
 * One producer-consumer path from a reader to the coalescer: an input ring and a descriptor ring, and the four
 * counters that guard them. The main stream is lane MAIN_LANE; each multifd channel (save --listen with
 * --multifd-channels) has its own, fed by its own reader stage. All counters live in CTRL's array, so every wait
 * on them still sees FAILED.
 */
export interface Lane {
  /** Bytes read into the lane's input ring. Writer: the lane's reader. */
  readonly inWritten: number;
  /** Input bytes the reader may overwrite again. Writer: coalescer. */
  readonly inReleased: number;
  /** Descriptors published. Writer: the lane's reader. */
  readonly descHead: number;
  /** Descriptors consumed. Writer: coalescer. */
  readonly descTail: number;
}
export const MAIN_LANE: Lane = { inWritten: CTRL.IN_WRITTEN, inReleased: CTRL.IN_RELEASED, descHead: CTRL.DESC_HEAD, descTail: CTRL.DESC_TAIL };

/** Multifd channels a save takes at most: lanes after the main one. */
export const MAX_CHANNELS = MULTIFD_CHANNELS_MAX;

/** The lane of multifd channel `c` (0 <= c < MAX_CHANNELS). */
export function channelLane(c: number): Lane {
  if (!Number.isInteger(c) || c < 0 || c >= MAX_CHANNELS) throw new RangeError(`multifd channel ${c} is not in [0, ${MAX_CHANNELS})`);
  const at = CHANNEL_LANES_AT + c * 4 * LINE;
  return { inWritten: at, inReleased: at + LINE, descHead: at + 2 * LINE, descTail: at + 3 * LINE };
}
export const CTRL_INTS = CHANNEL_LANES_AT + MAX_CHANNELS * 4 * LINE;
/** Every index a thread may wait on: each field starts a cache line (signalFailure wakes them all). */
export const CTRL_LINE = LINE;

/** RETURN_PATH values. */
export const RP_NONE = 0;
export const RP_OPEN = 1;
export const RP_OPEN_ACK = 2;

/** FAILED reasons. */
export const FAIL_NONE = 0;
export const FAIL_ERROR = 1;
export const FAIL_ABORT = 2;

/** Descriptor ring records: 4 Int32 each. Writer: reader. */
export const DESC_INTS = 4;
export const DESC_KIND = 0;
export const DESC_BLOCK = 1;
export const DESC_PAGE = 2;
export const DESC_POS = 3; // input ring position (int32, unmasked) of the page data, or the release position

export const KIND_PAGE = 1; // data page at DESC_POS in the input ring
export const KIND_ZERO = 2; // zero page
export const KIND_RELEASE = 3; // the reader no longer needs input bytes before DESC_POS
export const KIND_SETUP = 4; // the block table is filled in
export const KIND_END = 5; // the stream ended cleanly; no more descriptors
/**
 * A multifd sync point (save --listen with multifd): on the main lane, the main channel's MULTIFD_FLUSH or EOS that
 * pairs with one SYNC packet on every channel; on a channel's lane, after the pages of its SYNC packet. Every page
 * before a lane's k-th SYNC was sent before every page after any lane's k-th SYNC (see stages/coalescer.ts).
 */
export const KIND_SYNC = 6;

/** Block table (Float64 entries): page count and first virtual cluster of each block. Writer: reader. */
export const BLOCK_F64S = 2;
export const BLOCK_PAGES = 0;
export const BLOCK_VIRT_CLUSTER = 1;
export const MAX_BLOCKS = 1024;
/**
 * Block names (multifd packets name their block), as the parser decoded them: per block, a length and up to 255
 * UTF-16 code units (the stream gives a name's length in one byte). Writer: reader.
 */
export const BLOCK_NAME_UNITS = 256;

/** Per-slot chunk header (Int32 entries): what the coalescer put in the slot. Writer: coalescer, before publishing. */
export const SLOT_INTS = 24;
export const SLOT_BLOCK = 0;
export const SLOT_CHUNK = 1;
export const SLOT_VIRT_CLUSTER = 2;
export const SLOT_PAGES_IN_CHUNK = 3;
export const SLOT_SEEN_COUNT = 4;
/** 1 when this is the chunk's first publication (its cluster is new), else 0. */
export const SLOT_FIRST = 5;
/**
 * First publication: CRC-32C of the cluster, computed by the coalescer while the slot is in its cache. Later
 * publication: CRC-32C of a cluster holding only the pages carried as data (zeros elsewhere), from which the writer
 * updates the cluster's CRC (see Coalescer.publishSlot and SLOT_CRC_UPDATE).
 */
export const SLOT_CRC = 6;
/**
 * 1: write the whole 1 MiB slot (every page not carried is zero-filled). 0: write only the runs of carried pages
 * (SLOT_SEEN_BITS; those carried as zero pages are zero-filled). Only a first publication is ever written whole.
 */
export const SLOT_WHOLE = 7;
export const SLOT_SEEN_BITS = 8; // 8 Int32 = 256 bits: pages of this chunk carried by this publication (data or zero)
/**
 * Later publication: 1 when every page it carries reads as zeros on disk before this write (never written, or last
 * written as zeros), so new CRC = old CRC ^ CRC(zero cluster) ^ SLOT_CRC. 0 when some carried page holds data on
 * disk: the writer first reads the carried pages' old content O (zeros elsewhere), then writes, and new CRC =
 * old CRC ^ CRC(O) ^ SLOT_CRC.
 */
export const SLOT_CRC_UPDATE = 16;

/** Value pushed on the filled queue after the last chunk. */
export const END_OF_CHUNKS = -1;

export interface SaveRingSizes {
  /** 1 MiB chunk slots (at least 4). */
  slotCount: number;
  /** Input ring bytes (a power of two, at least 64 KiB). */
  inputBytes: number;
  /** Descriptor ring records (a power of two). */
  descCount: number;
  /** Park pool entries (4 KiB pages, the coalescer's own memory) for pages that arrive far ahead of their chunk. */
  parkPages: number;
  /**
   * The writer's 1 MiB units for the old content of pages a publication overwrites (read before the write, for the
   * cluster's checksum; see SLOT_CRC_UPDATE).
   */
  oldContentUnits: number;
  /** Multifd channels (0: one stream), each with an input ring of inputBytes and a descriptor ring of descCount. */
  channels: number;
}

/** Everything the save stages share, allocated once by the main thread before any stage starts. */
export interface SaveShared {
  sizes: SaveRingSizes;
  ctrl: SharedArrayBuffer; // Int32[CTRL_INTS]
  desc: SharedArrayBuffer; // Int32[descCount * DESC_INTS]
  fillQueue: SharedArrayBuffer; // Int32[queueEntries(slotCount)]: a power of two, at least slotCount
  freeQueue: SharedArrayBuffer; // Int32[queueEntries(slotCount)]
  slotHeaders: SharedArrayBuffer; // Int32[slotCount * SLOT_INTS]
  blocks: SharedArrayBuffer; // Float64[MAX_BLOCKS * BLOCK_F64S]
  blockNames: SharedArrayBuffer; // Uint16[MAX_BLOCKS * BLOCK_NAME_UNITS]: length, then the name's code units
  /** Int32[channels * descCount * DESC_INTS]: each multifd channel's descriptor ring, one after another. */
  channelDesc: SharedArrayBuffer;
  /** Float64[channels]: bytes of each multifd channel's packets read so far (whole packets). Writer: that channel. */
  channelBytes: SharedArrayBuffer;
  /**
   * Page-aligned: chunk slots (slotCount MiB), the input ring, the park pool, the writer's old-content units, then
   * each multifd channel's input ring (inputBytes each).
   */
  data: SharedArrayBuffer;
}

export const SLOT_BYTES = 1 << 20;

export function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
}
