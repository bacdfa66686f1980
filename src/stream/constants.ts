// QEMU migration stream constants (QEMU 7.2: migration/savevm.c, migration/ram.c). All integers big-endian.

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
