// Knowing that a stream is complete while its input is still open: with QEMU's return path open, QEMU writes the
// device state, EOF and the VM description, then waits for snap-pipe's SHUT with the pipe open, so the end of the
// stream is the end of a whole VM description (EOF, VMDESCRIPTION, be32 length, that much JSON), not an end of input.
//
// Fed the device state piece by piece as it arrives, this answers after each piece whether the bytes so far end that
// way, in time linear in the device state: the JSON holds no 0x00 byte while the EOF before it is one, so a true
// start k lies within 5 bytes before the last 0x00 (see parser.ts vmdescCandidates). For a given k the length field
// names one end only, so each candidate's JSON is checked at most once, and the spans checked hold no 0x00 byte, so
// they never overlap: one pass over the device state in all.
import { SEC_EOF, SEC_VMDESCRIPTION } from './constants.js';
import { isJsonText } from './json.js';

export class VmdescEnd {
  private buf = new Uint8Array(64 * 1024);
  private n = 0;
  private lastNul = -1;
  /** Candidates already checked, by start: a start's JSON is checked once. */
  private checked = new Set<number>();

  /** Bytes held so far (the device state up to now). */
  get bytes(): Uint8Array {
    return this.buf.subarray(0, this.n);
  }

  /** Adds the next piece; true when the device state now ends with a whole VM description. */
  push(piece: Uint8Array): boolean {
    if (this.n + piece.length > this.buf.length) {
      const grown = new Uint8Array(Math.max(this.buf.length * 2, this.n + piece.length));
      grown.set(this.buf.subarray(0, this.n));
      this.buf = grown;
    }
    this.buf.set(piece, this.n);
    const nul = piece.lastIndexOf(SEC_EOF);
    if (nul >= 0) this.lastNul = this.n + nul;
    this.n += piece.length;
    return this.complete();
  }

  private complete(): boolean {
    const b = this.buf;
    const n = this.n;
    for (let k = Math.min(this.lastNul, n - 6); k >= 0 && k >= this.lastNul - 5; k--) {
      if (b[k] !== SEC_EOF || b[k + 1] !== SEC_VMDESCRIPTION) continue;
      const len = ((b[k + 2] << 24) | (b[k + 3] << 16) | (b[k + 4] << 8) | b[k + 5]) >>> 0;
      if (len !== n - k - 6 || this.checked.has(k)) continue;
      this.checked.add(k);
      if (isJsonText(b.subarray(k + 6, n))) return true;
    }
    return false;
  }
}
