// The commands QEMU sends among the RAM sections at switch-over, as snap-pipe keeps them: today only QEMU 10.0+'s
// SWITCHOVER_START (savevm.c qemu_savevm_send_switchover_start: COMMAND, be16 11, be16 length 0). Save keeps them
// verbatim; load checks an image's copy here (the image may come from anyone) before replaying it.
import { CMD_SWITCHOVER_START, SEC_COMMAND } from './constants.js';

/** One SWITCHOVER_START command section, byte for byte. */
export const SWITCHOVER_START_BYTES: Uint8Array = Uint8Array.of(SEC_COMMAND, 0, CMD_SWITCHOVER_START, 0, 0);
/** QEMU sends one per migration; a few more are tolerated, a flood of them is a damaged stream or image. */
export const SWITCHOVER_COMMANDS_MAX = 8;

/** How many SWITCHOVER_START commands `bytes` holds, or null when it holds anything else (or too many). */
export function countSwitchoverStarts(bytes: Uint8Array): number | null {
  const n = SWITCHOVER_START_BYTES.length;
  if (bytes.length % n !== 0 || bytes.length / n > SWITCHOVER_COMMANDS_MAX) return null;
  for (let i = 0; i < bytes.length; i++) if (bytes[i] !== SWITCHOVER_START_BYTES[i % n]) return null;
  return bytes.length / n;
}
