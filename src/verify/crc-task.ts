// Piscina task for `snap-pipe verify`: the CRC-32C of one cluster the main thread has read into shared memory.
// The memory is shared, not copied: the task message carries only where the cluster lies.
import assert from 'node:assert/strict';
import { crc32c } from '../native/fastmem.js';

export interface CrcTask {
  /** The verify pipeline's read slots (page-aligned shared memory). */
  mem: SharedArrayBuffer;
  offsetBytes: number;
  lengthBytes: number;
}

export default function crcTask(task: CrcTask): number {
  assert(task.mem instanceof SharedArrayBuffer, 'crcTask: mem must be a SharedArrayBuffer');
  assert(
    Number.isInteger(task.offsetBytes) && Number.isInteger(task.lengthBytes) && task.offsetBytes >= 0 && task.lengthBytes > 0 &&
      task.offsetBytes + task.lengthBytes <= task.mem.byteLength,
    `crcTask: range ${task.offsetBytes}+${task.lengthBytes} outside ${task.mem.byteLength} bytes`,
  );
  return crc32c(new Uint8Array(task.mem, task.offsetBytes, task.lengthBytes)) >>> 0;
}
