// The COMMAND sections load --postcopy sends, playing QEMU's migration source, each as QEMU 7.2 to 10.2 write it.
// Every command is framed by savevm.c qemu_savevm_command_send:
//
//   u8 0x08 (QEMU_VM_COMMAND), be16 command (enum qemu_vm_cmd), be16 payload length, payload
//
// and the destination checks each command's length against savevm.c mig_cmd_args[] (loadvm_process_command).
// The switch-over commands (SWITCHOVER_START) are replayed verbatim from the image, not encoded here.
import { SnapPipeError } from '../../errors.js';
import { PAGE_BYTES } from '../units.js';
import {
  CMD_OPEN_RETURN_PATH,
  CMD_PACKAGED,
  CMD_PING,
  CMD_POSTCOPY_ADVISE,
  CMD_POSTCOPY_LISTEN,
  CMD_POSTCOPY_RAM_DISCARD,
  CMD_POSTCOPY_RUN,
  SEC_EOF,
} from './constants.js';
import { StreamBuilder } from './encoder.js';
import { vmdescStart } from './parser.js';

/** postcopy-ram.c MAX_DISCARDS_PER_COMMAND: ranges in one POSTCOPY_RAM_DISCARD. */
export const DISCARDS_PER_COMMAND = 12;
/** savevm.c MAX_VM_CMD_PACKAGED_SIZE (UINT32_MAX in 7.2): bytes in one PACKAGED. */
export const PACKAGED_BYTES_MAX = 0xffff_ffff;

/** Bytes built with the one encoder (commands are small: one 256-byte buffer, grown only past it). */
function piece(build: (b: StreamBuilder) => StreamBuilder): Uint8Array {
  return build(new StreamBuilder(256)).build();
}

function command(cmd: number, payload?: Uint8Array): Uint8Array {
  return piece((b) => b.command(cmd, payload));
}

/**
 * OPEN_RETURN_PATH (1), no payload: the destination opens its return path and writes to it from then on
 * (savevm.c qemu_savevm_send_open_return_path; destination: loadvm_process_command).
 */
export function openReturnPathCommand(): Uint8Array {
  return command(CMD_OPEN_RETURN_PATH);
}

/** PING (2), be32 value: the destination answers PONG with that value (savevm.c qemu_savevm_send_ping). */
export function pingCommand(value: number): Uint8Array {
  return command(CMD_PING, piece((b) => b.be32(value)));
}

/**
 * POSTCOPY_ADVISE (3), be64 page-size summary (ram.c ram_pagesize_summary: plain RAM blocks only, so 4 KiB), be64
 * target page size: the destination checks both and wipes all of RAM (savevm.c qemu_savevm_send_postcopy_advise;
 * destination: loadvm_postcopy_handle_advise).
 */
export function adviseCommand(): Uint8Array {
  return command(CMD_POSTCOPY_ADVISE, piece((b) => b.be64(PAGE_BYTES).be64(PAGE_BYTES)));
}

/**
 * POSTCOPY_LISTEN (4), no payload: the destination starts its listen thread and may ask for pages from here on
 * (savevm.c qemu_savevm_send_postcopy_listen; destination: loadvm_postcopy_handle_listen).
 */
export function listenCommand(): Uint8Array {
  return command(CMD_POSTCOPY_LISTEN);
}

/** POSTCOPY_RUN (5), no payload: the destination starts the guest (savevm.c qemu_savevm_send_postcopy_run). */
export function runCommand(): Uint8Array {
  return command(CMD_POSTCOPY_RUN);
}

/**
 * POSTCOPY_RAM_DISCARD (6): u8 version 0, str8 block name, u8 0, then 1 to DISCARDS_PER_COMMAND ranges of
 * (be64 start, be64 length) in bytes of the block: the destination drops those pages, which will come again
 * (savevm.c qemu_savevm_send_postcopy_ram_discard; ranges per command: postcopy-ram.c
 * postcopy_discard_send_range; destination: loadvm_postcopy_ram_handle_discard).
 */
export function discardCommand(block: string, ranges: [number, number][]): Uint8Array {
  if (ranges.length < 1 || ranges.length > DISCARDS_PER_COMMAND) throw new RangeError(`${ranges.length} discard ranges`);
  const p = new StreamBuilder(256).u8(0).str8(block).u8(0);
  for (const [start, len] of ranges) p.be64(start).be64(len);
  return command(CMD_POSTCOPY_RAM_DISCARD, p.build());
}

/**
 * PACKAGED (7), be32 length; that many bytes of nested stream follow the command (not in its payload). The
 * destination reads them whole, then loads them as a stream of their own (savevm.c qemu_savevm_send_packaged;
 * destination: loadvm_handle_cmd_packaged).
 */
export function packagedCommand(packageBytes: number): Uint8Array {
  if (packageBytes > PACKAGED_BYTES_MAX) throw new RangeError(`package of ${packageBytes} bytes`);
  return command(CMD_PACKAGED, piece((b) => b.be32(packageBytes)));
}

/**
 * The package QEMU's postcopy_start (migration.c) sends in PACKAGED: LISTEN, the device sections, PING `ping`
 * (its PONG says the devices are loaded), RUN. `deviceSections` must stop before the saved EOF (deviceSectionsEnd).
 */
export function postcopyPackage(deviceSections: Uint8Array, ping: number): Uint8Array {
  const parts = [listenCommand(), deviceSections, pingCommand(ping), runCommand()];
  const pkg = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
  let at = 0;
  for (const part of parts) {
    pkg.set(part, at);
    at += part.length;
  }
  return pkg;
}

/**
 * Where the device sections of a saved device state end: the offset of its trailing EOF (which, with the
 * VMDESCRIPTION after it, must not go into the package: the nested loader would stop at EOF before RUN).
 */
export function deviceSectionsEnd(dev: Uint8Array): number {
  const n = dev.length;
  const k = vmdescStart(dev);
  if (k >= 0) return k;
  if (n > 0 && dev[n - 1] === SEC_EOF) return n - 1; // VM description suppressed
  throw new SnapPipeError('BAD_IMAGE', 'device state does not end with EOF (and a VM description)');
}
