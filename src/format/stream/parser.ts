// Pull parser for QEMU's migration stream (format version 3, as QEMU 7.2 to 10.x write it without xbzrle,
// compression, multifd or postcopy). It walks the input ring, hands every RAM page to the sink by position (page
// data is never copied here), and keeps the non-RAM parts verbatim: the header and configuration, the RAM setup
// section, the commands QEMU sends among the RAM sections at switch-over (QEMU 10's SWITCHOVER_START), and
// everything from the first device-state section to the end of the stream.
import { SnapPipeError } from '../../errors.js';
import { PAGE_BITS, PAGE_BYTES } from '../units.js';
import { isJsonText } from './json.js';
import type { StreamSource } from './source.js';
import type { StreamParts } from './parts.js';
import { SWITCHOVER_COMMANDS_MAX, SWITCHOVER_START_BYTES } from './switchover.js';
import { VmdescEnd } from './vmdesc-end.js';
import {
  CAP_IGNORE_SHARED,
  CMD_OPEN_RETURN_PATH,
  CMD_PING,
  CMD_SWITCHOVER_START,
  QEVM_MAGIC,
  QEVM_VERSION,
  RAM_COMPRESS_PAGE,
  RAM_CONTINUE,
  RAM_EOS,
  RAM_FLAGS_MASK,
  RAM_HOOK,
  RAM_IDSTR,
  RAM_MEM_SIZE,
  RAM_MULTIFD_FLUSH,
  RAM_PAGE,
  RAM_VERSION,
  RAM_XBZRLE,
  RAM_ZERO,
  SEC_COMMAND,
  SEC_CONFIGURATION,
  SEC_END,
  SEC_EOF,
  SEC_FOOTER,
  SEC_FULL,
  SEC_PART,
  SEC_START,
  SEC_SUBSECTION,
  SEC_VMDESCRIPTION,
  sectionTypeName,
  SUB_CAPABILITIES,
  SUB_TARGET_PAGE_BITS,
  SUB_UUID,
} from './constants.js';

export interface ParsedBlock {
  id: string;
  lengthBytes: number;
  addr?: number;
}

/** Receives the RAM content in stream order. */
export interface StreamSink {
  setup(blocks: ParsedBlock[]): void;
  /** A data page: PAGE_BYTES at input ring position ringPos (u32, unmasked; may wrap the ring's end). */
  page(block: number, page: number, ringPos: number): void;
  zero(block: number, page: number): void;
  /**
   * QEMU opened its return path (only with `acceptReturnPath`); `switchoverAck`: the machine type says the source
   * knows SWITCHOVER_ACK (8.1 or later).
   */
  returnPathOpened?(switchoverAck: boolean): void;
  /** A PING on the return path, to be answered with a PONG of the same value. */
  ping?(value: number): void;
  /** The RAM is over; the device state begins. */
  deviceState?(): void;
  /**
   * A multifd sync point (only with `multifd`): every multifd channel sent one SYNC packet for it, and every page a
   * channel sent before that SYNC precedes every page sent after this point, on any channel.
   */
  sync?(): void;
}

export interface ParserOptions {
  /**
   * Accept QEMU's return path (OPEN_RETURN_PATH, PING): the stream then ends with its VM description, not with the
   * end of input (QEMU keeps the pipe open until the answer). Without it those commands are refused.
   */
  acceptReturnPath?: boolean;
  /**
   * This is the main channel of a multifd migration: pages also travel on the multifd channels, and the main channel
   * marks sync points (see the sink's sync and syncPoints below).
   */
  multifd?: boolean;
}

export interface ParsedStream extends StreamParts {
  uuid?: Uint8Array;
  /** The device state ends with EOF + VMDESCRIPTION (false: the source suppressed the VM description). */
  vmdescPresent: boolean;
  /** Bare MULTIFD_FLUSH records skipped (QEMU 8.1.0-8.1.2 without multifd). */
  bareFlushes: number;
  blocks: ParsedBlock[];
  streamBytes: number;
  ramSections: number;
  /** The source opened its return path. */
  returnPath: boolean;
  /**
   * With `multifd`: the sync points the main channel marked, and by which record: 'flush' (QEMU 8.1+: a
   * MULTIFD_FLUSH record) or 'eos' (QEMU up to 8.0, and 8.1+ with multifd-flush-after-each-section: the EOS of
   * every RAM section). See syncPoints.
   */
  multifdSyncs?: { count: number; by: 'flush' | 'eos' };
}

const decoder = new TextDecoder('latin1');
/** The one device QEMU saves early (vmstate early_setup) as of 10.2: hw/virtio/virtio-mem.c. */
const EARLY_SETUP_SECTION_SUFFIX = 'virtio-mem-device-early';
const TWO_32 = 0x1_0000_0000;

/**
 * Limits on what a RAM setup may announce, refused here with one line rather than later as an allocation failure in
 * a worker. Pages travel from reader to coalescer as Int32 page indices (save/ring/descriptors.ts), so a block holds
 * at most 2^31 pages (8 TiB). The total bounds what a save allocates up front from the setup alone: the
 * coalescer's two page bitmaps per block (1 GiB at 16 TiB, within a typed array's limit) and the writer's
 * per-cluster table (2^24 clusters, far below the image's 2^31 virtual clusters). 16 TiB is far past the guests
 * snap-pipe is for, while a damaged length (2^50, a stray 64-bit value) is far past 16 TiB.
 */
export const BLOCK_PAGES_MAX = 2 ** 31;
export const RAM_TOTAL_BYTES_MAX = 2 ** 44;

const UNSUPPORTED_RAM_FLAGS: [number, string][] = [
  [RAM_XBZRLE, 'xbzrle'],
  [RAM_COMPRESS_PAGE, 'compress'],
  [RAM_HOOK, 'rdma'],
  [RAM_MULTIFD_FLUSH, 'multifd'],
];

export class StreamParser {
  private readonly parts = new Uint32Array(2);
  private blocks: ParsedBlock[] = [];
  private blockPages: number[] = [];
  private blockIndex = new Map<string, number>();
  private lastBlock = -1;
  private ramSectionId = -1;
  private ignoreShared = false;
  /** Where, in the captured ram START (after its type byte), QEMU 8.1's bare MULTIFD_FLUSH records sit. */
  private setupFlushAt: number[] = [];
  private setupCaptureAt = 0;
  private bareFlushes = 0;
  private machineType = '';
  private returnPath = false;
  private pings = 0;
  /** With `multifd`: how the main channel marks sync points, once its ram START told (see syncPoint). */
  private syncBy: 'flush' | 'eos' | undefined;
  private syncs = 0;

  constructor(
    private readonly ring: StreamSource,
    private readonly sink: StreamSink,
    private readonly opts: ParserOptions = {},
  ) {}

  private bad(what: string, at = this.ring.consumedBytes): SnapPipeError {
    return new SnapPipeError('BAD_STREAM', `${what} at byte ${at}`);
  }

  private unsupported(what: string, at = this.ring.consumedBytes): SnapPipeError {
    return new SnapPipeError('UNSUPPORTED', `${what} at byte ${at}`);
  }

  parse(): ParsedStream {
    const r = this.ring;
    const { head, machineType, capabilities, uuid } = this.parseHead();
    const ram = this.parseRamSections();
    const devAt = r.consumedBytes;
    this.sink.deviceState?.();
    const deviceState = this.returnPath ? this.takeToVmdescEnd() : r.takeRest();
    const vmdescPresent = checkDeviceStateEnd(deviceState, devAt);
    return {
      machineType,
      capabilities,
      uuid,
      ramSectionId: this.ramSectionId,
      ramVersionId: ram.versionId,
      head,
      ramSetup: ram.setup,
      switchoverCommands: concatAll(ram.switchover),
      deviceState,
      vmdescPresent,
      sawRamEnd: ram.sawEnd,
      bareFlushes: this.bareFlushes,
      returnPath: this.returnPath,
      multifdSyncs: this.opts.multifd ? { count: this.syncs, by: this.syncBy ?? 'eos' } : undefined,
      blocks: this.blocks,
      streamBytes: r.consumedBytes,
      ramSections: ram.sections,
    };
  }

  /** The file magic and version, and the configuration section if there is one: kept verbatim as the head. */
  private parseHead(): { head: Uint8Array; machineType: string; capabilities: string[]; uuid?: Uint8Array } {
    const r = this.ring;
    if (!r.ensure(1)) throw new SnapPipeError('TRUNCATED', 'the stream is empty (the source sent nothing)');
    r.startCapture();
    const magic = r.be32('file magic');
    if (magic !== QEVM_MAGIC) {
      throw this.bad(`not a QEMU migration stream (magic 0x${magic.toString(16).padStart(8, '0')}, expected QEVM)`, 0);
    }
    const version = r.be32('file version');
    if (version !== QEVM_VERSION) throw this.unsupported(`migration stream version ${version} (snap-pipe reads 3)`, 4);
    let machineType = '';
    let capabilities: string[] = [];
    let uuid: Uint8Array | undefined;
    if (r.peekU8('first section') === SEC_CONFIGURATION) {
      ({ machineType, capabilities, uuid } = this.parseConfiguration());
    }
    this.ignoreShared = capabilities.includes(CAP_IGNORE_SHARED);
    this.machineType = machineType;
    return { head: r.endCapture(), machineType, capabilities, uuid };
  }

  /**
   * The RAM part: sections up to the first device-state section (FULL) or EOF. Only the RAM section may be
   * iterable; commands among its sections are skipped or kept as switch-over commands (see command()).
   */
  private parseRamSections(): { setup: Uint8Array; versionId: number; sawEnd: boolean; sections: number; switchover: Uint8Array[] } {
    const r = this.ring;
    let setup: Uint8Array | undefined;
    let sawEnd = false;
    let sections = 0;
    const switchover: Uint8Array[] = [];
    for (;;) {
      const at = r.consumedBytes;
      if (!r.ensure(1)) {
        throw new SnapPipeError('TRUNCATED', `stream ended at byte ${at} before the device state (QEMU stopped sending)`);
      }
      const type = r.peekU8('section type');
      if (type === SEC_FULL) this.refuseEarlyDeviceSection(at);
      if (type === SEC_FULL || type === SEC_EOF) break; // device state from here on
      r.u8('section type');
      if (type === SEC_START) {
        setup = this.parseRamSetup(at, setup !== undefined);
        sections++;
      } else if (type === SEC_PART || type === SEC_END) {
        const id = r.be32('section id');
        if (!setup || id !== this.ramSectionId) {
          throw this.unsupported(`${sectionTypeName(type)} of section ${id}, which is not the RAM section`, at);
        }
        this.parseRamRecords(false);
        this.footer(id);
        if (type === SEC_END) sawEnd = true;
        sections++;
      } else if (type === SEC_COMMAND) {
        if (!this.command(at)) continue;
        if (!setup) throw this.bad('a SWITCHOVER_START command before the RAM setup', at);
        if (switchover.length === SWITCHOVER_COMMANDS_MAX) throw this.bad(`more than ${SWITCHOVER_COMMANDS_MAX} switch-over commands`, at);
        switchover.push(SWITCHOVER_START_BYTES);
      } else if (type === SEC_CONFIGURATION) {
        throw this.bad('a configuration section after the first section', at);
      } else {
        throw this.bad(`unknown section type ${sectionTypeName(type)}`, at);
      }
    }
    if (!setup) throw this.bad('device state before any RAM section (no ram START)');
    return { setup, versionId: RAM_VERSION, sawEnd, sections, switchover };
  }

  /**
   * The ram START section after its type byte: its header, then the RAM setup records (block list), kept verbatim
   * (with the setup's bare MULTIFD_FLUSH records left out) as the image's RAM setup.
   */
  private parseRamSetup(at: number, second: boolean): Uint8Array {
    const r = this.ring;
    r.startCapture();
    this.setupCaptureAt = r.consumedBytes;
    const id = this.ramStartHeader(at, second);
    this.ramSectionId = id;
    this.parseRamRecords(true);
    this.footer(id);
    return concatType(SEC_START, withoutRecords(r.endCapture(), this.setupFlushAt));
  }

  /** A START section's header: only one ram START (not `second`) of RAM_VERSION is accepted. Returns its id. */
  private ramStartHeader(at: number, second: boolean): number {
    const r = this.ring;
    const id = r.be32('section id');
    const idstr = decoder.decode(r.take(r.u8('section name length'), 'section name'));
    r.be32('instance id');
    const versionId = r.be32('version id');
    if (idstr !== RAM_IDSTR) {
      throw this.unsupported(`iterable section ${shown(idstr)} (snap-pipe stores RAM only; disable block migration and dirty-bitmaps)`, at);
    }
    if (second) throw this.bad('a second ram START section', at);
    if (versionId !== RAM_VERSION) throw this.unsupported(`ram section version ${versionId} (expected ${RAM_VERSION})`, at);
    return id;
  }

  private parseConfiguration(): { machineType: string; capabilities: string[]; uuid?: Uint8Array } {
    const r = this.ring;
    r.u8('configuration');
    const len = r.be32('machine type length');
    if (len > 256) throw this.bad(`machine type name of ${len} bytes`);
    const machineType = decoder.decode(r.take(len, 'machine type'));
    const capabilities: string[] = [];
    let uuid: Uint8Array | undefined;
    while (r.ensure(1) && r.peekU8('subsection') === SEC_SUBSECTION) {
      const at = r.consumedBytes;
      r.u8('subsection');
      const name = decoder.decode(r.take(r.u8('subsection name length'), 'subsection name'));
      r.be32('subsection version');
      if (name === SUB_TARGET_PAGE_BITS) {
        const bits = r.be32('target page bits');
        if (bits !== PAGE_BITS) throw this.unsupported(`target page size of ${2 ** bits} bytes (snap-pipe supports 4096)`, at);
      } else if (name === SUB_CAPABILITIES) {
        const count = r.be32('capability count');
        if (count > 64) throw this.bad(`${count} capabilities in the configuration`, at);
        for (let i = 0; i < count; i++) {
          capabilities.push(decoder.decode(r.take(r.u8('capability name length'), 'capability name')));
        }
      } else if (name === SUB_UUID) {
        uuid = r.take(16, 'uuid');
      } else {
        throw this.unsupported(`configuration subsection ${shown(name)}`, at);
      }
    }
    return { machineType, capabilities, uuid };
  }

  /**
   * A COMMAND section. SWITCHOVER_START (QEMU 10.0+, no payload) is kept for load to replay: returns true. With
   * `acceptReturnPath`, OPEN_RETURN_PATH and PING go to the sink (false). Every other command belongs to a
   * capability whose stream snap-pipe cannot store (savevm.c qemu_savevm_command_send's callers: postcopy and
   * dirty-bitmaps, COLO, postcopy recovery). QEMU sends those right after the configuration (migration.c
   * migration_thread), so they are refused before the first RAM byte.
   */
  private command(at: number): boolean {
    const r = this.ring;
    const cmd = r.be16('command');
    const len = r.be16('command length');
    if (this.opts.acceptReturnPath && (cmd === CMD_OPEN_RETURN_PATH || cmd === CMD_PING)) {
      this.returnPathCommand(cmd, len, at);
      return false;
    }
    if (cmd !== CMD_SWITCHOVER_START) throw this.unsupported(refusedCommand(cmd, len), at);
    if (len !== 0) throw this.bad(`a SWITCHOVER_START command with a ${len}-byte payload (QEMU sends none)`, at);
    return true;
  }

  /** OPEN_RETURN_PATH (no payload), then PINGs (be32): savevm.c qemu_savevm_send_open_return_path, _send_ping. */
  private returnPathCommand(cmd: number, len: number, at: number): void {
    if (cmd === CMD_OPEN_RETURN_PATH) {
      if (len !== 0) throw this.bad(`an OPEN_RETURN_PATH command with a ${len}-byte payload (QEMU sends none)`, at);
      if (this.returnPath) throw this.bad('a second OPEN_RETURN_PATH command', at);
      this.returnPath = true;
      this.sink.returnPathOpened?.(knowsSwitchoverAck(this.machineType));
      return;
    }
    if (len !== 4) throw this.bad(`a PING command with a ${len}-byte payload (QEMU sends 4)`, at);
    if (!this.returnPath) throw this.bad('a PING command before the return path was opened', at);
    if (++this.pings > PINGS_MAX) throw this.bad(`more than ${PINGS_MAX} PING commands`, at);
    this.sink.ping?.(this.ring.be32('PING value'));
  }

  /** The device state up to the end of its VM description, read while the input stays open (a return path). */
  private takeToVmdescEnd(): Uint8Array {
    const end = new VmdescEnd();
    this.ring.consumeUntil((piece) => end.push(piece));
    return end.bytes;
  }

  /**
   * QEMU 8.0+ saves the state of devices marked early_setup (virtio-mem) during the RAM setup, so a FULL section
   * `.../virtio-mem-device-early` comes before the RAM pages (savevm.c qemu_savevm_state_setup; hw/virtio/virtio-mem.c
   * vmstate_virtio_mem_device_early; machine types up to 7.2 turn it off: hw_compat_7_2 x-early-migration). Taking
   * it as the start of the device state would bury the RAM that follows in the verbatim tail: refuse it instead.
   */
  private refuseEarlyDeviceSection(at: number): void {
    const head = this.ring.peek(6, 'device section header');
    const name = decoder.decode(this.ring.peek(6 + head[5], 'device section name').subarray(6));
    if (name.endsWith(EARLY_SETUP_SECTION_SUFFIX)) {
      throw this.unsupported(
        `the device section ${shown(name)} before the RAM pages: QEMU sends a virtio-mem device's state early (QEMU 8.0+, machine types from 8.0), which snap-pipe cannot store yet`,
        at,
      );
    }
  }

  private footer(id: number): void {
    const r = this.ring;
    const at = r.consumedBytes;
    const t = r.u8('section footer');
    if (t !== SEC_FOOTER) {
      throw this.bad(
        `expected a section footer, found ${sectionTypeName(t)} (sources with send-section-footer=off, the default of machine types up to 2.3, send none; snap-pipe needs them)`,
        at,
      );
    }
    const fid = r.be32('footer section id');
    if (fid !== id) throw this.bad(`section footer for section ${fid} closes section ${id}`, at);
  }

  /** RAM records up to and including EOS. */
  private parseRamRecords(isSetup: boolean): void {
    const r = this.ring;
    const parts = this.parts;
    for (;;) {
      const at = r.consumedBytes;
      r.be64Parts('RAM record', parts);
      const flags = parts[1] & RAM_FLAGS_MASK;
      if (flags === RAM_EOS) {
        if (this.opts.multifd) this.sectionEnd(isSetup);
        return;
      }
      if (parts[0] === 0 && parts[1] === RAM_MULTIFD_FLUSH && this.opts.multifd) {
        if (isSetup) this.setupFlushAt.push(at - this.setupCaptureAt);
        this.flush(at);
        continue;
      }
      if (parts[0] === 0 && parts[1] === RAM_MULTIFD_FLUSH) {
        // QEMU 8.1.0-8.1.2 write a bare MULTIFD_FLUSH even without multifd (ram.c ram_save_setup, find_dirty_block,
        // ram_save_complete; fixed in 8.1.3 and 8.2 by "Non multifd migration don't care about multifd flushes").
        // It carries nothing and changes no page or block: skip it, and keep it out of the stored RAM setup (a
        // QEMU 7.2 destination fails on it: ram.c ram_load_precopy, "Unknown combination of migration flags").
        if (isSetup) this.setupFlushAt.push(at - this.setupCaptureAt);
        this.bareFlushes++;
        continue;
      }
      if (flags & RAM_MEM_SIZE) {
        if (!isSetup || this.blocks.length > 0) throw this.bad('RAM block list outside the RAM setup', at);
        this.parseBlockList(parts[0] * TWO_32 + (parts[1] - flags), at);
        continue;
      }
      for (const [flag, name] of UNSUPPORTED_RAM_FLAGS) {
        if (flags & flag) throw this.unsupported(`RAM record with the ${name} flag (0x${flags.toString(16)}): disable ${name}`, at);
      }
      const kind = flags & ~RAM_CONTINUE;
      if (kind !== RAM_PAGE && kind !== RAM_ZERO) throw this.bad(`RAM record with unknown flags 0x${flags.toString(16)}`, at);
      if (this.blocks.length === 0) throw this.bad('RAM page before the RAM block list', at);
      if (isSetup) throw this.unsupported('RAM page inside the RAM setup section', at);
      let block = this.lastBlock;
      if (flags & RAM_CONTINUE) {
        if (block < 0) throw this.bad('RAM record continues a block but none was named', at);
      } else {
        const name = decoder.decode(r.take(r.u8('block name length'), 'block name'));
        const b = this.blockIndex.get(name);
        if (b === undefined) throw this.bad(`page for RAM block ${shown(name)}, which the setup never named`, at);
        block = this.lastBlock = b;
      }
      const offsetBytes = parts[0] * TWO_32 + (parts[1] - flags);
      const page = offsetBytes / PAGE_BYTES;
      if (page >= this.blockPages[block]) {
        throw this.bad(`page at offset ${offsetBytes} beyond RAM block ${shown(this.blocks[block].id)} (${this.blocks[block].lengthBytes} bytes)`, at);
      }
      if (kind === RAM_PAGE) {
        const pos = r.skipInPlace(PAGE_BYTES, 'page data');
        this.sink.page(block, page, pos);
      } else {
        const fill = r.u8('zero page fill byte');
        if (fill !== 0) throw this.unsupported(`zero-page record with fill byte ${fill}`, at);
        this.sink.zero(block, page);
      }
    }
  }

  /**
   * Multifd sync points (QEMU source: the destination's ram.c ram_load_precopy calls multifd_recv_sync_main at each).
   * QEMU 8.1+ writes MULTIFD_FLUSH: once in ram START, then each time its dirty-page scan wraps (ram.c
   * ram_save_setup, find_dirty_block; multifd-nocomp.c multifd_ram_flush_and_sync, which writes it only after every
   * channel sent its SYNC). Up to 8.0, and 8.1+ with multifd-flush-after-each-section=on, every RAM section's EOS is
   * one (7.2 ram.c ram_save_setup, ram_save_iterate, ram_save_complete: multifd_send_sync_main, then EOS). Both
   * sources sync in ram START, so its end tells which: a FLUSH before it, or none.
   */
  private flush(at: number): void {
    if (this.syncBy === 'eos') throw this.bad('a MULTIFD_FLUSH record in a stream whose RAM setup marked its sync points by EOS', at);
    this.syncBy = 'flush';
    this.syncs++;
    this.sink.sync?.();
  }

  private sectionEnd(isSetup: boolean): void {
    if (isSetup && this.syncBy === undefined) this.syncBy = 'eos';
    if (this.syncBy !== 'eos') return;
    this.syncs++;
    this.sink.sync?.();
  }

  private parseBlockList(totalBytes: number, totalAt: number): void {
    const r = this.ring;
    if (totalBytes > RAM_TOTAL_BYTES_MAX) {
      throw this.unsupported(`a RAM setup announcing ${totalBytes} bytes of RAM (snap-pipe handles up to 16 TiB; a damaged stream?)`, totalAt);
    }
    let remaining = totalBytes;
    while (remaining > 0) {
      const at = r.consumedBytes;
      const id = decoder.decode(r.take(r.u8('block name length'), 'block name'));
      r.be64Parts('block length', this.parts);
      const lengthBytes = this.parts[0] * TWO_32 + this.parts[1];
      const block: ParsedBlock = { id, lengthBytes };
      if (this.ignoreShared) {
        r.be64Parts('block address', this.parts);
        block.addr = this.parts[0] * TWO_32 + this.parts[1];
      }
      if (lengthBytes === 0 || lengthBytes % PAGE_BYTES !== 0) throw this.bad(`RAM block ${shown(id)} of ${lengthBytes} bytes`, at);
      if (lengthBytes > remaining) {
        throw this.bad(`RAM block sizes add up to more than the announced total of ${totalBytes} bytes`, at);
      }
      if (lengthBytes / PAGE_BYTES > BLOCK_PAGES_MAX) {
        throw this.unsupported(`RAM block ${shown(id)} of ${lengthBytes} bytes (snap-pipe handles blocks of up to 2^31 pages, 8 TiB)`, at);
      }
      if (this.blockIndex.has(id)) throw this.bad(`RAM block ${shown(id)} named twice`, at);
      this.blockIndex.set(id, this.blocks.length);
      this.blocks.push(block);
      this.blockPages.push(lengthBytes / PAGE_BYTES);
      remaining -= lengthBytes;
    }
    this.sink.setup(this.blocks);
  }
}

/**
 * A name read from the stream, for an error message: quoted, non-printable bytes escaped (a damaged stream must not
 * break the message's one line or write control characters to a terminal), cut to a readable length.
 */
export function shown(name: string): string {
  const NAME_CHARS_MAX = 64;
  let out = '';
  for (let i = 0; i < name.length && i < NAME_CHARS_MAX; i++) {
    const c = name.charCodeAt(i);
    out += c >= 0x20 && c < 0x7f && c !== 0x27 && c !== 0x5c ? name[i] : `\\x${c.toString(16).padStart(2, '0')}`;
  }
  return `'${out}${name.length > NAME_CHARS_MAX ? `...' (${name.length} bytes)` : "'"}`;
}

/** QEMU sends one PING after opening the return path in precopy (migration.c migration_thread); a few more pass. */
const PINGS_MAX = 16;

/**
 * A machine type's version says the QEMU running it is at least that new (pc-q35-8.1 runs only on 8.1 or later), and
 * what its compat properties default to. Unversioned or unknown names: undefined.
 */
export function machineTypeAtLeast(machineType: string, major: number, minor: number): boolean | undefined {
  const m = /-(\d+)\.(\d+)$/.exec(machineType);
  if (!m) return undefined;
  const v = Number(m[1]);
  return v > major || (v === major && Number(m[2]) >= minor);
}

/** The machine type runs only on a QEMU that knows SWITCHOVER_ACK (8.1, return-path message 7). Unknown: false. */
export function knowsSwitchoverAck(machineType: string): boolean {
  return machineTypeAtLeast(machineType, 8, 1) ?? false;
}

/** Why a command other than SWITCHOVER_START cannot be stored: the capability that makes QEMU send it. */
function refusedCommand(cmd: number, len: number): string {
  const what =
    cmd === 1 || cmd === 2
      ? 'the return-path capability (OPEN_RETURN_PATH/PING), which this reader of the stream does not accept'
      : cmd === 3 && len === 0
        ? 'the dirty-bitmaps capability (a POSTCOPY_ADVISE without postcopy-ram): snap-pipe stores RAM only; turn dirty-bitmaps off'
      : cmd >= 3 && cmd <= 7
        ? 'the postcopy-ram capability: snap-pipe save needs plain precopy or background-snapshot; turn postcopy-ram off'
        : cmd === 8
          ? 'COLO (x-colo): turn x-colo off'
          : cmd === 9 || cmd === 10
            ? 'postcopy recovery: snap-pipe save needs plain precopy or background-snapshot'
            : 'a command snap-pipe does not know (a QEMU newer than snap-pipe?)';
  return `a migration command (${cmd}) from ${what}`;
}

function concatAll(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** `bytes` without the 8-byte records that start at each of `offsets` (ascending). */
function withoutRecords(bytes: Uint8Array, offsets: number[]): Uint8Array {
  if (offsets.length === 0) return bytes;
  const keep: Uint8Array[] = [];
  let from = 0;
  for (const at of offsets) {
    keep.push(bytes.subarray(from, at));
    from = at + 8;
  }
  keep.push(bytes.subarray(from));
  return concatAll(keep);
}

function concatType(type: number, rest: Uint8Array): Uint8Array {
  const out = new Uint8Array(rest.length + 1);
  out[0] = type;
  out.set(rest, 1);
  return out;
}

/**
 * Where the trailing EOF of a device state may lie, latest first: the positions k with EOF, VMDESCRIPTION and a be32
 * length that runs exactly to the end. At most 6, whatever the input: the JSON after a true start holds no 0x00
 * byte (a NUL is no JSON token and not allowed raw inside a JSON string), while the EOF byte at k is 0x00 (SEC_EOF),
 * so the last 0x00 of the device state lies in [k, k + 5] (the VMDESCRIPTION byte and the length bytes may be zero).
 * Looking at the 6 positions ending there, and only there, is linear in the device state instead of trying every
 * EOF + VMDESCRIPTION pair in it, which a device state built to hold many (each with a length that runs to the end)
 * made quadratic: minutes for a few hundred KiB.
 */
export function vmdescCandidates(dev: Uint8Array): number[] {
  const n = dev.length;
  const lastNul = dev.lastIndexOf(SEC_EOF);
  const out: number[] = [];
  for (let k = Math.min(lastNul, n - 6); k >= 0 && k >= lastNul - 5; k--) {
    if (dev[k] !== SEC_EOF || dev[k + 1] !== SEC_VMDESCRIPTION) continue;
    const len = ((dev[k + 2] << 24) | (dev[k + 3] << 16) | (dev[k + 4] << 8) | dev[k + 5]) >>> 0;
    if (len === n - k - 6) out.push(k);
  }
  return out;
}

/**
 * Where the trailing EOF of a device state lies when VMDESCRIPTION + be32 length + JSON follow it and fill the rest
 * exactly (the JSON must be valid); -1 if the device state does not end that way. The latest such position, as when
 * every position was tried (see vmdescCandidates); each candidate's JSON is checked once, in one pass.
 */
export function vmdescStart(dev: Uint8Array): number {
  for (const k of vmdescCandidates(dev)) if (isJsonText(dev.subarray(k + 6))) return k;
  return -1;
}

/**
 * The device state ends with EOF, then (unless the machine suppresses it) VMDESCRIPTION + be32 length + JSON.
 * A stream cut short inside the device state cannot end that way, so this is what tells a finished save from
 * an interrupted one.
 */
export function checkDeviceStateEnd(dev: Uint8Array, at: number): boolean {
  const n = dev.length;
  if (vmdescStart(dev) >= 0) return true;
  // No VM description (the machine suppresses it): the stream has section footers (its RAM sections did), so a
  // whole device state is just EOF, or ends with the last FULL section's footer and EOF. A stream cut short almost
  // never ends that way by chance (a cut merely ending in a zero byte used to pass).
  if (n === 1 && dev[0] === SEC_EOF) return false;
  if (n >= 7 && dev[n - 1] === SEC_EOF && dev[n - 6] === SEC_FOOTER && !looksLikeVmdescStart(dev)) {
    const id = ((dev[n - 5] << 24) | (dev[n - 4] << 16) | (dev[n - 3] << 8) | dev[n - 2]) >>> 0;
    if (hasFullSectionStart(dev, id, n - 6)) return false;
  }
  throw new SnapPipeError(
    'TRUNCATED',
    `the device state (from byte ${at}, ${n} bytes) does not end with EOF and a VM description: the stream was cut short`,
  );
}

/** A FULL section header for section `id` starts somewhere before `end`. */
function hasFullSectionStart(dev: Uint8Array, id: number, end: number): boolean {
  for (let k = 0; k + 5 <= end; k++) {
    if (dev[k] === SEC_FULL && ((dev[k + 1] << 24) | (dev[k + 2] << 16) | (dev[k + 3] << 8) | dev[k + 4]) >>> 0 === id) return true;
  }
  return false;
}

function looksLikeVmdescStart(dev: Uint8Array): boolean {
  // A VM description JSON always starts '{"page_size"'; if one is present but did not parse, the stream is damaged.
  const needle = new TextEncoder().encode('{"page_size"');
  outer: for (let i = 0; i + needle.length <= dev.length; i++) {
    for (let j = 0; j < needle.length; j++) if (dev[i + j] !== needle[j]) continue outer;
    return true;
  }
  return false;
}
