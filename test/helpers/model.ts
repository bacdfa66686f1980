// Builds migration streams from a list of page operations and keeps the RAM they should leave behind, so tests can
// check an image against what the stream meant (the last record of each page wins).
import { StreamBuilder } from '../../src/format/stream/encoder.js';
import { CMD_SWITCHOVER_START, RAM_MEM_SIZE, RAM_MULTIFD_FLUSH, RAM_VERSION, SEC_START } from '../../src/format/stream/constants.js';
import { SWITCHOVER_START_BYTES } from '../../src/format/stream/switchover.js';

export interface BlockSpec {
  id: string;
  lengthBytes: number;
}

/** A pc guest's block list in miniature: a 24 MiB pc.ram and three small ROM-like blocks of odd sizes. */
export const SMALL_PC_BLOCKS: BlockSpec[] = [
  { id: 'pc.ram', lengthBytes: 24 << 20 },
  { id: '/rom@etc/acpi/tables', lengthBytes: 128 << 10 },
  { id: 'pc.bios', lengthBytes: 256 << 10 },
  { id: '/rom@etc/acpi/rsdp', lengthBytes: 4096 },
];

export type Op = { kind: 'page'; block: number; page: number; seed: number } | { kind: 'zero'; block: number; page: number };

export interface ModelStream {
  bytes: Uint8Array;
  blocks: BlockSpec[];
  /** Final content of each block. */
  ram: Uint8Array[];
  sent: boolean[][];
  data: boolean[][];
  deviceState: Uint8Array;
  /** The SWITCHOVER_START command QEMU 10 sends before the ram END (empty without switchoverStart). */
  switchoverCommands: Uint8Array;
}

/** Deterministic page content; never all zeros. */
export function pageContent(seed: number): Uint8Array {
  const p = new Uint8Array(4096);
  let x = (seed * 2654435761 + 12345) >>> 0;
  for (let i = 0; i < 4096; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    p[i] = x & 0xff;
    p[i + 1] = (x >>> 8) & 0xff;
    p[i + 2] = (x >>> 16) & 0xff;
    p[i + 3] = (x >>> 24) & 0xff;
  }
  p[0] = 1;
  return p;
}

export interface BuildOptions {
  /** Records per ram PART section. */
  perSection?: number;
  ramEnd?: boolean;
  machineType?: string;
  deviceBytes?: number;
  /** As QEMU 10.0+ does: a SWITCHOVER_START command after the last PART, before the ram END and the device state. */
  switchoverStart?: boolean;
  /**
   * As QEMU 8.1.0-8.1.2 do without multifd: a bare MULTIFD_FLUSH record (be64 0x200) in the ram START before its
   * EOS, at the end of every PART, and in the ram END.
   */
  bareFlushes?: boolean;
}

export function buildStream(blocks: BlockSpec[], ops: Op[], opts: BuildOptions = {}): ModelStream {
  const perSection = opts.perSection ?? 1000;
  const b = new StreamBuilder().header().configuration(opts.machineType ?? 'pc-i440fx-7.2');
  const RAM_ID = 2;
  const flush = () => opts.bareFlushes && b.be64(RAM_MULTIFD_FLUSH);
  if (opts.bareFlushes) {
    b.sectionStart(SEC_START, RAM_ID, 'ram', 0, RAM_VERSION).be64(blocks.reduce((n, x) => n + x.lengthBytes, 0) + RAM_MEM_SIZE);
    for (const x of blocks) b.str8(x.id).be64(x.lengthBytes);
    flush();
    b.ramEos(RAM_ID);
  } else {
    b.ramSetup(RAM_ID, blocks);
  }
  const ram = blocks.map((bl) => new Uint8Array(bl.lengthBytes));
  const sent = blocks.map((bl) => new Array<boolean>(bl.lengthBytes / 4096).fill(false));
  const data = blocks.map((bl) => new Array<boolean>(bl.lengthBytes / 4096).fill(false));
  for (let i = 0; i < ops.length; i += perSection) {
    b.ramPart(RAM_ID);
    for (const op of ops.slice(i, i + perSection)) {
      const off = op.page * 4096;
      sent[op.block][op.page] = true;
      if (op.kind === 'page') {
        const content = pageContent(op.seed);
        b.page(blocks[op.block].id, off, content);
        ram[op.block].set(content, off);
        data[op.block][op.page] = true;
      } else {
        b.zero(blocks[op.block].id, off);
        ram[op.block].fill(0, off, off + 4096);
        data[op.block][op.page] = false;
      }
    }
    flush();
    b.ramEos(RAM_ID);
  }
  if (opts.switchoverStart) b.command(CMD_SWITCHOVER_START);
  if (opts.ramEnd) {
    b.ramEnd(RAM_ID);
    flush();
    b.ramEos(RAM_ID);
  }
  const dev = new Uint8Array(opts.deviceBytes ?? 3000).map((_, i) => (i * 13) & 0xff);
  const devStart = b.build().length;
  b.device(3, 'timer', dev.subarray(0, dev.length >> 1)).device(4, 'cpu', dev.subarray(dev.length >> 1)).eof();
  const bytes = b.build();
  const switchoverCommands = opts.switchoverStart ? SWITCHOVER_START_BYTES : new Uint8Array(0);
  return { bytes, blocks, ram, sent, data, deviceState: bytes.slice(devStart), switchoverCommands };
}

/** Every page of every block once, ascending; every `zeroEvery`-th page a zero record. */
export function sequentialOps(blocks: BlockSpec[], zeroEvery = 7, seedBase = 0): Op[] {
  const ops: Op[] = [];
  blocks.forEach((bl, block) => {
    for (let page = 0; page < bl.lengthBytes / 4096; page++) {
      ops.push(page % zeroEvery === 0 ? { kind: 'zero', block, page } : { kind: 'page', block, page, seed: seedBase + block * 1e6 + page });
    }
  });
  return ops;
}

/** A small deterministic PRNG for tests (mulberry32). */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Background-snapshot-like order: ascending, but now and then a page from further ahead is sent early (as when
 * the guest writes it), and not again when the walk reaches it. */
export function pulledForward(ops: Op[], share: number, seed: number): Op[] {
  const r = rng(seed);
  const done = new Uint8Array(ops.length);
  const out: Op[] = [];
  for (let i = 0; i < ops.length; i++) {
    if (r() < share && i + 1 < ops.length) {
      const j = i + 1 + Math.floor(r() * (ops.length - i - 1));
      if (!done[j]) {
        done[j] = 1;
        out.push(ops[j]);
      }
    }
    if (!done[i]) {
      done[i] = 1;
      out.push(ops[i]);
    }
  }
  return out;
}
