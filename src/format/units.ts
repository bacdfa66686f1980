// The sizes every format shares (pure, no imports): the guest page, snap-pipe's cluster (1 MiB, one per chunk of a
// RAM block), and the most RAM snap-pipe stores. Streams and images both count in them.

/** Guest page size: x86 TARGET_PAGE_SIZE. Streams with other target page sizes are refused. */
export const PAGE_BYTES = 4096;
export const PAGE_BITS = 12;
/** A QCOW2 cluster of the image, and the chunk of a RAM block it holds. */
export const CLUSTER_BYTES = 1 << 20;
export const CLUSTER_BITS = 20;
export const PAGES_PER_CHUNK = CLUSTER_BYTES / PAGE_BYTES; // 256
