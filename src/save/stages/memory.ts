// Typed views of the save pipeline's shared memory, built the same way in every thread.
import {
  BLOCK_F64S,
  BLOCK_NAME_UNITS,
  MAX_BLOCKS,
  CTRL_INTS,
  DESC_INTS,
  SLOT_BYTES,
  SLOT_INTS,
  type SaveRingSizes,
  type SaveShared,
} from '../ring/layout.js';
import { alignedShared } from '../../native/memory.js';
import { PAGE_BYTES } from '../../format/units.js';

export interface SaveViews {
  sizes: SaveRingSizes;
  ctrl: Int32Array;
  desc: Int32Array;
  fillQueue: Int32Array;
  freeQueue: Int32Array;
  slotHeaders: Int32Array;
  blocks: Float64Array;
  /** slotCount x 1 MiB, page aligned. */
  slots: Uint8Array;
  input: Uint8Array;
  /** The coalescer's park pool (parkPages x 4 KiB), in the same buffer so its copies batch with the others. */
  park: Uint8Array;
  /** The writer's old-content units (oldContentUnits x 1 MiB, page aligned). */
  oldContent: Uint8Array;
  blockNames: Uint16Array;
}

/** A multifd channel's rings (see Lane): its input ring and its descriptor ring. */
export interface ChannelViews {
  input: Uint8Array;
  desc: Int32Array;
}

/** Slot queues hold slot numbers: a power of two at least the slot count, so any whole number of MiB works. */
export function queueEntries(slotCount: number): number {
  let n = 1;
  while (n < slotCount) n *= 2;
  return n;
}

/**
 * Where each part lies in the one data buffer (byte offsets; every part page-aligned): the chunk slots, the main input
 * ring, the park pool, the writer's old-content units, then each multifd channel's input ring.
 */
function dataLayout(z: SaveRingSizes): { input: number; park: number; oldContent: number; channelInputs: number; total: number } {
  const input = z.slotCount * SLOT_BYTES;
  const park = input + z.inputBytes;
  const oldContent = park + z.parkPages * PAGE_BYTES;
  const channelInputs = oldContent + z.oldContentUnits * SLOT_BYTES;
  return { input, park, oldContent, channelInputs, total: channelInputs + z.channels * z.inputBytes };
}

export function allocateSave(sizes: SaveRingSizes): SaveShared {
  return {
    sizes,
    ctrl: new SharedArrayBuffer(CTRL_INTS * 4),
    desc: new SharedArrayBuffer(sizes.descCount * DESC_INTS * 4),
    fillQueue: new SharedArrayBuffer(queueEntries(sizes.slotCount) * 4),
    freeQueue: new SharedArrayBuffer(queueEntries(sizes.slotCount) * 4),
    slotHeaders: new SharedArrayBuffer(sizes.slotCount * SLOT_INTS * 4),
    blocks: new SharedArrayBuffer(MAX_BLOCKS * BLOCK_F64S * 8),
    blockNames: new SharedArrayBuffer(MAX_BLOCKS * BLOCK_NAME_UNITS * 2),
    channelDesc: new SharedArrayBuffer(sizes.channels * sizes.descCount * DESC_INTS * 4),
    channelBytes: new SharedArrayBuffer(sizes.channels * 8),
    data: alignedShared(dataLayout(sizes).total),
  };
}

/** Views of multifd channel c's rings (0 <= c < sizes.channels). */
export function channelViews(s: SaveShared, c: number): ChannelViews {
  if (!Number.isInteger(c) || c < 0 || c >= s.sizes.channels) throw new RangeError(`channel ${c} of ${s.sizes.channels}`);
  const descInts = s.sizes.descCount * DESC_INTS;
  return {
    input: new Uint8Array(s.data, dataLayout(s.sizes).channelInputs + c * s.sizes.inputBytes, s.sizes.inputBytes),
    desc: new Int32Array(s.channelDesc, c * descInts * 4, descInts),
  };
}

export function saveViews(s: SaveShared): SaveViews {
  const at = dataLayout(s.sizes);
  return {
    sizes: s.sizes,
    ctrl: new Int32Array(s.ctrl),
    desc: new Int32Array(s.desc),
    fillQueue: new Int32Array(s.fillQueue),
    freeQueue: new Int32Array(s.freeQueue),
    slotHeaders: new Int32Array(s.slotHeaders),
    blocks: new Float64Array(s.blocks),
    slots: new Uint8Array(s.data, 0, at.input),
    input: new Uint8Array(s.data, at.input, s.sizes.inputBytes),
    park: new Uint8Array(s.data, at.park, s.sizes.parkPages * PAGE_BYTES),
    oldContent: new Uint8Array(s.data, at.oldContent, s.sizes.oldContentUnits * SLOT_BYTES),
    blockNames: new Uint16Array(s.blockNames),
  };
}
