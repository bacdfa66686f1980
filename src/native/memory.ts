// Page-aligned shared memory. A SharedArrayBuffer's data is not page aligned (O_DIRECT from it fails with EINVAL),
// but a shared WebAssembly.Memory's buffer starts on a page boundary and can be handed to workers.
import { adviseHugePages } from './fastmem.js';

const WASM_PAGE_BYTES = 65536;

/**
 * A SharedArrayBuffer of at least `bytes` (rounded up to 64 KiB) whose first byte is page aligned, backed by huge
 * pages where it holds whole 2 MiB areas and the kernel allows it (fewer page faults and TLB misses for rings).
 */
export function alignedShared(bytes: number): SharedArrayBuffer {
  if (!Number.isInteger(bytes) || bytes <= 0) throw new RangeError(`alignedShared: bad size ${bytes}`);
  const pages = Math.ceil(bytes / WASM_PAGE_BYTES);
  const mem = new WebAssembly.Memory({ initial: pages, maximum: pages, shared: true });
  const buffer = mem.buffer as unknown as SharedArrayBuffer;
  adviseHugePages(new Uint8Array(buffer));
  return buffer;
}
