// Reads whole 1 MiB data clusters of an open image, many at a time, through the I/O backend (io_uring by default)
// into cluster slots allocated once (page aligned, shared, so verify's CRC threads read them in place). It reads
// through the ImageReader's own file descriptor: the image is opened once, by ImageReader, and only image/ sees its
// fd and host offsets beyond what a caller asks for. A read that comes back short is a truncated image, refused
// here for every caller. Which cluster goes in which slot, and when, is the caller's: load keeps them in plan order,
// postcopy serves page requests first, verify checks them in file order.
import { SnapPipeError } from '../errors.js';
import { CLUSTER_BYTES } from '../format/units.js';
import { openIoBackend, reapNamed, type IoBackend, type IoBackendName } from '../native/io.js';
import { alignedShared } from '../native/memory.js';

export interface ClusterReadOptions {
  io: IoBackendName | 'auto';
  /** Cluster slots to allocate. */
  slots: number;
  /** Reads the backend may hold in flight (at most `slots`). */
  inFlightMax: number;
  /** One line for the user (e.g. why io_uring is not used). */
  onNote?: (line: string) => void;
}

export class ClusterReader {
  /** The slots' memory: slot s is bytes [s MiB, (s+1) MiB). */
  readonly memory: SharedArrayBuffer;
  readonly slots: Uint8Array;
  readonly slotCount: number;
  bytesRead = 0;
  private readonly backend: IoBackend;
  /** Host offset of the read each slot holds (for the truncation message). */
  private readonly slotHost: Float64Array;
  private readonly arrived: number[] = [];

  /** Use ImageReader.clusterReader(): it owns the fd and closes it after this. */
  constructor(
    private readonly path: string,
    private readonly fd: number,
    o: ClusterReadOptions,
  ) {
    if (!Number.isInteger(o.slots) || o.slots < 1 || !Number.isInteger(o.inFlightMax) || o.inFlightMax < 1 || o.inFlightMax > o.slots) {
      throw new RangeError(`ClusterReader: bad slots ${o.slots} / in flight ${o.inFlightMax}`);
    }
    this.slotCount = o.slots;
    this.memory = alignedShared(o.slots * CLUSTER_BYTES);
    this.slots = new Uint8Array(this.memory, 0, o.slots * CLUSTER_BYTES);
    this.slotHost = new Float64Array(o.slots);
    const opened = openIoBackend({ io: o.io, queueDepth: o.inFlightMax });
    this.backend = opened.backend;
    if (opened.note) o.onNote?.(opened.note);
  }

  get inFlight(): number {
    return this.backend.inFlight;
  }

  get backendName(): IoBackendName {
    return this.backend.name;
  }

  /** Queues the read of the cluster at `hostOffsetBytes` into `slot`; reap() hands the slot back once it is whole. */
  read(hostOffsetBytes: number, slot: number): void {
    this.slotHost[slot] = hostOffsetBytes;
    this.backend.read(this.fd, this.slots, slot * CLUSTER_BYTES, CLUSTER_BYTES, hostOffsetBytes, slot);
  }

  /**
   * Submits what is queued and waits for at least `min` reads (capped at those in flight); returns the slots whose
   * cluster arrived whole. The array is reused by the next call.
   */
  reap(min = 1): readonly number[] {
    const done = reapNamed(this.backend, this.path, min);
    this.arrived.length = 0;
    for (const c of done) {
      if (c.bytes !== CLUSTER_BYTES) {
        throw new SnapPipeError('TRUNCATED', `${this.path}: the file ends inside the cluster at byte ${this.slotHost[c.tag]} (truncated image)`);
      }
      this.bytesRead += CLUSTER_BYTES;
      this.arrived.push(c.tag);
    }
    return this.arrived;
  }

  slotView(slot: number): Uint8Array {
    return this.slots.subarray(slot * CLUSTER_BYTES, (slot + 1) * CLUSTER_BYTES);
  }

  /** Waits for reads the kernel still holds, then frees the backend (the fd stays with the ImageReader). */
  close(): void {
    this.backend.close();
  }
}
