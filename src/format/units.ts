// Byte counts as people read them, for the CLI's lines (a module of its own: save's start-up imports nothing more).

/** 1536 -> "1.5 KiB"; below 1 KiB, "N bytes". */
export function formatBytes(bytes: number): string {
  const units = ['bytes', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = bytes;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  if (u === 0) return `${bytes} bytes`;
  return `${Number(v.toFixed(2))} ${units[u]}`;
}
