// QEMU migration stream constants (migration/savevm.c, migration/ram.c of QEMU 7.2 to 10.2; docs/QEMU-VERSIONS.md
// says which version added what). All integers big-endian.

export const QEVM_MAGIC = 0x5145564d; // "QEVM"
export const QEVM_VERSION = 3;

// Section types (savevm.c QEMU_VM_*).
export const SEC_EOF = 0x00;
export const SEC_START = 0x01;
export const SEC_PART = 0x02;
export const SEC_END = 0x03;
export const SEC_FULL = 0x04;
export const SEC_SUBSECTION = 0x05;
export const SEC_VMDESCRIPTION = 0x06;
export const SEC_CONFIGURATION = 0x07;
export const SEC_COMMAND = 0x08;
export const SEC_FOOTER = 0x7e;

// COMMAND sections (savevm.c enum qemu_vm_cmd and mig_cmd_args[]: each command's payload length, -1 = variable).
export const CMD_OPEN_RETURN_PATH = 1; // len 0
export const CMD_PING = 2; // be32
export const CMD_POSTCOPY_ADVISE = 3; // 16 bytes (or 0 without postcopy-ram)
export const CMD_POSTCOPY_LISTEN = 4; // len 0
export const CMD_POSTCOPY_RUN = 5; // len 0
export const CMD_POSTCOPY_RAM_DISCARD = 6; // variable
export const CMD_PACKAGED = 7; // be32 length, then that many bytes of nested stream
export const CMD_ENABLE_COLO = 8; // len 0
export const CMD_POSTCOPY_RESUME = 9; // len 0
export const CMD_RECV_BITMAP = 10; // u8 length + block name + NUL
/**
 * QEMU 10.0+: sent with no payload after the last RAM PART and before the ram END section and the device state
 * (migration.c migration_switchover_start, savevm.c qemu_savevm_maybe_send_switchover_start), unless the
 * migration object's send-switchover-start is off (machine types up to 9.2: hw/core/machine.c hw_compat_9_2).
 * A destination runs each device's switchover_start hook on it (savevm.c loadvm_postcopy_handle_switchover_start);
 * QEMU before 10.0 fails the migration on it (unknown command).
 */
export const CMD_SWITCHOVER_START = 11;

// RAM record flags (ram.c RAM_SAVE_FLAG_*), in the low bits of each record's be64.
export const RAM_FULL = 0x01; // obsolete
export const RAM_ZERO = 0x02;
export const RAM_MEM_SIZE = 0x04;
export const RAM_PAGE = 0x08;
export const RAM_EOS = 0x10;
export const RAM_CONTINUE = 0x20;
export const RAM_XBZRLE = 0x40;
export const RAM_HOOK = 0x80;
export const RAM_COMPRESS_PAGE = 0x100;
export const RAM_MULTIFD_FLUSH = 0x200; // QEMU 8.1+
/** Flags live below the target page size; x86 pages are 4 KiB. */
export const RAM_FLAGS_MASK = 0xfff;

export const RAM_IDSTR = 'ram';
export const RAM_VERSION = 4;

export const SUB_TARGET_PAGE_BITS = 'configuration/target-page-bits';
export const SUB_CAPABILITIES = 'configuration/capabilities';
export const SUB_UUID = 'configuration/uuid';

/** Capabilities named in the configuration that change the RAM setup format. */
export const CAP_IGNORE_SHARED = 'x-ignore-shared';

export function sectionTypeName(t: number): string {
  switch (t) {
    case SEC_EOF: return 'EOF';
    case SEC_START: return 'START';
    case SEC_PART: return 'PART';
    case SEC_END: return 'END';
    case SEC_FULL: return 'FULL';
    case SEC_SUBSECTION: return 'SUBSECTION';
    case SEC_VMDESCRIPTION: return 'VMDESCRIPTION';
    case SEC_CONFIGURATION: return 'CONFIGURATION';
    case SEC_COMMAND: return 'COMMAND';
    case SEC_FOOTER: return 'FOOTER';
    default: return `0x${t.toString(16).padStart(2, '0')}`;
  }
}
