// Pure encode/decode of SnapshotMeta. Container (all integers little-endian):
//
//   magic "SNPMETA\0" (8) | u32 formatVersion | u32 sectionCount | u64 totalBytes
//   sectionCount x { u32 tag | u32 reserved (0) | u64 lengthBytes | u32 crc32 | u32 reserved (0) | data, padded to 8 }
//
// Sections: JSON (the small scalar parts and the block table), head, ramSetup, deviceState (raw bytes),
// sent/data bitmaps and chunk CRCs (lists: u32 count, then per item u32 byteLength + bytes padded to 4), and
// switchoverCommands (raw bytes; optional: images written before QEMU 10 was supported have none).
// Every section carries its own CRC-32 (zlib). Unknown tags are skipped (an older snap-pipe skips the switch-over
// commands and loads such an image as before); each required tag must appear exactly once, an optional one at most
// once.

import assert from 'node:assert/strict';
import { crc32 } from 'node:zlib';
import { SnapPipeError } from '../../errors.js';
import { BLOCK_ID_BYTES_MAX, BLOCKS_MAX, JSON_SECTION_BYTES_MAX } from './limits.js';
import { type BlockPages, type RamBlockInfo, type SaveCounters, type SnapshotMeta } from './types.js';
import { CLUSTER_BYTES, PAGE_BYTES } from '../units.js';

const META_MAGIC = new Uint8Array([0x53, 0x4e, 0x50, 0x4d, 0x45, 0x54, 0x41, 0x00]); // "SNPMETA\0"
const CONTAINER_HEADER_BYTES = 24;
const SECTION_HEADER_BYTES = 24;
/** Bound on sections a decoder walks (known ones + room for future ones). */
const SECTION_COUNT_MAX = 64;

const MetaTag = {
  Json: 1,
  Head: 2,
  RamSetup: 3,
  DeviceState: 4,
  SentBitmaps: 5,
  DataBitmaps: 6,
  ChunkCrcs: 7,
  SwitchoverCommands: 8,
} as const;
type MetaTag = (typeof MetaTag)[keyof typeof MetaTag];

const REQUIRED_TAGS: MetaTag[] = [
  MetaTag.Json,
  MetaTag.Head,
  MetaTag.RamSetup,
  MetaTag.DeviceState,
  MetaTag.SentBitmaps,
  MetaTag.DataBitmaps,
  MetaTag.ChunkCrcs,
];

/** The scalar part of SnapshotMeta, stored as JSON. */
interface MetaJson {
  formatVersion: number;
  machineType: string;
  capabilities: string[];
  ramSectionId: number;
  ramVersionId: number;
  sawRamEnd: boolean;
  blocks: RamBlockInfo[];
  counters: SaveCounters;
  savedAt: string;
  writer: string;
}

function pad8(n: number): number {
  return Math.ceil(n / 8) * 8;
}

function pad4(n: number): number {
  return Math.ceil(n / 4) * 4;
}

export function pagesOf(block: RamBlockInfo): number {
  return Math.ceil(block.lengthBytes / PAGE_BYTES);
}

export function bitmapBytesOf(block: RamBlockInfo): number {
  return Math.ceil(pagesOf(block) / 8);
}

export function chunksOf(block: RamBlockInfo): number {
  return Math.ceil(block.lengthBytes / CLUSTER_BYTES);
}

/** A block's entry, with exactly the fields RamBlockInfo names (addr only when present). */
function blockInfo(b: RamBlockInfo): RamBlockInfo {
  const out: RamBlockInfo = { id: b.id, lengthBytes: b.lengthBytes, virtOffsetBytes: b.virtOffsetBytes };
  if (b.addr !== undefined) out.addr = b.addr;
  return out;
}

function encodeList(items: Uint8Array[]): Uint8Array {
  let total = 4;
  for (const item of items) total += 4 + pad4(item.byteLength);
  const out = new Uint8Array(total);
  const view = new DataView(out.buffer);
  view.setUint32(0, items.length, true);
  let pos = 4;
  for (const item of items) {
    view.setUint32(pos, item.byteLength, true);
    out.set(item, pos + 4);
    pos += 4 + pad4(item.byteLength);
  }
  return out;
}

function crcBytes(crcs: Uint32Array): Uint8Array {
  const out = new Uint8Array(crcs.length * 4);
  const view = new DataView(out.buffer);
  for (let i = 0; i < crcs.length; i++) view.setUint32(i * 4, crcs[i], true);
  return out;
}

function bytesOf(a: Uint8Array): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

/** Encodes SnapshotMeta. Inconsistent input (bitmap or CRC arrays shorter than the blocks need) is a programmer error. */
export function encodeMeta(meta: SnapshotMeta): Uint8Array {
  assert.equal(meta.pages.length, meta.blocks.length, 'encodeMeta: pages[] does not match blocks[]');
  assert.equal(meta.chunkCrc32c.length, meta.blocks.length, 'encodeMeta: chunkCrc32c[] does not match blocks[]');
  meta.blocks.forEach((b, i) => {
    assert(bitmapBytesOf(b) <= meta.pages[i].sent.byteLength, `encodeMeta: sent bitmap of ${b.id} too short`);
    assert(bitmapBytesOf(b) <= meta.pages[i].data.byteLength, `encodeMeta: data bitmap of ${b.id} too short`);
    assert(chunksOf(b) <= meta.chunkCrc32c[i].length, `encodeMeta: chunk CRCs of ${b.id} too short`);
  });
  const json: MetaJson = {
    formatVersion: meta.formatVersion,
    machineType: meta.machineType,
    capabilities: meta.capabilities,
    ramSectionId: meta.ramSectionId,
    ramVersionId: meta.ramVersionId,
    sawRamEnd: meta.sawRamEnd,
    blocks: meta.blocks.map(blockInfo),
    counters: { ...meta.counters },
    savedAt: meta.savedAt,
    writer: meta.writer,
  };
  const sections: [MetaTag, Uint8Array][] = [
    [MetaTag.Json, new TextEncoder().encode(JSON.stringify(json))],
    [MetaTag.Head, bytesOf(meta.head)],
    [MetaTag.RamSetup, bytesOf(meta.ramSetup)],
    [MetaTag.DeviceState, bytesOf(meta.deviceState)],
    [MetaTag.SentBitmaps, encodeList(meta.pages.map((p) => bytesOf(p.sent)))],
    [MetaTag.DataBitmaps, encodeList(meta.pages.map((p) => bytesOf(p.data)))],
    [MetaTag.ChunkCrcs, encodeList(meta.chunkCrc32c.map(crcBytes))],
    [MetaTag.SwitchoverCommands, bytesOf(meta.switchoverCommands)],
  ];
  let total = CONTAINER_HEADER_BYTES;
  for (const [, data] of sections) total += SECTION_HEADER_BYTES + pad8(data.byteLength);
  const out = new Uint8Array(total);
  const view = new DataView(out.buffer);
  out.set(META_MAGIC, 0);
  view.setUint32(8, meta.formatVersion, true);
  view.setUint32(12, sections.length, true);
  view.setBigUint64(16, BigInt(total), true);
  let pos = CONTAINER_HEADER_BYTES;
  for (const [tag, data] of sections) {
    view.setUint32(pos, tag, true);
    view.setBigUint64(pos + 8, BigInt(data.byteLength), true);
    view.setUint32(pos + 16, crc32(data), true);
    out.set(data, pos + SECTION_HEADER_BYTES);
    pos += SECTION_HEADER_BYTES + pad8(data.byteLength);
  }
  assert.equal(pos, total);
  return out;
}

function damaged(what: string): SnapPipeError {
  return new SnapPipeError('BAD_IMAGE', `metadata damaged: ${what}`);
}

function decodeList(data: Uint8Array, name: string): Uint8Array[] {
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  if (data.byteLength < 4) throw damaged(`${name} list too short`);
  const count = view.getUint32(0, true);
  // Each item takes at least 4 bytes: bounds the loop by the data.
  if (count > (data.byteLength - 4) / 4) throw damaged(`${name} list count ${count} too large`);
  const items: Uint8Array[] = [];
  let pos = 4;
  for (let i = 0; i < count; i++) {
    if (pos + 4 > data.byteLength) throw damaged(`${name} list item ${i} out of bounds`);
    const len = view.getUint32(pos, true);
    if (len > data.byteLength - pos - 4) throw damaged(`${name} list item ${i} out of bounds`);
    items.push(data.subarray(pos + 4, pos + 4 + len));
    pos += 4 + pad4(len);
  }
  if (pos !== data.byteLength) throw damaged(`${name} list has trailing bytes`);
  return items;
}

function isSafeUint(v: unknown): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
}

function checkJson(j: unknown): MetaJson {
  const o = j as Partial<MetaJson> | null;
  if (typeof o !== 'object' || o === null) throw damaged('scalar section is not an object');
  if (!isSafeUint(o.formatVersion)) throw damaged('formatVersion');
  if (typeof o.machineType !== 'string') throw damaged('machineType');
  if (!Array.isArray(o.capabilities) || !o.capabilities.every((c) => typeof c === 'string')) {
    throw damaged('capabilities');
  }
  if (!isSafeUint(o.ramSectionId) || !isSafeUint(o.ramVersionId)) throw damaged('RAM section id/version');
  if (typeof o.sawRamEnd !== 'boolean') throw damaged('sawRamEnd');
  if (typeof o.savedAt !== 'string' || typeof o.writer !== 'string') throw damaged('savedAt/writer');
  if (!Array.isArray(o.blocks)) throw damaged('block table');
  if (o.blocks.length > BLOCKS_MAX) throw damaged(`${o.blocks.length} RAM blocks (at most ${BLOCKS_MAX})`);
  for (const b of o.blocks as unknown[]) {
    const blk = b as Partial<RamBlockInfo> | null;
    if (typeof blk !== 'object' || blk === null || typeof blk.id !== 'string') throw damaged('block table entry');
    if (blk.id.length > BLOCK_ID_BYTES_MAX) throw damaged(`block name of ${blk.id.length} characters`);
    if (!isSafeUint(blk.lengthBytes) || blk.lengthBytes % PAGE_BYTES !== 0) throw damaged(`length of ${blk.id}`);
    if (!isSafeUint(blk.virtOffsetBytes) || blk.virtOffsetBytes % CLUSTER_BYTES !== 0) {
      throw damaged(`virtual offset of ${blk.id}`);
    }
    if (blk.addr !== undefined && !isSafeUint(blk.addr)) throw damaged(`addr of ${blk.id}`);
  }
  const c = o.counters as Partial<SaveCounters> | undefined;
  const counterNames: (keyof SaveCounters)[] = [
    'dataPages',
    'zeroPages',
    'resentPages',
    'streamBytes',
    'dataClusters',
    'rewrittenClusters',
  ];
  if (typeof c !== 'object' || c === null || !counterNames.every((k) => isSafeUint(c[k]))) throw damaged('counters');
  return o as MetaJson;
}

/**
 * Decodes and validates bytes written by encodeMeta; every inconsistency is BAD_IMAGE "metadata damaged: ...". The
 * byte parts of the result (verbatim stream parts, bitmaps) are views into `src`, not copies: the metadata is held
 * once (it may be as large as META_BYTES_MAX).
 */
export function decodeMeta(src: Uint8Array): SnapshotMeta {
  const found = decodeSections(src);
  const get = (tag: MetaTag): Uint8Array => found.get(tag) as Uint8Array;
  const json = decodeJson(get(MetaTag.Json));
  const { pages, chunkCrc32c } = decodePerBlock(json.blocks, get);
  return {
    formatVersion: json.formatVersion,
    machineType: json.machineType,
    capabilities: json.capabilities,
    ramSectionId: json.ramSectionId,
    ramVersionId: json.ramVersionId,
    head: get(MetaTag.Head),
    ramSetup: get(MetaTag.RamSetup),
    switchoverCommands: found.get(MetaTag.SwitchoverCommands) ?? new Uint8Array(0),
    deviceState: get(MetaTag.DeviceState),
    sawRamEnd: json.sawRamEnd,
    blocks: json.blocks.map(blockInfo),
    pages,
    chunkCrc32c,
    counters: {
      dataPages: json.counters.dataPages,
      zeroPages: json.counters.zeroPages,
      resentPages: json.counters.resentPages,
      streamBytes: json.counters.streamBytes,
      dataClusters: json.counters.dataClusters,
      rewrittenClusters: json.counters.rewrittenClusters,
    },
    savedAt: json.savedAt,
    writer: json.writer,
  };
}

/** The container's sections by tag, each checked against its CRC-32; every required one present, none repeated. */
function decodeSections(src: Uint8Array): Map<number, Uint8Array> {
  if (src.byteLength < CONTAINER_HEADER_BYTES) throw damaged('too short');
  for (let i = 0; i < META_MAGIC.length; i++) if (src[i] !== META_MAGIC[i]) throw damaged('bad magic');
  const view = new DataView(src.buffer, src.byteOffset, src.byteLength);
  const sectionCount = view.getUint32(12, true);
  const totalBytes = view.getBigUint64(16, true);
  if (totalBytes !== BigInt(src.byteLength)) throw damaged(`length ${totalBytes} != ${src.byteLength}`);
  if (sectionCount > SECTION_COUNT_MAX) throw damaged(`${sectionCount} sections`);
  const found = new Map<number, Uint8Array>();
  let pos = CONTAINER_HEADER_BYTES;
  for (let i = 0; i < sectionCount; i++) {
    if (pos + SECTION_HEADER_BYTES > src.byteLength) throw damaged(`section ${i} header out of bounds`);
    const tag = view.getUint32(pos, true);
    const lenBig = view.getBigUint64(pos + 8, true);
    const expectCrc = view.getUint32(pos + 16, true);
    const dataStart = pos + SECTION_HEADER_BYTES;
    if (lenBig > BigInt(src.byteLength - dataStart)) throw damaged(`section ${tag} out of bounds`);
    const len = Number(lenBig);
    const data = src.subarray(dataStart, dataStart + len);
    if ((crc32(data) >>> 0) !== expectCrc) throw damaged(`section ${tag} checksum mismatch`);
    if (found.has(tag)) throw damaged(`section ${tag} repeated`);
    found.set(tag, data);
    pos = dataStart + pad8(len);
  }
  if (pos !== src.byteLength) throw damaged('trailing bytes');
  for (const tag of REQUIRED_TAGS) if (!found.has(tag)) throw damaged(`section ${tag} missing`);
  return found;
}

/** The scalar section: bounded, UTF-8, JSON, and every field of the expected type. */
function decodeJson(bytes: Uint8Array): MetaJson {
  if (bytes.byteLength > JSON_SECTION_BYTES_MAX) {
    throw damaged(`scalar section of ${bytes.byteLength} bytes (at most ${JSON_SECTION_BYTES_MAX})`);
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes));
  } catch {
    throw damaged('scalar section is not JSON');
  }
  return checkJson(parsed);
}

/** Each block's bitmaps and chunk CRCs, one of each per block, none shorter than the block needs. */
function decodePerBlock(blocks: RamBlockInfo[], get: (tag: MetaTag) => Uint8Array): Pick<SnapshotMeta, 'pages' | 'chunkCrc32c'> {
  const sent = decodeList(get(MetaTag.SentBitmaps), 'sent bitmap');
  const data = decodeList(get(MetaTag.DataBitmaps), 'data bitmap');
  const crcLists = decodeList(get(MetaTag.ChunkCrcs), 'chunk CRC');
  const n = blocks.length;
  if (sent.length !== n || data.length !== n || crcLists.length !== n) throw damaged('per-block lists do not match');
  const pages: BlockPages[] = [];
  const chunkCrc32c: Uint32Array[] = [];
  for (let i = 0; i < n; i++) {
    const b = blocks[i];
    if (sent[i].byteLength < bitmapBytesOf(b) || data[i].byteLength < bitmapBytesOf(b)) {
      throw damaged(`bitmaps of ${b.id} too short`);
    }
    const raw = crcLists[i];
    if (raw.byteLength % 4 !== 0 || raw.byteLength / 4 < chunksOf(b)) throw damaged(`chunk CRCs of ${b.id}`);
    pages.push({ sent: sent[i], data: data[i] });
    chunkCrc32c.push(crcsOf(raw));
  }
  return { pages, chunkCrc32c };
}

/** Little-endian u32s (a copy: `raw` need not be 4-byte aligned). */
function crcsOf(raw: Uint8Array): Uint32Array {
  const view = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
  const crcs = new Uint32Array(raw.byteLength / 4);
  for (let k = 0; k < crcs.length; k++) crcs[k] = view.getUint32(k * 4, true);
  return crcs;
}
