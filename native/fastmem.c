// snap-pipe's memory addon: the two byte-moving jobs of the hot paths that JavaScript does slowly here, and the one
// file call Node lacks (fallocate), in plain C (N-API, no library beyond libc, so it builds wherever node-gyp does,
// with or without liburing).
//
//   crc32c(view, offset, length, seed = 0) -> CRC-32C (Castagnoli) of view[offset, offset + length), continuing
//                                              from `seed` (the CRC of the bytes before), as an unsigned number
//   copyRanges(view, ops, count)          -> for i < count: memmove(view + ops[3i], view + ops[3i + 1], ops[3i + 2])
//                                              (ops: Float64Array of byte offsets and lengths within the view;
//                                              aligned, non-overlapping copies use non-temporal stores)
//   crc32cSoftware(view, offset, length, seed = 0) -> the same, always by table (for tests of the fast path)
//   zero(view, offset, length)            -> memset(view + offset, 0, length)
//   crc32cZeros(seed, length)              -> CRC-32C of `length` zero bytes continuing from `seed` (no memory read)
//   adviseHugePages(view, offset, length)  -> madvise(MADV_HUGEPAGE) over the whole 2 MiB areas inside the range;
//                                              the bytes advised (0 when none fit or the kernel refused)
//   preallocate(fd, offset, length)        -> fallocate(fd, 0, offset, length): 0, or the errno when refused
//   hardwareCrc                            -> true when crc32c uses the CPU's CRC32 instruction
//
// Why: on this project's 2-core VM, V8 copies a SharedArrayBuffer with relaxed word-by-word moves (4 KiB pages at
// 2.3 GB/s against libc memcpy's 6.9 GB/s) and fills it the same way, and zlib's CRC-32 runs at 2.4 GB/s, while SSE4.2's CRC32 instruction,
// run on three independent streams, checksums 1 MiB at ~19 GB/s. Measured in perf/README.md.
//
// CRC-32C with the instruction: one instruction has a latency of 3 cycles but a throughput of 1 per cycle, so one
// dependent chain uses a third of it. A block is split into three equal lanes whose CRCs run interleaved; lanes 2
// and 3 start from 0, and the results are joined with crc(A || B) = shift_n(crc(A)) ^ crc0(B), where shift_n is
// "feed n zero bytes", a linear map on the 32-bit register, applied through four 256-entry tables per lane size.
// Every range is checked against the view's length; errors are thrown as RangeError/TypeError.

#include <errno.h>
#include <fcntl.h>
#include <node_api.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#include "napi-bytes.h"

#if defined(__x86_64__)
#include <immintrin.h>
#include <nmmintrin.h>
#define HAVE_X86 1
#else
#define HAVE_X86 0
#endif

#define POLY 0x82f63b78u // CRC-32C, reflected
#define LANE_LONG 8192
#define LANE_SHORT 256
#define ZERO_BLOCK 4096

static uint32_t table8[8][256]; // slicing-by-8 tables for the software path
static uint32_t shift_long[4][256], shift_short[4][256], shift_block[4][256];
static bool hw, avx2;

// ---- software CRC-32C ------------------------------------------------------------------------------------------

static void init_tables(void) {
  for (uint32_t b = 0; b < 256; b++) {
    uint32_t c = b;
    for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ POLY : c >> 1;
    table8[0][b] = c;
  }
  for (uint32_t b = 0; b < 256; b++)
    for (int t = 1; t < 8; t++) table8[t][b] = (table8[t - 1][b] >> 8) ^ table8[0][table8[t - 1][b] & 0xff];
}

// Raw register update (no pre/post inversion).
static uint32_t sw_update(uint32_t crc, const uint8_t *p, size_t n) {
  while (n && ((uintptr_t)p & 7)) {
    crc = (crc >> 8) ^ table8[0][(crc ^ *p++) & 0xff];
    n--;
  }
  while (n >= 8) {
    uint64_t w;
    memcpy(&w, p, 8);
    w ^= crc;
    crc = table8[7][w & 0xff] ^ table8[6][(w >> 8) & 0xff] ^ table8[5][(w >> 16) & 0xff] ^ table8[4][(w >> 24) & 0xff] ^
          table8[3][(w >> 32) & 0xff] ^ table8[2][(w >> 40) & 0xff] ^ table8[1][(w >> 48) & 0xff] ^ table8[0][w >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) crc = (crc >> 8) ^ table8[0][(crc ^ *p++) & 0xff];
  return crc;
}

// ---- shifting a register over n zero bytes ----------------------------------------------------------------------

static uint32_t zeros(uint32_t crc, size_t n) {
  while (n--) crc = (crc >> 8) ^ table8[0][crc & 0xff];
  return crc;
}

static void init_shift(uint32_t t[4][256], size_t n) {
  uint32_t basis[32];
  for (int i = 0; i < 32; i++) basis[i] = zeros(1u << i, n);
  for (int k = 0; k < 4; k++)
    for (uint32_t b = 0; b < 256; b++) {
      uint32_t v = 0;
      for (int i = 0; i < 8; i++)
        if (b & (1u << i)) v ^= basis[8 * k + i];
      t[k][b] = v;
    }
}

static inline uint32_t shift(uint32_t t[4][256], uint32_t crc) {
  return t[0][crc & 0xff] ^ t[1][(crc >> 8) & 0xff] ^ t[2][(crc >> 16) & 0xff] ^ t[3][crc >> 24];
}

// ---- hardware CRC-32C -------------------------------------------------------------------------------------------

#if HAVE_X86
// Whole rounds of three lanes of `lane` bytes each, interleaved, joined with that lane size's shift tables.
__attribute__((target("sse4.2"))) static inline uint64_t hw_lanes(uint64_t c0, const uint8_t **pp, size_t *np, size_t lane,
                                                                  uint32_t table[4][256]) {
  const uint8_t *p = *pp;
  size_t n = *np;
  while (n >= 3 * lane) {
    uint64_t c1 = 0, c2 = 0;
    const uint8_t *end = p + lane;
    do {
      uint64_t a, b, c;
      memcpy(&a, p, 8);
      memcpy(&b, p + lane, 8);
      memcpy(&c, p + 2 * lane, 8);
      c0 = _mm_crc32_u64(c0, a);
      c1 = _mm_crc32_u64(c1, b);
      c2 = _mm_crc32_u64(c2, c);
      p += 8;
    } while (p < end);
    c0 = shift(table, (uint32_t)c0) ^ c1;
    c0 = shift(table, (uint32_t)c0) ^ c2;
    p += 2 * lane;
    n -= 3 * lane;
  }
  *pp = p;
  *np = n;
  return c0;
}

__attribute__((target("sse4.2"))) static uint32_t hw_update(uint32_t crc, const uint8_t *p, size_t n) {
  while (n && ((uintptr_t)p & 7)) {
    crc = _mm_crc32_u8(crc, *p++);
    n--;
  }
  uint64_t c0 = crc;
  c0 = hw_lanes(c0, &p, &n, LANE_LONG, shift_long);
  c0 = hw_lanes(c0, &p, &n, LANE_SHORT, shift_short);
  while (n >= 8) {
    uint64_t a;
    memcpy(&a, p, 8);
    c0 = _mm_crc32_u64(c0, a);
    p += 8;
    n -= 8;
  }
  crc = (uint32_t)c0;
  while (n--) crc = _mm_crc32_u8(crc, *p++);
  return crc;
}
#endif

#if HAVE_X86
// Copies with non-temporal stores: the destination's cache lines are not read first. The pipeline copies each page
// into a slot it last touched a ring-lap ago (cold), so ordinary stores first fetch every destination line from
// memory; measured here, 4 KiB page copies into a 64 MiB slot area ran at 13.9 GB/s this way against 7.8 GB/s.
// dst must be 32-byte aligned and n a multiple of 128; the caller issues the store fence.
__attribute__((target("avx2"))) static void copy_streaming(uint8_t *dst, const uint8_t *src, size_t n) {
  for (size_t i = 0; i < n; i += 128) {
    __m256i a = _mm256_loadu_si256((const __m256i *)(src + i));
    __m256i b = _mm256_loadu_si256((const __m256i *)(src + i + 32));
    __m256i c = _mm256_loadu_si256((const __m256i *)(src + i + 64));
    __m256i d = _mm256_loadu_si256((const __m256i *)(src + i + 96));
    _mm256_stream_si256((__m256i *)(dst + i), a);
    _mm256_stream_si256((__m256i *)(dst + i + 32), b);
    _mm256_stream_si256((__m256i *)(dst + i + 64), c);
    _mm256_stream_si256((__m256i *)(dst + i + 96), d);
  }
}
#endif

// memmove, through non-temporal stores when the range allows it (no overlap, dst aligned, whole 128-byte blocks).
// Returns true when it streamed (the caller must fence before anyone else reads dst).
static bool copy_range(uint8_t *dst, const uint8_t *src, size_t n) {
#if HAVE_X86
  if (avx2 && n >= 128 && (n & 127) == 0 && ((uintptr_t)dst & 31) == 0 && (dst + n <= src || src + n <= dst)) {
    copy_streaming(dst, src, n);
    return true;
  }
#endif
  memmove(dst, src, n);
  return false;
}

static uint32_t crc32c(uint32_t seed, const uint8_t *p, size_t n) {
  uint32_t crc = ~seed;
#if HAVE_X86
  if (hw) return ~hw_update(crc, p, n);
#endif
  return ~sw_update(crc, p, n);
}

// ---- N-API glue -------------------------------------------------------------------------------------------------

static napi_value throw_range(napi_env env, const char *msg) {
  napi_throw_range_error(env, "ERR_OUT_OF_RANGE", msg);
  return NULL;
}

static napi_value throw_type(napi_env env, const char *msg) {
  napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", msg);
  return NULL;
}

// The bytes of a TypedArray or DataView (any element type: byte offsets count from the view's first byte).
static bool view_bytes(napi_env env, napi_value v, uint8_t **data, size_t *len) {
  bool is;
  if (napi_is_typedarray(env, v, &is) == napi_ok && is) {
    napi_typedarray_type type;
    size_t n;
    void *d;
    if (napi_get_typedarray_info(env, v, &type, &n, &d, NULL, NULL) != napi_ok) return false;
    *data = d;
    *len = n * element_bytes(type);
    return true;
  }
  if (napi_is_dataview(env, v, &is) == napi_ok && is) {
    void *d;
    if (napi_get_dataview_info(env, v, len, &d, NULL, NULL) != napi_ok) return false;
    *data = d;
    return true;
  }
  return false;
}

static bool get_size(napi_env env, napi_value v, double max, size_t *out) {
  double d;
  if (napi_get_value_double(env, v, &d) != napi_ok) return false;
  if (!(d >= 0 && d <= max) || d != (double)(uint64_t)d) return false;
  *out = (size_t)d;
  return true;
}

// Arguments (view, offset, length) of `fn`: the bytes view[offset, offset + length). Throws and returns false when
// the view is not one, the numbers are not non-negative integers, or the range leaves the view.
static bool view_range(napi_env env, napi_value *argv, const char *fn, uint8_t **at, size_t *length) {
  char msg[96];
  uint8_t *data;
  size_t len, off, n;
  if (!view_bytes(env, argv[0], &data, &len)) {
    snprintf(msg, sizeof msg, "%s: view must be a TypedArray or DataView", fn);
    throw_type(env, msg);
    return false;
  }
  if (!get_size(env, argv[1], 9007199254740992.0, &off) || !get_size(env, argv[2], 9007199254740992.0, &n)) {
    snprintf(msg, sizeof msg, "%s: offset and length must be non-negative integers", fn);
    throw_range(env, msg);
    return false;
  }
  if (off > len || n > len - off) {
    snprintf(msg, sizeof msg, "%s: range is outside the view", fn);
    throw_range(env, msg);
    return false;
  }
  *at = data + off;
  *length = n;
  return true;
}

// The call's arguments, at most max_args of them into argv, the first three being (view, offset, length) as in
// view_range: false (with a TypeError saying `usage`) when there are fewer than three, or view_range's error.
static bool range_call(napi_env env, napi_callback_info info, const char *fn, const char *usage, size_t max_args,
                       napi_value *argv, size_t *argc, uint8_t **at, size_t *length) {
  *argc = max_args;
  napi_get_cb_info(env, info, argc, argv, NULL, NULL);
  if (*argc < 3) {
    throw_type(env, usage);
    return false;
  }
  return view_range(env, argv, fn, at, length);
}

static napi_value crc32c_call(napi_env env, napi_callback_info info, bool software) {
  size_t argc;
  napi_value argv[4];
  uint8_t *at;
  size_t n, seed = 0;
  if (!range_call(env, info, "crc32c", "crc32c(view, offset, length, seed?)", 4, argv, &argc, &at, &n)) return NULL;
  if (argc > 3 && !get_size(env, argv[3], 4294967295.0, &seed)) return throw_range(env, "crc32c: seed must be a uint32");
  napi_value out;
  uint32_t crc = software ? ~sw_update(~(uint32_t)seed, at, n) : crc32c((uint32_t)seed, at, n);
  napi_create_uint32(env, crc, &out);
  return out;
}

static napi_value js_crc32c(napi_env env, napi_callback_info info) { return crc32c_call(env, info, false); }
static napi_value js_crc32c_software(napi_env env, napi_callback_info info) { return crc32c_call(env, info, true); }

static napi_value js_copy_ranges(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 3) return throw_type(env, "copyRanges(view, ops, count)");
  uint8_t *data;
  size_t len;
  if (!view_bytes(env, argv[0], &data, &len)) return throw_type(env, "copyRanges: view must be a TypedArray or DataView");
  bool is;
  napi_typedarray_type type;
  size_t opsLen;
  void *opsData;
  if (napi_is_typedarray(env, argv[1], &is) != napi_ok || !is ||
      napi_get_typedarray_info(env, argv[1], &type, &opsLen, &opsData, NULL, NULL) != napi_ok || type != napi_float64_array)
    return throw_type(env, "copyRanges: ops must be a Float64Array");
  size_t count;
  if (!get_size(env, argv[2], 1e15, &count) || count > opsLen / 3) return throw_range(env, "copyRanges: count exceeds ops");
  const double *ops = opsData;
  // Check every range first: either all copies happen or none.
  for (size_t i = 0; i < count; i++) {
    double d = ops[3 * i], s = ops[3 * i + 1], n = ops[3 * i + 2];
    if (!(d >= 0 && s >= 0 && n >= 0) || d + n > (double)len || s + n > (double)len || d != (double)(uint64_t)d ||
        s != (double)(uint64_t)s || n != (double)(uint64_t)n)
      return throw_range(env, "copyRanges: a range is outside the view or not an integer");
  }
  bool streamed = false;
  for (size_t i = 0; i < count; i++)
    streamed |= copy_range(data + (size_t)ops[3 * i], data + (size_t)ops[3 * i + 1], (size_t)ops[3 * i + 2]);
#if HAVE_X86
  // Non-temporal stores are weakly ordered: make them visible before the caller publishes the slot (Atomics).
  if (streamed) _mm_sfence();
#endif
  return NULL;
}

static napi_value js_crc32c_zeros(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  size_t seed, n;
  if (argc < 2 || !get_size(env, argv[0], 4294967295.0, &seed)) return throw_range(env, "crc32cZeros: seed must be a uint32");
  if (!get_size(env, argv[1], 9007199254740992.0, &n)) return throw_range(env, "crc32cZeros: length must be a non-negative integer");
  uint32_t raw = ~(uint32_t)seed;
  for (; n >= ZERO_BLOCK; n -= ZERO_BLOCK) raw = shift(shift_block, raw);
  raw = zeros(raw, n);
  napi_value out;
  napi_create_uint32(env, ~raw, &out);
  return out;
}

static napi_value js_zero(napi_env env, napi_callback_info info) {
  size_t argc;
  napi_value argv[3];
  uint8_t *at;
  size_t n;
  if (!range_call(env, info, "zero", "zero(view, offset, length)", 3, argv, &argc, &at, &n)) return NULL;
  memset(at, 0, n);
  return NULL;
}


// The pipelines' shared buffers (64 MiB and more of slots, input ring and park pool) are touched in 4 KiB pages at
// random: every first touch is a page fault and every page a TLB entry, costly in a VM (two-level page walks).
// Backed by 2 MiB pages where the kernel's transparent huge pages allow it ("madvise" mode, Debian's default), the
// save coalescer's busy time for a 3.06 GB stream went from 1.65 s to 1.31 s. Populating the pages up front
// (MADV_POPULATE_WRITE) was measured too: 0.12-0.3 s on the main thread, more than it saved.
#define HUGE_PAGE_BYTES ((uintptr_t)2 << 20)

static napi_value js_advise_huge_pages(napi_env env, napi_callback_info info) {
  size_t argc;
  napi_value argv[3];
  uint8_t *at;
  size_t n;
  if (!range_call(env, info, "adviseHugePages", "adviseHugePages(view, offset, length)", 3, argv, &argc, &at, &n)) return NULL;
  double advised = 0;
#ifdef MADV_HUGEPAGE
  uintptr_t start = ((uintptr_t)at + HUGE_PAGE_BYTES - 1) & ~(HUGE_PAGE_BYTES - 1);
  uintptr_t end = ((uintptr_t)at + n) & ~(HUGE_PAGE_BYTES - 1);
  if (end > start && madvise((void *)start, end - start, MADV_HUGEPAGE) == 0) advised = (double)(end - start);
#endif
  napi_value out;
  napi_create_double(env, advised, &out);
  return out;
}

// Allocates file blocks ahead of the writes that will fill them; the one file call here (Node has no fallocate).
// fallocate(mode 0) also moves the end of file. Measured on this machine's ext4 with fio (1 MiB O_DIRECT writes, depth
// 16, 3 GB): 1730 MB/s into a preallocated file against 1400 MB/s into a sparse one of the same length, where every
// write must first allocate its blocks under the inode's exclusive lock. snap-pipe save of the bench's 3.06 GB stream,
// 6 alternating pairs: 2.22 s -> 2.10 s (medians), its writer's time in disk writes 0.97 s -> 0.82 s.
static napi_value js_preallocate(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 3) return throw_type(env, "preallocate(fd, offset, length)");
  size_t fd, off, n;
  if (!get_size(env, argv[0], 2147483647.0, &fd) || !get_size(env, argv[1], 9007199254740992.0, &off) ||
      !get_size(env, argv[2], 9007199254740992.0, &n) || n == 0)
    return throw_range(env, "preallocate: fd, offset and length must be non-negative integers, length above 0");
  int err = fallocate((int)fd, 0, (off_t)off, (off_t)n) == 0 ? 0 : errno;
  napi_value out;
  napi_create_int32(env, err, &out);
  return out;
}

NAPI_MODULE_INIT() {
  init_tables();
  init_shift(shift_long, LANE_LONG);
  init_shift(shift_short, LANE_SHORT);
  init_shift(shift_block, ZERO_BLOCK);
#if HAVE_X86
  hw = __builtin_cpu_supports("sse4.2");
  avx2 = __builtin_cpu_supports("avx2");
#endif
  napi_value fn, flag;
  napi_create_function(env, "crc32c", NAPI_AUTO_LENGTH, js_crc32c, NULL, &fn);
  napi_set_named_property(env, exports, "crc32c", fn);
  napi_create_function(env, "crc32cSoftware", NAPI_AUTO_LENGTH, js_crc32c_software, NULL, &fn);
  napi_set_named_property(env, exports, "crc32cSoftware", fn);
  napi_create_function(env, "crc32cZeros", NAPI_AUTO_LENGTH, js_crc32c_zeros, NULL, &fn);
  napi_set_named_property(env, exports, "crc32cZeros", fn);
  napi_create_function(env, "zero", NAPI_AUTO_LENGTH, js_zero, NULL, &fn);
  napi_set_named_property(env, exports, "zero", fn);
  napi_create_function(env, "copyRanges", NAPI_AUTO_LENGTH, js_copy_ranges, NULL, &fn);
  napi_set_named_property(env, exports, "copyRanges", fn);
  napi_create_function(env, "adviseHugePages", NAPI_AUTO_LENGTH, js_advise_huge_pages, NULL, &fn);
  napi_set_named_property(env, exports, "adviseHugePages", fn);
  napi_create_function(env, "preallocate", NAPI_AUTO_LENGTH, js_preallocate, NULL, &fn);
  napi_set_named_property(env, exports, "preallocate", fn);
  napi_get_boolean(env, hw, &flag);
  napi_set_named_property(env, exports, "hardwareCrc", flag);
  return exports;
}
