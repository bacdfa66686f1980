// `snap-pipe load --connect unix:PATH --multifd-channels N`: the stream as a multifd source sends it, for a QEMU
// waiting in `migrate_incoming "unix:PATH"` with the multifd capability and multifd-channels N. The main channel
// carries what it carries in a QEMU migration: header and configuration, ram START, the zero pages (as ZERO
// records: every QEMU destination takes them on the main channel, ram.c ram_load_precopy), ram END, the switch-over
// commands and the device state. The data pages go in multifd packets of up to 128 pages, one block each, to the
// channels in turn, written from the cluster's memory. Sync points: every one the main channel marks is preceded by
// a SYNC packet on every channel (the destination's main thread waits at it for each channel's SYNC:
// multifd.c multifd_recv_sync_main), and all data pages are sent before ram END's sync point.
//
// How the destination marks sync points follows from the machine type it runs (a destination runs the image's):
// 8.1 and later default to MULTIFD_FLUSH records (multifd-flush-after-each-section off), older ones to the EOS of
// every RAM section (hw_compat_8_0 turns the property on; QEMU 7.2 knows nothing else).
import assert from 'node:assert/strict';
import type { WriteWords } from '../output.js';
import { writevAll } from './pipe.js';
import { type SnapshotMeta } from '../format/image/types.js';
import { PAGE_BYTES } from '../format/units.js';
import { encodeMultifdInit, encodeRamPacketFixed, MULTIFD_PAGES_MAX, MULTIFD_RAM_PACKET_BYTES } from '../format/stream/multifd.js';
import { RAM_MULTIFD_FLUSH } from '../format/stream/constants.js';
import { machineTypeAtLeast } from '../format/stream/parser.js';
import { StreamBuilder, type StreamEncoder } from '../format/stream/encoder.js';

/** A block's idstr: its length is one byte in the stream. */
const NAME_BYTES_MAX = 255;

export type SyncBy = 'flush' | 'eos';

/** The sync records a destination running `machineType` expects (see the top of this file). */
export function syncByMachineType(machineType: string): SyncBy {
  // An unversioned name is taken as today's default.
  return (machineTypeAtLeast(machineType, 8, 1) ?? true) ? 'flush' : 'eos';
}

const WORDS: WriteWords = {
  stalled: 'writing a multifd channel',
  closed: 'QEMU closed a multifd channel before the stream was complete (EPIPE); the incoming migration failed on its side',
  failed: 'writing a multifd channel',
};

/** The multifd channels' side of a load: packets to each channel's socket in turn, SYNC packets on all. */
export class MultifdSender {
  /** QEMU's packet_num: one counter over all channels. */
  private packetNum = 0;
  private next = 0;
  private readonly fixed = new Uint8Array(MULTIFD_RAM_PACKET_BYTES);
  private readonly offsets = new Float64Array(MULTIFD_PAGES_MAX);
  private readonly blockNames: Uint8Array[];
  bytesOut = 0;
  packets = 0;
  writeMs = 0;
  writeCalls = 0;

  constructor(
    private readonly fds: number[],
    meta: SnapshotMeta,
  ) {
    // The bytes the main channel's records name the block with: the one encoder's latin1 (which refuses a name it
    // cannot write as it was read, instead of sending another block's name).
    this.blockNames = meta.blocks.map((b) => new StreamBuilder(NAME_BYTES_MAX).latin1(b.id).build());
  }

  /** Each channel's init message, before anything else on it. */
  open(): void {
    this.fds.forEach((fd, c) => this.write(fd, [encodeMultifdInit(c)]));
  }

  /** A SYNC packet on every channel: a main-channel sync record may follow. */
  sync(): void {
    for (const fd of this.fds) this.packet(fd, true, 0, 0, []);
  }

  /**
   * The data pages `pages[0, count)` (page indices in block `block`) of the cluster whose first page is `firstPage`,
   * from the cluster's memory, in packets of up to 128 pages.
   */
  pages(block: number, cluster: Uint8Array, firstPage: number, pages: Int32Array, count: number): void {
    for (let done = 0; done < count; ) {
      const n = Math.min(MULTIFD_PAGES_MAX, count - done);
      const pieces: Uint8Array[] = [];
      for (let i = 0; i < n; i++) {
        const p = pages[done + i];
        const at = (p - firstPage) * PAGE_BYTES;
        assert(at >= 0 && at + PAGE_BYTES <= cluster.length, 'a data page outside its cluster');
        this.offsets[i] = p * PAGE_BYTES;
        pieces.push(cluster.subarray(at, at + PAGE_BYTES));
      }
      const fd = this.fds[this.next];
      this.next = (this.next + 1) % this.fds.length;
      this.packet(fd, false, block, n, pieces);
      done += n;
    }
  }

  private packet(fd: number, sync: boolean, block: number, count: number, pages: Uint8Array[]): void {
    const fixed = encodeRamPacketFixed({ sync, packetNum: this.packetNum++, block: this.blockNames[block], offsets: this.offsets, count }, this.fixed);
    this.write(fd, [fixed, ...pages]);
    this.packets++;
  }

  private write(fd: number, pieces: Uint8Array[]): void {
    const t0 = performance.now();
    const total = pieces.reduce((n, p) => n + p.length, 0);
    this.writeCalls += writevAll(fd, pieces, total, WORDS);
    this.bytesOut += total;
    this.writeMs += performance.now() - t0;
  }
}

/** ram START as stored, with a MULTIFD_FLUSH before its EOS (its last 13 bytes: EOS and the section footer). */
export function ramSetupWithFlush(out: StreamEncoder, ramSetup: Uint8Array): void {
  const tail = 8 + 5;
  out.verbatim(ramSetup.subarray(0, ramSetup.length - tail));
  out.be64(RAM_MULTIFD_FLUSH);
  out.verbatim(ramSetup.subarray(ramSetup.length - tail));
}
