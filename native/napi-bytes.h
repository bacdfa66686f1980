// Shared by snap-pipe's addons (uring.c, fastmem.c): the size of one element of a TypedArray, so that a view's
// length in elements becomes its length in bytes.
#ifndef SNAP_PIPE_NAPI_BYTES_H
#define SNAP_PIPE_NAPI_BYTES_H

#include <node_api.h>
#include <stddef.h>

static inline size_t element_bytes(napi_typedarray_type type) {
  switch (type) {
    case napi_int16_array: case napi_uint16_array: return 2;
    case napi_int32_array: case napi_uint32_array: case napi_float32_array: return 4;
    case napi_float64_array: case napi_bigint64_array: case napi_biguint64_array: return 8;
    default: return 1;
  }
}

#endif
