// Whether bytes are a JSON text, without building anything: one pass, no strings, no objects, a nesting stack of one
// bit per level. The answer is the one `JSON.parse(new TextDecoder().decode(bytes))` gives (true when it returns,
// false when it throws) for inputs below V8's string length limit, at a fixed cost per byte whatever the input:
// the VM description that ends a device state comes from the stream or from an image, either of which anyone may
// have written, and JSON.parse of a hostile text can take many times its size in heap.
//
// Why bytes suffice: the decoder turns every byte below 0x80 into that ASCII character and never produces one from
// a byte at or above 0x80 (an invalid sequence becomes U+FFFD and the next byte is read afresh), and outside
// strings JSON allows ASCII only. Inside a string any character but '"', '\' and U+0000-U+001F is allowed, so any
// byte at or above 0x80 is. The decoder drops a leading byte order mark (EF BB BF); so does this.

const WS = new Uint8Array(256);
for (const c of [0x20, 0x09, 0x0a, 0x0d]) WS[c] = 1;
const DIGIT = new Uint8Array(256);
for (let c = 0x30; c <= 0x39; c++) DIGIT[c] = 1;
const HEX = new Uint8Array(256);
for (const c of '0123456789abcdefABCDEF') HEX[c.charCodeAt(0)] = 1;
/** Characters allowed after a backslash, besides 'u'. */
const ESCAPE = new Uint8Array(256);
for (const c of '"\\/bfnrt') ESCAPE[c.charCodeAt(0)] = 1;

const Q = 0x22; // "
const BACKSLASH = 0x5c;

/** End of the string whose opening quote is at `at`, just past its closing quote; -1 if it is not a valid string. */
function skipString(b: Uint8Array, at: number): number {
  const n = b.length;
  let i = at + 1;
  // Bounded: every round moves i forward.
  while (i < n) {
    const c = b[i];
    if (c === Q) return i + 1;
    if (c < 0x20) return -1;
    if (c !== BACKSLASH) {
      i++;
      continue;
    }
    const e = b[i + 1];
    if (e === 0x75) {
      // \uXXXX
      if (i + 6 > n || !HEX[b[i + 2]] || !HEX[b[i + 3]] || !HEX[b[i + 4]] || !HEX[b[i + 5]]) return -1;
      i += 6;
    } else if (i + 1 < n && ESCAPE[e]) {
      i += 2;
    } else {
      return -1;
    }
  }
  return -1;
}

function skipDigits(b: Uint8Array, at: number): number {
  let i = at;
  while (i < b.length && DIGIT[b[i]]) i++;
  return i;
}

/** End of the number starting at `at` (-?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?); -1 if there is none. */
function skipNumber(b: Uint8Array, at: number): number {
  let i = at;
  if (b[i] === 0x2d) i++;
  if (b[i] === 0x30) i++;
  else if (i < b.length && DIGIT[b[i]]) i = skipDigits(b, i);
  else return -1;
  if (b[i] === 0x2e) {
    const j = skipDigits(b, i + 1);
    if (j === i + 1) return -1;
    i = j;
  }
  if (b[i] === 0x65 || b[i] === 0x45) {
    i++;
    if (b[i] === 0x2b || b[i] === 0x2d) i++;
    const j = skipDigits(b, i);
    if (j === i) return -1;
    i = j;
  }
  return i;
}

const LITERALS = ['true', 'false', 'null'].map((s) => new TextEncoder().encode(s));

function skipLiteral(b: Uint8Array, at: number): number {
  for (const lit of LITERALS) {
    if (b[at] !== lit[0]) continue;
    for (let k = 1; k < lit.length; k++) if (b[at + k] !== lit[k]) return -1;
    return at + lit.length;
  }
  return -1;
}

/** True if `bytes` (UTF-8) is one JSON value with optional whitespace around it. */
export function isJsonText(bytes: Uint8Array): boolean {
  const b = bytes;
  const n = b.length;
  let i = b[0] === 0xef && b[1] === 0xbb && b[2] === 0xbf ? 3 : 0;
  /** Bit d: the container at depth d is an object (1) or an array (0). Grows by doubling. */
  let stack = new Uint8Array(64);
  let depth = 0;
  const push = (isObject: boolean) => {
    if (depth >> 3 === stack.length) {
      const grown = new Uint8Array(stack.length * 2);
      grown.set(stack);
      stack = grown;
    }
    if (isObject) stack[depth >> 3] |= 1 << (depth & 7);
    else stack[depth >> 3] &= ~(1 << (depth & 7));
    depth++;
  };
  const inObject = () => (stack[(depth - 1) >> 3] & (1 << ((depth - 1) & 7))) !== 0;
  const ws = () => {
    while (i < n && WS[b[i]]) i++;
  };
  /** After '{' or ',' in an object: a key and its colon. */
  const key = (): boolean => {
    ws();
    if (b[i] !== Q) return false;
    i = skipString(b, i);
    if (i < 0) return false;
    ws();
    if (b[i] !== 0x3a) return false;
    i++;
    return true;
  };

  ws();
  // Bounded: every round consumes at least one byte (a value, a comma or a closing bracket) or returns.
  for (;;) {
    // A value.
    ws();
    const c = b[i];
    if (c === 0x7b || c === 0x5b) {
      i++;
      ws();
      if (b[i] === (c === 0x7b ? 0x7d : 0x5d)) {
        i++; // empty container: a complete value
      } else {
        push(c === 0x7b);
        if (c === 0x7b && !key()) return false;
        continue;
      }
    } else {
      i = c === Q ? skipString(b, i) : c === 0x2d || DIGIT[c] ? skipNumber(b, i) : skipLiteral(b, i);
      if (i < 0) return false;
    }
    // After a value: close containers, or a comma before the next value.
    for (;;) {
      ws();
      if (depth === 0) return i === n;
      const obj = inObject();
      if (b[i] === (obj ? 0x7d : 0x5d)) {
        i++;
        depth--;
        continue;
      }
      if (b[i] !== 0x2c) return false;
      i++;
      if (obj && !key()) return false;
      break;
    }
  }
}
