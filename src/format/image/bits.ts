// Page bitmaps (bit i of byte i >> 3 is page i, LSB first): counting set bits.

/** Set bits of one byte. */
export function popcount8(x: number): number {
  x = x - ((x >> 1) & 0x55);
  x = (x & 0x33) + ((x >> 2) & 0x33);
  return (x + (x >> 4)) & 0x0f;
}

/** Set bits of a whole bitmap. */
export function countSetBits(bits: Uint8Array): number {
  let n = 0;
  for (let i = 0; i < bits.length; i++) n += popcount8(bits[i]);
  return n;
}
