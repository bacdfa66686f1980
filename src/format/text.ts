// Text read from an image or a stream (block names, the machine type, a failed save's note, a path) on its way to
// a person or a script: pure, no I/O. Anyone may have written those bytes, and a terminal acts on control
// characters (ESC starts a sequence, and so does the C1 character 0x9b); none may reach it raw.

/** Control characters (C0, DEL, C1) escaped as \xNN, so `text` stays on its line and cannot steer a terminal. */
export function printable(text: string): string {
  return text.replace(/[\u0000-\u001f\u007f-\u009f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}

/**
 * JSON.stringify(value, null, 2) with DEL and the C1 controls escaped as well (\u007f-\u009f): JSON.stringify
 * escapes only U+0000-U+001F. The result is still JSON, and parses back to the same strings.
 */
export function jsonText(value: unknown): string {
  return JSON.stringify(value, null, 2).replace(/[\u007f-\u009f]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
}

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
