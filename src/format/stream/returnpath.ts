// QEMU's migration return path (destination -> source), as QEMU 7.2 to 10.2 write it (migration/migration.c:
// migrate_send_rp_message and its callers) and as their sources read it (source_return_path_thread). Pure: bytes in,
// messages out; nothing here does I/O.
//
// Each message: be16 type, be16 length, then `length` payload bytes. Types (enum mig_rp_message_type):
//   1 SHUT          be32: 0 = the destination finished cleanly, else it failed; nothing follows it
//   2 PONG          be32: the value of the PING it answers
//   3 REQ_PAGES_ID  be64 start (bytes into the block), be32 length (bytes), u8 name length, name
//   4 REQ_PAGES     be64 start, be32 length; the block is the one the last REQ_PAGES_ID named
//   5 RECV_BITMAP   u8 name length, name, ... (postcopy recovery only: answers MIG_CMD_RECV_BITMAP)
//   6 RESUME_ACK    be32 (postcopy recovery only: answers MIG_CMD_POSTCOPY_RESUME)
//   7 SWITCHOVER_ACK no payload (QEMU 8.1+: a destination with the switchover-ack capability sends it when the
//                   return path opens, if no device needs to approve the switch-over: savevm.c
//                   loadvm_process_command, MIG_CMD_OPEN_RETURN_PATH; migration.c migrate_send_rp_switchover_ack)
// QEMU's own source refuses type 0 or >= MAX (7 in 7.2, 8 from 8.1), a fixed-size message of another length, and
// any payload over 512 bytes.
import { SnapPipeError } from '../../errors.js';

export const RP_SHUT = 1;
export const RP_PONG = 2;
export const RP_REQ_PAGES_ID = 3;
export const RP_REQ_PAGES = 4;
export const RP_RECV_BITMAP = 5;
export const RP_RESUME_ACK = 6;
export const RP_SWITCHOVER_ACK = 7;
const RP_MAX = 8;
/** source_return_path_thread reads payloads into a 512-byte buffer and refuses longer ones. */
export const RP_PAYLOAD_BYTES_MAX = 512;

/** Payload lengths that are fixed (-1: variable). */
const FIXED_LENGTH = [-1, 4, 4, -1, 12, -1, 4, 0];
const NAMES = ['INVALID', 'SHUT', 'PONG', 'REQ_PAGES_ID', 'REQ_PAGES', 'RECV_BITMAP', 'RESUME_ACK', 'SWITCHOVER_ACK'];

export type RpMessage =
  | { type: 'shut'; status: number }
  | { type: 'pong'; value: number }
  /** `block` is the name QEMU gave (REQ_PAGES_ID) or undefined (REQ_PAGES: the last block named). */
  | { type: 'req'; block: string | undefined; startBytes: number; lengthBytes: number }
  | { type: 'recv-bitmap'; block: string }
  | { type: 'resume-ack'; value: number }
  | { type: 'switchover-ack' };

const TWO_32 = 0x1_0000_0000;
const latin1 = new TextDecoder('latin1');

function be16(b: Uint8Array, at: number): number {
  return (b[at] << 8) | b[at + 1];
}

function be32(b: Uint8Array, at: number): number {
  return ((b[at] << 24) | (b[at + 1] << 16) | (b[at + 2] << 8) | b[at + 3]) >>> 0;
}

function bad(what: string): SnapPipeError {
  return new SnapPipeError('BAD_STREAM', `return path from QEMU: ${what}`);
}

/**
 * Incremental decoder: push() what was read from the pipe (any split), then next() until it returns undefined.
 * A malformed message throws SnapPipeError('BAD_STREAM'); the decoder is then unusable.
 */
export class ReturnPathDecoder {
  private buf = new Uint8Array(4096);
  private start = 0;
  private end = 0;
  /** Messages decoded so far. */
  count = 0;
  /** Bytes consumed so far. */
  bytes = 0;

  push(data: Uint8Array): void {
    if (data.length === 0) return;
    if (this.end + data.length > this.buf.length) {
      // Compact, then grow if still short.
      const live = this.end - this.start;
      if (live + data.length <= this.buf.length) {
        this.buf.copyWithin(0, this.start, this.end);
      } else {
        const nb = new Uint8Array((live + data.length) * 2);
        nb.set(this.buf.subarray(this.start, this.end), 0);
        this.buf = nb;
      }
      this.start = 0;
      this.end = live;
    }
    this.buf.set(data, this.end);
    this.end += data.length;
  }

  /** Bytes held that do not yet form a whole message. */
  get pending(): number {
    return this.end - this.start;
  }

  next(): RpMessage | undefined {
    const avail = this.end - this.start;
    if (avail < 4) return undefined;
    const b = this.buf;
    const at = this.start;
    const type = be16(b, at);
    const len = be16(b, at + 2);
    if (type === 0 || type >= RP_MAX) throw bad(`unknown message type 0x${type.toString(16).padStart(4, '0')} (length ${len})`);
    const fixed = FIXED_LENGTH[type];
    if ((fixed !== -1 && len !== fixed) || len > RP_PAYLOAD_BYTES_MAX) {
      throw bad(`${NAMES[type]} message with length ${len}${fixed !== -1 ? ` (expected ${fixed})` : ''}`);
    }
    if (avail < 4 + len) return undefined;
    const p = at + 4;
    let msg: RpMessage;
    switch (type) {
      case RP_SHUT:
        msg = { type: 'shut', status: be32(b, p) };
        break;
      case RP_PONG:
        msg = { type: 'pong', value: be32(b, p) };
        break;
      case RP_REQ_PAGES:
        msg = { type: 'req', block: undefined, startBytes: be32(b, p) * TWO_32 + be32(b, p + 4), lengthBytes: be32(b, p + 8) };
        break;
      case RP_REQ_PAGES_ID: {
        if (len < 13 || len !== 13 + b[p + 12]) throw bad(`REQ_PAGES_ID message with length ${len} for a name of ${len >= 13 ? b[p + 12] : '?'} bytes`);
        msg = {
          type: 'req',
          block: latin1.decode(b.subarray(p + 13, p + len)),
          startBytes: be32(b, p) * TWO_32 + be32(b, p + 4),
          lengthBytes: be32(b, p + 8),
        };
        break;
      }
      case RP_RECV_BITMAP:
        if (len < 1 || b[p] + 1 > len) throw bad(`RECV_BITMAP message with length ${len}`);
        msg = { type: 'recv-bitmap', block: latin1.decode(b.subarray(p + 1, p + 1 + b[p])) };
        break;
      case RP_RESUME_ACK:
        msg = { type: 'resume-ack', value: be32(b, p) };
        break;
      default:
        msg = { type: 'switchover-ack' };
        break;
    }
    this.start += 4 + len;
    if (this.start === this.end) this.start = this.end = 0;
    this.count++;
    this.bytes += 4 + len;
    return msg;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Encoders: what QEMU's destination writes (for tests and scripted peers).

function header(type: number, len: number): Uint8Array {
  const out = new Uint8Array(4 + len);
  out[0] = type >>> 8;
  out[1] = type & 0xff;
  out[2] = len >>> 8;
  out[3] = len & 0xff;
  return out;
}

function putBe32(b: Uint8Array, at: number, v: number): void {
  b[at] = v >>> 24;
  b[at + 1] = (v >>> 16) & 0xff;
  b[at + 2] = (v >>> 8) & 0xff;
  b[at + 3] = v & 0xff;
}

export function encodeShut(status: number): Uint8Array {
  const b = header(RP_SHUT, 4);
  putBe32(b, 4, status);
  return b;
}

export function encodeSwitchoverAck(): Uint8Array {
  return header(RP_SWITCHOVER_ACK, 0);
}

export function encodePong(value: number): Uint8Array {
  const b = header(RP_PONG, 4);
  putBe32(b, 4, value);
  return b;
}

/** REQ_PAGES_ID when `block` is given, else REQ_PAGES (same block as the last one named). */
export function encodeReqPages(block: string | undefined, startBytes: number, lengthBytes: number): Uint8Array {
  const name = block === undefined ? undefined : Buffer.from(block, 'latin1');
  if (name && name.length > 255) throw new RangeError(`block name of ${name.length} bytes`);
  const b = header(name ? RP_REQ_PAGES_ID : RP_REQ_PAGES, name ? 13 + name.length : 12);
  putBe32(b, 4, Math.floor(startBytes / TWO_32));
  putBe32(b, 8, startBytes >>> 0);
  putBe32(b, 12, lengthBytes);
  if (name) {
    b[16] = name.length;
    b.set(name, 17);
  }
  return b;
}
