// snap-pipe's io_uring addon: a thin, per-instance wrapper over liburing (plain C, N-API).
//
//   const r = new Ring(depth, blockBytes = 512);
//   r.prepWrite(fd, view, viewOffset, length, fileOffset, tag) -> true | false (no free slot)
//   r.prepRead (fd, view, viewOffset, length, fileOffset, tag) -> true | false
//   r.submit() -> number submitted
//   r.wait(min, out, timeoutMs = -1) -> pairs written to out: out[2i] = tag, out[2i+1] = res (bytes or -errno)
//   r.registerFiles([fd...]), r.registerBuffers([view...])   (empty array unregisters)
//   r.close(force = false)
//   r.inFlight, r.queued, r.depth, r.blockBytes, r.closed
//
// Invariants:
// - at most `depth` requests are in flight (queued or submitted, not yet reaped); each owns one slot, and the slot
//   index is the SQE's user_data. The SQ has >= depth entries and the CQ twice that, so neither can overflow.
// - every in-flight request holds a pin: a napi_ref to a view over its memory, so the memory outlives the I/O.
//   Pins are cached per backing store (at most `depth`) so a writer that reuses one shared buffer creates one
//   reference, not one per I/O. A cached pin keeps its memory alive until it is evicted or the ring is closed.
// - view memory must not be detached or transferred while a request on it is in flight (SharedArrayBuffer and
//   WebAssembly.Memory buffers cannot be).
// - registerFiles() maps fds to fixed-file indexes by number: a registered fd must stay open (and mean the same
//   file) until it is unregistered or the ring is closed.
// - the ring is never freed with requests submitted to the kernel: close() refuses, close(true) and the finalizer
//   first wait for every submitted request (queued-but-unsubmitted ones are simply dropped).
// - alignment of address, length and file offset to blockBytes is checked here, before the kernel answers EINVAL.
// - errors are thrown as JS exceptions carrying .code (e.g. 'EPERM') and .errno (negative, as in Node); a request's
//   own failure comes back as a negative res in its completion.

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <liburing.h>
#include <node_api.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "napi-bytes.h"

#define DEPTH_MAX 4096
#define FILES_MAX 64
#define BUFFERS_MAX 16
#define LENGTH_MAX 0x7ffff000u // the kernel's MAX_RW_COUNT: larger transfers come back short
#define OFFSET_MAX 9007199254740992.0 // 2^53: exact in a JS number
#define EINTR_RETRIES_MAX 1000

typedef struct {
  uint8_t *base; // start of the backing store (view data minus its byte offset): the cache key
  napi_ref ref;  // NULL when the entry is empty
  uint32_t users; // in-flight requests using it
} Pin;

typedef struct {
  uint32_t tag;
  int32_t pin; // index into pins, -1 when the memory is a registered buffer (pinned for the ring's life)
  bool busy;
} Slot;

typedef struct {
  struct io_uring ring;
  bool live;
  uint32_t depth, block_bytes;
  uint32_t in_flight; // prepared and not yet reaped (queued + submitted)
  uint32_t queued;    // prepared, not yet seen by the kernel
  Slot *slots;        // depth
  uint32_t *free_slots, free_count;
  Pin *pins;          // depth
  int files[FILES_MAX];
  uint32_t file_count;
  struct iovec bufs[BUFFERS_MAX];
  napi_ref buf_refs[BUFFERS_MAX];
  uint32_t buf_count;
} Ring;

// ---- errors ---------------------------------------------------------------------------------------------------

static napi_value throw_kind(napi_env env, int kind, const char *code, const char *fmt, ...) {
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  bool pending = false;
  napi_is_exception_pending(env, &pending);
  if (pending) return NULL;
  if (kind == 1) napi_throw_type_error(env, code, msg);
  else if (kind == 2) napi_throw_range_error(env, code, msg);
  else napi_throw_error(env, code, msg);
  return NULL;
}
#define THROW(env, code, ...) throw_kind(env, 0, code, __VA_ARGS__)
#define THROW_TYPE(env, code, ...) throw_kind(env, 1, code, __VA_ARGS__)
#define THROW_RANGE(env, code, ...) throw_kind(env, 2, code, __VA_ARGS__)

// An Error like Node's system errors: message "<what>: ENOSPC (No space left on device)", .code, .errno < 0, .syscall.
static napi_value throw_errno(napi_env env, const char *syscall, const char *what, int err) {
  const char *name = strerrorname_np(err);
  if (!name) name = "EUNKNOWN";
  char msg[512];
  snprintf(msg, sizeof msg, "%s: %s (%s)", what, name, strerror(err));
  napi_value code, message, error, v;
  if (napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &code) != napi_ok ||
      napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &message) != napi_ok ||
      napi_create_error(env, code, message, &error) != napi_ok)
    return THROW(env, name, "%s", msg);
  if (napi_create_int32(env, -err, &v) == napi_ok) napi_set_named_property(env, error, "errno", v);
  if (napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &v) == napi_ok)
    napi_set_named_property(env, error, "syscall", v);
  napi_throw(env, error);
  return NULL;
}

// ---- arguments ------------------------------------------------------------------------------------------------

static bool arg_integer(napi_env env, napi_value v, const char *name, double min, double max, double *out) {
  napi_valuetype t;
  double d;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_number) {
    THROW_TYPE(env, "ERR_INVALID_ARG_TYPE", "%s must be a number", name);
    return false;
  }
  napi_get_value_double(env, v, &d);
  if (!(d >= min && d <= max) || d != (double)(int64_t)d) {
    THROW_RANGE(env, "ERR_OUT_OF_RANGE", "%s must be an integer in [%.0f, %.0f], got %g", name, min, max, d);
    return false;
  }
  *out = d;
  return true;
}

static bool arg_optional(napi_env env, napi_value v) {
  napi_valuetype t;
  return v != NULL && napi_typeof(env, v, &t) == napi_ok && t != napi_undefined;
}

// The bytes a view covers. A bare SharedArrayBuffer has no N-API accessor in Node 20: wrap it in a Uint8Array.
static bool arg_view(napi_env env, napi_value v, const char *name, uint8_t **data, size_t *bytes, uint8_t **base) {
  bool is = false;
  void *d = NULL;
  size_t len = 0, off = 0;
  napi_value ab;
  if (napi_is_typedarray(env, v, &is) == napi_ok && is) {
    napi_typedarray_type type;
    napi_get_typedarray_info(env, v, &type, &len, &d, &ab, &off);
    len *= element_bytes(type);
  } else if (napi_is_dataview(env, v, &is) == napi_ok && is) {
    napi_get_dataview_info(env, v, &len, &d, &ab, &off);
  } else if (napi_is_arraybuffer(env, v, &is) == napi_ok && is) {
    napi_get_arraybuffer_info(env, v, &d, &len);
  } else {
    THROW_TYPE(env, "ERR_INVALID_ARG_TYPE",
               "%s must be a TypedArray, DataView or ArrayBuffer (wrap a SharedArrayBuffer in a Uint8Array)", name);
    return false;
  }
  *data = d;
  *bytes = d ? len : 0;
  *base = d ? (uint8_t *)d - off : NULL;
  return true;
}

static Ring *this_ring(napi_env env, napi_callback_info info, size_t *argc, napi_value *argv, bool need_live) {
  napi_value self;
  Ring *r = NULL;
  if (napi_get_cb_info(env, info, argc, argv, &self, NULL) != napi_ok ||
      napi_unwrap(env, self, (void **)&r) != napi_ok || r == NULL) {
    THROW_TYPE(env, "ERR_INVALID_THIS", "not a Ring");
    return NULL;
  }
  if (need_live && !r->live) {
    THROW(env, "ERR_URING_CLOSED", "the io_uring ring is closed");
    return NULL;
  }
  return r;
}

static napi_value undefined(napi_env env) {
  napi_value v;
  napi_get_undefined(env, &v);
  return v;
}

// ---- slots and pins -------------------------------------------------------------------------------------------

// A pin for the backing store at `base`: reuse a cached one, else take an empty entry, else evict an unused one.
// Called only with a free slot, so fewer than `depth` pins are in use and one of the last two cases succeeds.
static int32_t pin_acquire(napi_env env, Ring *r, napi_value view, uint8_t *base) {
  int32_t empty = -1, unused = -1;
  for (uint32_t i = 0; i < r->depth; i++) {
    Pin *p = &r->pins[i];
    if (p->ref && p->base == base) {
      p->users++;
      return (int32_t)i;
    }
    if (!p->ref && empty < 0) empty = (int32_t)i;
    if (p->ref && p->users == 0 && unused < 0) unused = (int32_t)i;
  }
  int32_t i = empty >= 0 ? empty : unused;
  if (i < 0) return -1;
  Pin *p = &r->pins[i];
  if (p->ref) napi_delete_reference(env, p->ref);
  p->ref = NULL;
  if (napi_create_reference(env, view, 1, &p->ref) != napi_ok) {
    p->ref = NULL;
    return -1;
  }
  p->base = base;
  p->users = 1;
  return i;
}

static void slot_release(Ring *r, uint32_t s) {
  Slot *slot = &r->slots[s];
  if (slot->pin >= 0) r->pins[slot->pin].users--;
  slot->busy = false;
  r->free_slots[r->free_count++] = s;
  r->in_flight--;
}

// Takes up to `cap` completions off the CQ (without waiting), writing (tag, res) pairs when `out` is given.
static uint32_t reap_ready(Ring *r, int32_t *out, uint32_t cap) {
  unsigned head, seen = 0;
  uint32_t n = 0;
  struct io_uring_cqe *cqe;
  io_uring_for_each_cqe(&r->ring, head, cqe) {
    if (n == cap) break;
    seen++;
    uint64_t s = cqe->user_data;
    if (s >= r->depth || !r->slots[s].busy) continue; // not ours (e.g. liburing's internal timeout)
    if (out) {
      out[2 * n] = (int32_t)r->slots[s].tag;
      out[2 * n + 1] = cqe->res;
    }
    n++;
    slot_release(r, (uint32_t)s);
  }
  io_uring_cq_advance(&r->ring, seen);
  return n;
}

// Waits for every submitted request, drops the unsubmitted ones. Returns 0 or -errno (then the ring must leak).
static int drain(Ring *r) {
  uint32_t submitted = r->in_flight - r->queued;
  for (int tries = 0; submitted > 0;) {
    struct io_uring_cqe *cqe;
    int ret = io_uring_wait_cqe(&r->ring, &cqe);
    if (ret == -EINTR && ++tries < EINTR_RETRIES_MAX) continue;
    if (ret < 0) return ret;
    submitted -= reap_ready(r, NULL, submitted);
  }
  for (uint32_t s = 0; s < r->depth; s++)
    if (r->slots[s].busy) slot_release(r, s);
  r->queued = 0;
  return 0;
}

// Frees everything; only after drain() succeeded.
static void destroy(napi_env env, Ring *r) {
  if (r->live) io_uring_queue_exit(&r->ring);
  r->live = false;
  for (uint32_t i = 0; r->pins && i < r->depth; i++)
    if (r->pins[i].ref) napi_delete_reference(env, r->pins[i].ref), r->pins[i].ref = NULL;
  for (uint32_t i = 0; i < r->buf_count; i++) napi_delete_reference(env, r->buf_refs[i]);
  r->buf_count = 0;
  r->file_count = 0;
  free(r->slots), r->slots = NULL;
  free(r->free_slots), r->free_slots = NULL;
  free(r->pins), r->pins = NULL;
}

static void ring_finalize(napi_env env, void *data, void *hint) {
  (void)hint;
  Ring *r = data;
  if (r->live && drain(r) < 0) return; // the kernel may still use the memory: leak rather than free
  destroy(env, r);
  free(r);
}

// ---- methods --------------------------------------------------------------------------------------------------

static napi_value ring_new(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2] = {NULL, NULL}, self;
  napi_get_cb_info(env, info, &argc, argv, &self, NULL);
  double depth, block = 512;
  if (!arg_integer(env, argv[0], "depth", 1, DEPTH_MAX, &depth)) return NULL;
  if (argc > 1 && arg_optional(env, argv[1]) && !arg_integer(env, argv[1], "blockBytes", 1, 1 << 20, &block))
    return NULL;
  uint32_t b = (uint32_t)block;
  if (b & (b - 1)) return THROW_RANGE(env, "ERR_OUT_OF_RANGE", "blockBytes must be a power of two, got %u", b);

  Ring *r = calloc(1, sizeof *r);
  if (!r) return throw_errno(env, "malloc", "new Ring", ENOMEM);
  r->depth = (uint32_t)depth;
  r->block_bytes = b;
  r->slots = calloc(r->depth, sizeof *r->slots);
  r->free_slots = calloc(r->depth, sizeof *r->free_slots);
  r->pins = calloc(r->depth, sizeof *r->pins);
  if (!r->slots || !r->free_slots || !r->pins) {
    destroy(env, r);
    free(r);
    return throw_errno(env, "malloc", "new Ring", ENOMEM);
  }
  for (uint32_t i = 0; i < r->depth; i++) r->free_slots[i] = r->depth - 1 - i;
  r->free_count = r->depth;

  // SUBMIT_ALL (5.18): a request failing at submission does not hold back the ones after it. Older kernels: plain.
  struct io_uring_params p;
  memset(&p, 0, sizeof p);
  p.flags = IORING_SETUP_SUBMIT_ALL;
  int ret = io_uring_queue_init_params(r->depth, &r->ring, &p);
  if (ret == -EINVAL) ret = io_uring_queue_init(r->depth, &r->ring, 0);
  if (ret < 0) {
    destroy(env, r);
    free(r);
    char what[64];
    snprintf(what, sizeof what, "io_uring_queue_init(%u)", (unsigned)depth);
    return throw_errno(env, "io_uring_setup", what, -ret);
  }
  r->live = true;
  if (napi_wrap(env, self, r, ring_finalize, NULL, NULL) != napi_ok) {
    io_uring_queue_exit(&r->ring);
    r->live = false;
    destroy(env, r);
    free(r);
    return THROW(env, "ERR_URING", "napi_wrap failed");
  }
  return self;
}

static napi_value prep(napi_env env, napi_callback_info info, bool write) {
  const char *op = write ? "write" : "read";
  size_t argc = 6;
  napi_value argv[6] = {NULL};
  Ring *r = this_ring(env, info, &argc, argv, true);
  if (!r) return NULL;
  double fd, view_off, len, file_off, tag;
  uint8_t *data, *base;
  size_t view_bytes;
  if (!arg_integer(env, argv[0], "fd", 0, INT32_MAX, &fd) ||
      !arg_view(env, argv[1], "buffer", &data, &view_bytes, &base) ||
      !arg_integer(env, argv[2], "bufferOffset", 0, OFFSET_MAX, &view_off) ||
      !arg_integer(env, argv[3], "length", 1, LENGTH_MAX, &len) ||
      !arg_integer(env, argv[4], "fileOffset", 0, OFFSET_MAX, &file_off) ||
      !arg_integer(env, argv[5], "tag", 0, UINT32_MAX, &tag))
    return NULL;
  if (view_off + len > (double)view_bytes)
    return THROW_RANGE(env, "ERR_OUT_OF_RANGE", "%s of %.0f bytes at buffer offset %.0f: past the buffer's %zu bytes",
                       op, len, view_off, view_bytes);
  uint8_t *addr = data + (size_t)view_off;
  uint64_t mask = r->block_bytes - 1;
  if ((uint64_t)file_off & mask)
    return THROW_RANGE(env, "ERR_URING_ALIGNMENT", "%s of %.0f bytes at file offset %.0f: offset not a multiple of %u",
                       op, len, file_off, r->block_bytes);
  if ((uint64_t)len & mask)
    return THROW_RANGE(env, "ERR_URING_ALIGNMENT", "%s of %.0f bytes at file offset %.0f: length not a multiple of %u",
                       op, len, file_off, r->block_bytes);
  if ((uintptr_t)addr & mask)
    return THROW_RANGE(env, "ERR_URING_ALIGNMENT",
                       "%s of %.0f bytes at file offset %.0f: buffer address %p not a multiple of %u "
                       "(SharedArrayBuffer memory is not page aligned; use a shared WebAssembly.Memory)",
                       op, len, file_off, (void *)addr, r->block_bytes);

  napi_value result;
  if (r->free_count == 0) {
    napi_get_boolean(env, false, &result);
    return result;
  }
  int32_t buf_index = -1;
  for (uint32_t i = 0; i < r->buf_count; i++) {
    uint8_t *b = r->bufs[i].iov_base;
    if (addr >= b && addr + (size_t)len <= b + r->bufs[i].iov_len) {
      buf_index = (int32_t)i;
      break;
    }
  }
  int32_t pin = -1;
  if (buf_index < 0 && (pin = pin_acquire(env, r, argv[1], base)) < 0)
    return THROW(env, "ERR_URING", "%s: could not reference the buffer", op);
  struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
  if (!sqe) { // cannot happen while slots <= SQ entries; answered like a full queue
    if (pin >= 0) r->pins[pin].users--;
    napi_get_boolean(env, false, &result);
    return result;
  }
  uint32_t s = r->free_slots[r->free_count - 1];
  r->free_count--;

  int file = (int)fd;
  unsigned sqe_flags = 0;
  for (uint32_t i = 0; i < r->file_count; i++) {
    if (r->files[i] == file) {
      file = (int)i;
      sqe_flags = IOSQE_FIXED_FILE;
      break;
    }
  }
  if (write) {
    if (buf_index >= 0) io_uring_prep_write_fixed(sqe, file, addr, (unsigned)len, (uint64_t)file_off, buf_index);
    else io_uring_prep_write(sqe, file, addr, (unsigned)len, (uint64_t)file_off);
  } else {
    if (buf_index >= 0) io_uring_prep_read_fixed(sqe, file, addr, (unsigned)len, (uint64_t)file_off, buf_index);
    else io_uring_prep_read(sqe, file, addr, (unsigned)len, (uint64_t)file_off);
  }
  io_uring_sqe_set_flags(sqe, sqe_flags);
  io_uring_sqe_set_data64(sqe, s);
  r->slots[s] = (Slot){.tag = (uint32_t)tag, .pin = pin, .busy = true};
  r->in_flight++;
  r->queued++;
  napi_get_boolean(env, true, &result);
  return result;
}

static napi_value ring_prep_write(napi_env env, napi_callback_info info) { return prep(env, info, true); }
static napi_value ring_prep_read(napi_env env, napi_callback_info info) { return prep(env, info, false); }

static napi_value ring_submit(napi_env env, napi_callback_info info) {
  size_t argc = 0;
  Ring *r = this_ring(env, info, &argc, NULL, true);
  if (!r) return NULL;
  int ret = 0;
  for (int tries = 0; r->queued > 0; tries++) {
    ret = io_uring_submit(&r->ring);
    r->queued = io_uring_sq_ready(&r->ring);
    // Interrupted (a profiler's or the runtime's signal): go round again; the loop condition says whether the
    // completions arrived meanwhile, so a stale -EINTR must not survive as the result.
    if (ret == -EINTR && tries < EINTR_RETRIES_MAX) {
      ret = 0;
      continue;
    }
    break;
  }
  if (ret < 0) return throw_errno(env, "io_uring_enter", "io_uring_submit", -ret);
  napi_value v;
  napi_create_uint32(env, (uint32_t)ret, &v);
  return v;
}

static napi_value ring_wait(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3] = {NULL};
  Ring *r = this_ring(env, info, &argc, argv, true);
  if (!r) return NULL;
  double min, timeout_ms = -1;
  if (!arg_integer(env, argv[0], "minComplete", 0, UINT32_MAX, &min)) return NULL;
  bool is = false;
  napi_typedarray_type type;
  size_t len = 0;
  void *out = NULL;
  if (napi_is_typedarray(env, argv[1], &is) != napi_ok || !is ||
      napi_get_typedarray_info(env, argv[1], &type, &len, &out, NULL, NULL) != napi_ok ||
      (type != napi_int32_array && type != napi_uint32_array))
    return THROW_TYPE(env, "ERR_INVALID_ARG_TYPE", "out must be an Int32Array or Uint32Array");
  uint32_t cap = len / 2 > DEPTH_MAX * 2 ? DEPTH_MAX * 2 : (uint32_t)(len / 2);
  if (cap == 0) return THROW_RANGE(env, "ERR_OUT_OF_RANGE", "out must hold at least one (tag, result) pair");
  if (argc > 2 && arg_optional(env, argv[2]) && !arg_integer(env, argv[2], "timeoutMs", -1, 1e9, &timeout_ms))
    return NULL;

  // Never wait for more than can complete: that would block forever.
  uint32_t want = (uint32_t)min < r->in_flight ? (uint32_t)min : r->in_flight;
  struct io_uring_cqe *cqe;
  int ret = 0;
  for (int tries = 0; r->queued > 0 || io_uring_cq_ready(&r->ring) < want; tries++) {
    if (timeout_ms >= 0 && want > 0) {
      struct __kernel_timespec ts = {.tv_sec = (int64_t)timeout_ms / 1000,
                                     .tv_nsec = ((int64_t)timeout_ms % 1000) * 1000000};
      ret = io_uring_submit_and_wait_timeout(&r->ring, &cqe, want, &ts, NULL);
    } else {
      ret = io_uring_submit_and_wait(&r->ring, want); // one kernel call: submit the batch and wait
    }
    r->queued = io_uring_sq_ready(&r->ring);
    // Interrupted (a profiler's or the runtime's signal): go round again; the loop condition says whether the
    // completions arrived meanwhile, so a stale -EINTR must not survive as the result.
    if (ret == -EINTR && tries < EINTR_RETRIES_MAX) {
      ret = 0;
      continue;
    }
    break;
  }
  // -ETIME: the timeout passed; -EBUSY/-EAGAIN with completions ready: reaping them is the cure.
  if (ret < 0 && ret != -ETIME && !((ret == -EBUSY || ret == -EAGAIN) && io_uring_cq_ready(&r->ring) > 0))
    return throw_errno(env, "io_uring_enter", "io_uring_submit_and_wait", -ret);

  napi_value v;
  napi_create_uint32(env, reap_ready(r, out, cap), &v);
  return v;
}

// What registerFiles and registerBuffers both take: an array of at most max entries, given while nothing is in flight
// (the kernel may still be using what is registered). NULL after throwing.
static Ring *register_args(napi_env env, napi_callback_info info, const char *fn, const char *what, uint32_t max,
                           napi_value *array, uint32_t *n) {
  size_t argc = 1;
  napi_value argv[1] = {NULL};
  Ring *r = this_ring(env, info, &argc, argv, true);
  if (!r) return NULL;
  bool is = false;
  if (napi_is_array(env, argv[0], &is) != napi_ok || !is) {
    THROW_TYPE(env, "ERR_INVALID_ARG_TYPE", "%s: %s must be an array", fn, what);
    return NULL;
  }
  napi_get_array_length(env, argv[0], n);
  if (*n > max) {
    THROW_RANGE(env, "ERR_OUT_OF_RANGE", "%s: at most %u %s", fn, max, what);
    return NULL;
  }
  if (r->in_flight) {
    THROW(env, "ERR_URING_BUSY", "%s: %u requests in flight", fn, r->in_flight);
    return NULL;
  }
  *array = argv[0];
  return r;
}

static napi_value ring_register_files(napi_env env, napi_callback_info info) {
  napi_value array;
  uint32_t n = 0;
  Ring *r = register_args(env, info, "registerFiles", "fds", FILES_MAX, &array, &n);
  if (!r) return NULL;
  int fds[FILES_MAX];
  for (uint32_t i = 0; i < n; i++) {
    napi_value e;
    double fd;
    napi_get_element(env, array, i, &e);
    if (!arg_integer(env, e, "fd", 0, INT32_MAX, &fd)) return NULL;
    fds[i] = (int)fd;
  }
  if (r->file_count) {
    io_uring_unregister_files(&r->ring);
    r->file_count = 0;
  }
  if (n) {
    int ret = io_uring_register_files(&r->ring, fds, n);
    if (ret < 0) return throw_errno(env, "io_uring_register", "io_uring_register_files", -ret);
    memcpy(r->files, fds, n * sizeof *fds);
    r->file_count = n;
  }
  return undefined(env);
}

static napi_value ring_register_buffers(napi_env env, napi_callback_info info) {
  napi_value array;
  uint32_t n = 0;
  Ring *r = register_args(env, info, "registerBuffers", "views", BUFFERS_MAX, &array, &n);
  if (!r) return NULL;
  struct iovec iov[BUFFERS_MAX];
  napi_value views[BUFFERS_MAX];
  for (uint32_t i = 0; i < n; i++) {
    uint8_t *data, *base;
    size_t bytes;
    napi_get_element(env, array, i, &views[i]);
    if (!arg_view(env, views[i], "registerBuffers: view", &data, &bytes, &base)) return NULL;
    if (bytes == 0) return THROW_RANGE(env, "ERR_OUT_OF_RANGE", "registerBuffers: view %u is empty", i);
    iov[i] = (struct iovec){.iov_base = data, .iov_len = bytes};
  }
  if (r->buf_count) {
    io_uring_unregister_buffers(&r->ring);
    for (uint32_t i = 0; i < r->buf_count; i++) napi_delete_reference(env, r->buf_refs[i]);
    r->buf_count = 0;
  }
  if (n) {
    int ret = io_uring_register_buffers(&r->ring, iov, n);
    if (ret < 0) return throw_errno(env, "io_uring_register", "io_uring_register_buffers", -ret);
    for (uint32_t i = 0; i < n; i++) {
      napi_create_reference(env, views[i], 1, &r->buf_refs[i]);
      r->bufs[i] = iov[i];
    }
    r->buf_count = n;
  }
  return undefined(env);
}

static napi_value ring_close(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1] = {NULL};
  Ring *r = this_ring(env, info, &argc, argv, false);
  if (!r) return NULL;
  if (!r->live) return undefined(env);
  bool force = false;
  if (argc > 0 && arg_optional(env, argv[0])) napi_get_value_bool(env, argv[0], &force);
  if (r->in_flight && !force)
    return THROW(env, "ERR_URING_BUSY", "close: %u requests in flight; reap them first, or close(true) to wait for them",
                 r->in_flight);
  int ret = drain(r);
  if (ret < 0) return throw_errno(env, "io_uring_enter", "close: waiting for in-flight requests", -ret);
  destroy(env, r);
  return undefined(env);
}

#define GETTER(name, expr)                                                  \
  static napi_value name(napi_env env, napi_callback_info info) {           \
    size_t argc = 0;                                                        \
    Ring *r = this_ring(env, info, &argc, NULL, false);                     \
    if (!r) return NULL;                                                    \
    napi_value v;                                                           \
    expr;                                                                   \
    return v;                                                               \
  }
GETTER(get_in_flight, napi_create_uint32(env, r->in_flight, &v))
GETTER(get_queued, napi_create_uint32(env, r->queued, &v))
GETTER(get_depth, napi_create_uint32(env, r->depth, &v))
GETTER(get_block_bytes, napi_create_uint32(env, r->block_bytes, &v))
GETTER(get_closed, napi_get_boolean(env, !r->live, &v))

// setPipeSize(fd, bytes): fcntl(F_SETPIPE_SZ). Returns the pipe's new capacity; throws with errno (EBADF: not a
// pipe, EPERM: above /proc/sys/fs/pipe-max-size for an unprivileged process).
static napi_value set_pipe_size(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2] = {NULL, NULL};
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  double fd, bytes;
  if (!arg_integer(env, argv[0], "fd", 0, INT32_MAX, &fd)) return NULL;
  if (!arg_integer(env, argv[1], "bytes", 4096, INT32_MAX, &bytes)) return NULL;
  int got = fcntl((int)fd, F_SETPIPE_SZ, (int)bytes);
  if (got < 0) return throw_errno(env, "fcntl", "setPipeSize", errno);
  napi_value v;
  napi_create_int32(env, got, &v);
  return v;
}

// setBlocking(fd[, blocking]): clears O_NONBLOCK on fd's open file description (an accepted socket libuv made
// non-blocking, to be read with blocking reads by a stage thread), or with blocking false sets it again (before the
// socket is handed back to libuv, whose reads must not block). Throws with errno.
static napi_value set_blocking(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2] = {NULL, NULL};
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  double fd;
  if (!arg_integer(env, argv[0], "fd", 0, INT32_MAX, &fd)) return NULL;
  bool blocking = true;
  napi_valuetype t = napi_undefined;
  if (argc > 1 && napi_typeof(env, argv[1], &t) == napi_ok && t != napi_undefined &&
      napi_get_value_bool(env, argv[1], &blocking) != napi_ok) {
    napi_throw_type_error(env, NULL, "setBlocking: blocking must be a boolean");
    return NULL;
  }
  int flags = fcntl((int)fd, F_GETFL);
  if (flags < 0) return throw_errno(env, "fcntl", "setBlocking", errno);
  int want = blocking ? flags & ~O_NONBLOCK : flags | O_NONBLOCK;
  if (want != flags && fcntl((int)fd, F_SETFL, want) < 0) return throw_errno(env, "fcntl", "setBlocking", errno);
  return undefined(env);
}

// shutdownSocket(fd): shutdown(SHUT_RDWR), which wakes a read blocked on the socket in another thread (closing the
// fd would not). Throws with errno (ENOTSOCK, ENOTCONN).
static napi_value shutdown_socket(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1] = {NULL};
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  double fd;
  if (!arg_integer(env, argv[0], "fd", 0, INT32_MAX, &fd)) return NULL;
  if (shutdown((int)fd, SHUT_RDWR) < 0) return throw_errno(env, "shutdown", "shutdownSocket", errno);
  return undefined(env);
}

// recv(flags | MSG_DONTWAIT) into the buffer argument: how many bytes (0: the peer closed the socket), or -1 when
// none are waiting yet. Never blocks, whatever the socket's own mode. Throws with errno.
static napi_value recv_now(napi_env env, napi_callback_info info, int flags, const char *name) {
  size_t argc = 2;
  napi_value argv[2] = {NULL, NULL};
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  double fd;
  uint8_t *data, *base;
  size_t bytes;
  if (!arg_integer(env, argv[0], "fd", 0, INT32_MAX, &fd)) return NULL;
  if (!arg_view(env, argv[1], "buffer", &data, &bytes, &base)) return NULL;
  ssize_t got = bytes == 0 ? 0 : recv((int)fd, data, bytes, flags | MSG_DONTWAIT);
  if (got < 0 && errno != EAGAIN && errno != EWOULDBLOCK) return throw_errno(env, "recv", name, errno);
  napi_value v;
  napi_create_int32(env, got < 0 ? -1 : (int32_t)got, &v);
  return v;
}

// peekSocket(fd, buffer): the bytes waiting on a socket, copied and left there for whoever reads it next (MSG_PEEK).
static napi_value peek_socket(napi_env env, napi_callback_info info) {
  return recv_now(env, info, MSG_PEEK, "peekSocket");
}

// recvSocket(fd, buffer): the bytes waiting on a socket, taken, without blocking: load --connect reads QEMU's
// return path from the socket it writes the stream to with blocking writes.
static napi_value recv_socket(napi_env env, napi_callback_info info) {
  return recv_now(env, info, 0, "recvSocket");
}

// setSendBuffer(fd, bytes): the socket's send buffer (SO_SNDBUFFORCE as root, past net.core.wmem_max; else
// SO_SNDBUF, capped by it). Returns the size the kernel then reports (it doubles what it was given). Throws with errno.
static napi_value set_send_buffer(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2] = {NULL, NULL};
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  double fd, bytes;
  if (!arg_integer(env, argv[0], "fd", 0, INT32_MAX, &fd)) return NULL;
  if (!arg_integer(env, argv[1], "bytes", 4096, 1 << 30, &bytes)) return NULL;
  int v = (int)bytes;
  if (setsockopt((int)fd, SOL_SOCKET, SO_SNDBUFFORCE, &v, sizeof v) < 0 &&
      setsockopt((int)fd, SOL_SOCKET, SO_SNDBUF, &v, sizeof v) < 0)
    return throw_errno(env, "setsockopt", "setSendBuffer", errno);
  int got = 0;
  socklen_t len = sizeof got;
  if (getsockopt((int)fd, SOL_SOCKET, SO_SNDBUF, &got, &len) < 0) return throw_errno(env, "getsockopt", "setSendBuffer", errno);
  napi_value out;
  napi_create_int32(env, got, &out);
  return out;
}

NAPI_MODULE_INIT() {
  napi_property_descriptor props[] = {
      {"prepWrite", NULL, ring_prep_write, NULL, NULL, NULL, napi_default_method, NULL},
      {"prepRead", NULL, ring_prep_read, NULL, NULL, NULL, napi_default_method, NULL},
      {"submit", NULL, ring_submit, NULL, NULL, NULL, napi_default_method, NULL},
      {"wait", NULL, ring_wait, NULL, NULL, NULL, napi_default_method, NULL},
      {"registerFiles", NULL, ring_register_files, NULL, NULL, NULL, napi_default_method, NULL},
      {"registerBuffers", NULL, ring_register_buffers, NULL, NULL, NULL, napi_default_method, NULL},
      {"close", NULL, ring_close, NULL, NULL, NULL, napi_default_method, NULL},
      {"inFlight", NULL, NULL, get_in_flight, NULL, NULL, napi_default, NULL},
      {"queued", NULL, NULL, get_queued, NULL, NULL, napi_default, NULL},
      {"depth", NULL, NULL, get_depth, NULL, NULL, napi_default, NULL},
      {"blockBytes", NULL, NULL, get_block_bytes, NULL, NULL, napi_default, NULL},
      {"closed", NULL, NULL, get_closed, NULL, NULL, napi_default, NULL},
  };
  napi_value ctor;
  if (napi_define_class(env, "Ring", NAPI_AUTO_LENGTH, ring_new, NULL, sizeof props / sizeof *props, props, &ctor) !=
          napi_ok ||
      napi_set_named_property(env, exports, "Ring", ctor) != napi_ok)
    return NULL;
  napi_value fn;
  if (napi_create_function(env, "setPipeSize", NAPI_AUTO_LENGTH, set_pipe_size, NULL, &fn) != napi_ok ||
      napi_set_named_property(env, exports, "setPipeSize", fn) != napi_ok)
    return NULL;
  if (napi_create_function(env, "setBlocking", NAPI_AUTO_LENGTH, set_blocking, NULL, &fn) != napi_ok ||
      napi_set_named_property(env, exports, "setBlocking", fn) != napi_ok)
    return NULL;
  if (napi_create_function(env, "shutdownSocket", NAPI_AUTO_LENGTH, shutdown_socket, NULL, &fn) != napi_ok ||
      napi_set_named_property(env, exports, "shutdownSocket", fn) != napi_ok)
    return NULL;
  if (napi_create_function(env, "peekSocket", NAPI_AUTO_LENGTH, peek_socket, NULL, &fn) != napi_ok ||
      napi_set_named_property(env, exports, "peekSocket", fn) != napi_ok)
    return NULL;
  if (napi_create_function(env, "recvSocket", NAPI_AUTO_LENGTH, recv_socket, NULL, &fn) != napi_ok ||
      napi_set_named_property(env, exports, "recvSocket", fn) != napi_ok)
    return NULL;
  if (napi_create_function(env, "setSendBuffer", NAPI_AUTO_LENGTH, set_send_buffer, NULL, &fn) != napi_ok ||
      napi_set_named_property(env, exports, "setSendBuffer", fn) != napi_ok)
    return NULL;
  return exports;
}
