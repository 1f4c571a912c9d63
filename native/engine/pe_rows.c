// Row kernels (see pe_rows.h). The wide loops (copies, casts, float32 reductions) are compiled for
// AVX-512 (x86-64-v4, with GCC 11 and later), AVX2 and the baseline, picked at load time (the FP8
// cast runs 1.5x faster with AVX-512 than with AVX2 here; the memory-bound loops gain little);
// contraction into FMA is off (-ffp-contract=off) so that a reduction rounds exactly as the
// reference's multiply-then-add does.
#include "pe_rows.h"

#include <math.h>
#include <string.h>
#if defined(__x86_64__)
#include <emmintrin.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define PE_WIDE __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PE_WIDE __attribute__((target_clones("avx2", "default")))
#else
#define PE_WIDE
#endif

int pe_type_size(int type) {
  switch (type) {
    case PE_U8:
      return 1;
    case PE_BF16:
    case PE_F16:
      return 2;
    case PE_I32:
    case PE_F32:
      return 4;
    case PE_I64:
      return 8;
    default:
      return 0;
  }
}

int64_t pe_fields_wire_bytes(const pe_field_t *fields, int nfields) {
  int64_t bytes = 0;
  for (int i = 0; i < nfields; ++i) bytes += (int64_t)fields[i].count * pe_type_size(fields[i].wire_type);
  return bytes;
}

int pe_fields_check(const pe_field_t *fields, int nfields, int sending, char *err) {
  for (int i = 0; i < nfields; ++i) {
    const pe_field_t *f = &fields[i];
    if (pe_type_size(f->wire_type) == 0 || f->count < 0) {
      pe_err(err, "field %d: bad wire type %d or count %d", i, f->wire_type, f->count);
      return -1;
    }
    int ok;
    switch (f->kind) {
      case PE_GATHER:
        ok = sending && (f->mem_type == f->wire_type ||
                         (f->mem_type == PE_F32 && (f->wire_type == PE_BF16 || f->wire_type == PE_F16)));
        break;
      case PE_ROW_INDEX:
        ok = sending && (f->wire_type == PE_I32 || f->wire_type == PE_I64) && f->count == 1;
        break;
      case PE_SCATTER:
        ok = !sending && f->mem_type == f->wire_type;
        break;
      case PE_REDUCE:
        ok = !sending && f->mem_type == PE_F32 && f->elem_stride == 4 &&
             (f->wire_type == PE_BF16 || f->wire_type == PE_F16 || f->wire_type == PE_F32);
        break;
      case PE_SKIP:
        ok = 1;
        break;
      default:
        ok = 0;
    }
    if (!ok) {
      pe_err(err, "field %d: kind %d cannot take %s type %d to type %d", i, f->kind, sending ? "send" : "receive",
             f->mem_type, f->wire_type);
      return -1;
    }
  }
  return 0;
}

// --------------------------------------------------------------------------------- conversions
static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

static inline float f16_to_f32(uint16_t h) {
  _Float16 v;
  memcpy(&v, &h, sizeof v);
  return (float)v;
}

static inline uint16_t f32_to_f16(float f) {
  _Float16 v = (_Float16)f;
  uint16_t h;
  memcpy(&h, &v, sizeof h);
  return h;
}

PE_WIDE static void cast_to_bf16(uint16_t *restrict dst, const float *restrict src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

PE_WIDE static void cast_to_f16(uint16_t *restrict dst, const float *restrict src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_f16(src[i]);
}

void pe_cast_f32(void *dst, int dst_type, const float *src, int64_t n) {
  if (dst_type == PE_BF16)
    cast_to_bf16(dst, src, n);
  else if (dst_type == PE_F16)
    cast_to_f16(dst, src, n);
  else if (dst_type == PE_F32 && dst != (const void *)src)
    memmove(dst, src, (size_t)n * sizeof(float));
}

void pe_finish_rows(void *dst, int dst_type, const float *acc, const uint8_t *touched, int64_t rows, int64_t width) {
  const size_t size = (size_t)pe_type_size(dst_type);
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t *out = (uint8_t *)dst + (size_t)(r * width) * size;
    if (touched[r] == 1)
      pe_cast_f32(out, dst_type, acc + r * width, width);
    else if (touched[r] == 0)
      memset(out, 0, (size_t)width * size);  // all-zero bits are 0.0 in every float type
    // touched[r] == 2: the engine wrote the row's final value already
  }
}

// A copy into an output nobody reads soon (PE_FIELD_STREAM): non-temporal stores where the target
// has them, which skip reading the destination lines into the cache first. pe_stream_fence()
// orders them before anything that says the rows are there.
#define STREAM_MIN_BYTES 2048

static void stream_copy(uint8_t *restrict dst, const uint8_t *restrict src, size_t n) {
#if defined(__x86_64__)
  if (n >= STREAM_MIN_BYTES) {
    const size_t head = (16 - ((uintptr_t)dst & 15)) & 15;
    memcpy(dst, src, head);
    dst += head;
    src += head;
    n -= head;
    for (; n >= 64; n -= 64, dst += 64, src += 64) {
      const __m128i a = _mm_loadu_si128((const __m128i *)src), b = _mm_loadu_si128((const __m128i *)(src + 16));
      const __m128i c = _mm_loadu_si128((const __m128i *)(src + 32)), d = _mm_loadu_si128((const __m128i *)(src + 48));
      _mm_stream_si128((__m128i *)dst, a);
      _mm_stream_si128((__m128i *)(dst + 16), b);
      _mm_stream_si128((__m128i *)(dst + 32), c);
      _mm_stream_si128((__m128i *)(dst + 48), d);
    }
  }
#endif
  memcpy(dst, src, n);
}

void pe_stream_fence(void) {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

static void strided_copy(uint8_t *dst, int64_t dst_stride, const uint8_t *src, int64_t src_stride, int count,
                         int size) {
  for (int j = 0; j < count; ++j) memcpy(dst + j * dst_stride, src + j * src_stride, (size_t)size);
}

// ------------------------------------------------------------------------------------ rows
static inline uint8_t *row_at(const pe_field_t *f, int64_t r) {
  uint8_t *base = (uint8_t *)(uintptr_t)f->base;
  if (f->block_rows > 0) return base + (r / f->block_rows) * f->block_stride + (r % f->block_rows) * f->row_stride;
  return base + r * f->row_stride;
}

void pe_gather_row(const pe_field_t *fields, int nfields, int64_t index, uint8_t *dst) {
  for (int i = 0; i < nfields; ++i) {
    const pe_field_t *f = &fields[i];
    const int wsize = pe_type_size(f->wire_type);
    const int64_t width = (int64_t)f->count * wsize;
    const uint8_t *src = row_at(f, index);
    if (f->kind == PE_GATHER) {
      if (f->mem_type == f->wire_type) {
        if (f->elem_stride == wsize)
          memcpy(dst, src, (size_t)width);
        else
          strided_copy(dst, wsize, src, f->elem_stride, f->count, wsize);
      } else if (f->elem_stride == 4) {
        if (f->wire_type == PE_BF16)
          cast_to_bf16((uint16_t *)dst, (const float *)src, f->count);
        else
          cast_to_f16((uint16_t *)dst, (const float *)src, f->count);
      } else {
        for (int j = 0; j < f->count; ++j) {
          float v;
          memcpy(&v, src + j * f->elem_stride, sizeof v);
          uint16_t h = f->wire_type == PE_BF16 ? f32_to_bf16(v) : f32_to_f16(v);
          memcpy(dst + 2 * j, &h, 2);
        }
      }
    } else if (f->kind == PE_ROW_INDEX) {
      if (f->wire_type == PE_I32) {
        int32_t v = (int32_t)index;
        memcpy(dst, &v, sizeof v);
      } else {
        memcpy(dst, &index, sizeof index);
      }
    }
    dst += width;
  }
}

const uint8_t *pe_source_row(const pe_field_t *fields, int nfields, int64_t index, int64_t row_bytes) {
  if (nfields != 1) return NULL;
  const int size = pe_type_size(fields->wire_type);
  if (fields->kind != PE_GATHER || fields->mem_type != fields->wire_type || fields->elem_stride != size ||
      (int64_t)fields->count * size != row_bytes)
    return NULL;
  return row_at(fields, index);
}

void pe_scatter_row(const pe_field_t *fields, int nfields, int64_t index, float weight, int store,
                    const uint8_t *src) {
  for (int i = 0; i < nfields; ++i) {
    const pe_field_t *f = &fields[i];
    const int wsize = pe_type_size(f->wire_type);
    const int64_t width = (int64_t)f->count * wsize;
    uint8_t *dst = row_at(f, index);
    if (f->kind == PE_SCATTER) {
      if (f->elem_stride != wsize)
        strided_copy(dst, f->elem_stride, src, wsize, f->count, wsize);
      else if (f->flags & PE_FIELD_STREAM)
        stream_copy(dst, src, (size_t)width);
      else
        memcpy(dst, src, (size_t)width);
    } else if (f->kind == PE_REDUCE) {  // a run of one row
      pe_reduce_rows(f, 1, index, &weight, store, src, width, 1, NULL, 0.0f, NULL);
    }
    src += width;
  }
}

int pe_fields_reduce_only(const pe_field_t *fields, int nfields) {
  for (int i = 0; i < nfields; ++i)
    if (fields[i].kind != PE_REDUCE && fields[i].kind != PE_SKIP) return 0;
  return 1;
}

#define RUN_BLOCK 512  // float32 accumulator elements summed at a time (2 KiB: stays in L1)

// A final block of sums to the destination row, cast to its type.
static void put_final(uint8_t *restrict out, int out_type, int64_t c, const float *sum, int64_t m) {
  if (out_type == PE_BF16)
    cast_to_bf16((uint16_t *)out + c, sum, m);
  else if (out_type == PE_F16)
    cast_to_f16((uint16_t *)out + c, sum, m);
  else
    memcpy((float *)out + c, sum, (size_t)m * sizeof(float));
}

// A run's sums, block by block: (store ? 0 : acc) + sum over rows r of w[r] * row r (rows `stride`
// bytes apart, elements of TYPE read by LOAD), in row order, after `lead` (weight `wl`) if given;
// summed in the accumulator's block itself (it stays in L1), or in a buffer: then cast into `out`
// for a final row, or, for a row's first sum with `stream`, streamed into the accumulator (its lines
// are not read first). Per wire type, so that each loop vectorizes.
#define PE_REDUCE_RUN(name, TYPE, LOAD)                                                                        \
  PE_WIDE static void name(float *restrict acc, const uint8_t *restrict src, int64_t stride,                   \
                           const float *restrict w, int64_t nrows, const uint8_t *restrict lead, float wl,     \
                           int store, int stream, int64_t n, uint8_t *restrict out, int out_type) {            \
    float buffer[RUN_BLOCK];                                                                                   \
    for (int64_t c = 0; c < n; c += RUN_BLOCK) {                                                               \
      const int64_t m = n - c < RUN_BLOCK ? n - c : RUN_BLOCK;                                                 \
      float *sum = out != NULL || (store && stream) ? buffer : acc + c;                                        \
      const TYPE *first = lead != NULL ? (const TYPE *)lead + c : (const TYPE *)src + c;                       \
      const float w0 = lead != NULL ? wl : w ? w[0] : 1.0f;                                                    \
      if (store) {                                                                                             \
        for (int64_t i = 0; i < m; ++i) sum[i] = w0 * LOAD(first[i]);                                          \
      } else if (out == NULL) { /* sum is the accumulator's block */                                           \
        for (int64_t i = 0; i < m; ++i) sum[i] += w0 * LOAD(first[i]);                                         \
      } else {                                                                                                 \
        for (int64_t i = 0; i < m; ++i) sum[i] = acc[c + i] + w0 * LOAD(first[i]);                             \
      }                                                                                                        \
      for (int64_t r = lead != NULL ? 0 : 1; r < nrows; ++r) {                                                 \
        const TYPE *row = (const TYPE *)(src + r * stride) + c;                                                \
        const float wr = w ? w[r] : 1.0f;                                                                      \
        for (int64_t i = 0; i < m; ++i) sum[i] += wr * LOAD(row[i]);                                           \
      }                                                                                                        \
      if (out != NULL)                                                                                         \
        put_final(out, out_type, c, sum, m);                                                                   \
      else if (sum == buffer)                                                                                  \
        stream_copy((uint8_t *)(acc + c), (const uint8_t *)buffer, (size_t)m * sizeof(float));                 \
    }                                                                                                          \
  }

static inline float f32_identity(float v) { return v; }
PE_REDUCE_RUN(reduce_run_bf16, uint16_t, bf16_to_f32)
PE_REDUCE_RUN(reduce_run_f16, uint16_t, f16_to_f32)
PE_REDUCE_RUN(reduce_run_f32, float, f32_identity)

void pe_reduce_rows(const pe_field_t *fields, int nfields, int64_t index, const float *weights, int store,
                    const uint8_t *src, int64_t row_bytes, int64_t nrows, const uint8_t *lead, float lead_weight,
                    const pe_field_t *final) {
  int64_t offset = 0;
  for (int i = 0; i < nfields; ++i) {
    const pe_field_t *f = &fields[i];
    if (f->kind == PE_REDUCE) {
      float *acc = (float *)row_at(f, index);
      uint8_t *out = final != NULL ? row_at(&final[i], index) : NULL;
      const int out_type = final != NULL ? final[i].mem_type : PE_F32;
      const uint8_t *lead_field = lead != NULL ? lead + offset : NULL;
      const int stream = (f->flags & PE_FIELD_STREAM) != 0;
      if (f->wire_type == PE_BF16)
        reduce_run_bf16(acc, src + offset, row_bytes, weights, nrows, lead_field, lead_weight, store, stream,
                        f->count, out, out_type);
      else if (f->wire_type == PE_F16)
        reduce_run_f16(acc, src + offset, row_bytes, weights, nrows, lead_field, lead_weight, store, stream,
                       f->count, out, out_type);
      else
        reduce_run_f32(acc, src + offset, row_bytes, weights, nrows, lead_field, lead_weight, store, stream,
                       f->count, out, out_type);
    }
    offset += (int64_t)f->count * pe_type_size(f->wire_type);
  }
}

static int float_type(int type) { return type == PE_BF16 || type == PE_F16 || type == PE_F32; }

int pe_fields_summable(const pe_field_t *fields, int nfields) {
  for (int i = 0; i < nfields; ++i) {
    const pe_field_t *f = &fields[i];
    if (f->kind != PE_GATHER || !float_type(f->mem_type) || !float_type(f->wire_type) ||
        f->elem_stride != pe_type_size(f->mem_type))
      return 0;
  }
  return 1;
}

// The weighted sum of rows[0..nrows) (elements of TYPE read by LOAD, from byte `at` of each row)
// into `out` (elements of OTYPE written by STORE), float32 in row order. Up to three rows are summed
// in registers, element by element, and cast as they go: one sweep over the rows and none over a
// buffer (1.5x the speed of summing row by row into an L1 buffer). More rows go block by block
// through a float32 buffer that stays in L1, the last one summed and cast in the same sweep.
#define PE_SUM_ROWS(name, TYPE, LOAD, OTYPE, STORE)                                                            \
  PE_WIDE static void name(const uint8_t *const *rows, int64_t at, const float *restrict w, int64_t nrows,    \
                           int64_t n, OTYPE *restrict out) {                                                   \
    const TYPE *a = nrows > 0 ? (const TYPE *)(rows[0] + at) : NULL;                                           \
    const TYPE *b = nrows > 1 ? (const TYPE *)(rows[1] + at) : NULL;                                           \
    const TYPE *c = nrows > 2 ? (const TYPE *)(rows[2] + at) : NULL;                                           \
    const float wa = nrows > 0 ? w[0] : 0.0f, wb = nrows > 1 ? w[1] : 0.0f, wc = nrows > 2 ? w[2] : 0.0f;      \
    if (nrows == 0) {                                                                                          \
      for (int64_t i = 0; i < n; ++i) out[i] = STORE(0.0f);                                                    \
    } else if (nrows == 1) {                                                                                   \
      for (int64_t i = 0; i < n; ++i) out[i] = STORE(wa * LOAD(a[i]));                                         \
    } else if (nrows == 2) {                                                                                   \
      for (int64_t i = 0; i < n; ++i) {                                                                        \
        const float s = wa * LOAD(a[i]);                                                                       \
        out[i] = STORE(s + wb * LOAD(b[i]));                                                                   \
      }                                                                                                        \
    } else if (nrows == 3) {                                                                                   \
      for (int64_t i = 0; i < n; ++i) {                                                                        \
        float s = wa * LOAD(a[i]);                                                                             \
        s += wb * LOAD(b[i]);                                                                                  \
        out[i] = STORE(s + wc * LOAD(c[i]));                                                                   \
      }                                                                                                        \
    } else {                                                                                                   \
      float sum[RUN_BLOCK];                                                                                    \
      const TYPE *z = (const TYPE *)(rows[nrows - 1] + at);                                                    \
      const float wz = w[nrows - 1];                                                                           \
      for (int64_t k = 0; k < n; k += RUN_BLOCK) {                                                             \
        const int64_t m = n - k < RUN_BLOCK ? n - k : RUN_BLOCK;                                               \
        for (int64_t i = 0; i < m; ++i) {                                                                      \
          float s = wa * LOAD(a[k + i]);                                                                       \
          s += wb * LOAD(b[k + i]);                                                                            \
          sum[i] = s + wc * LOAD(c[k + i]);                                                                    \
        }                                                                                                      \
        for (int64_t r = 3; r < nrows - 1; ++r) {                                                              \
          const TYPE *row = (const TYPE *)(rows[r] + at) + k;                                                  \
          const float wr = w[r];                                                                               \
          for (int64_t i = 0; i < m; ++i) sum[i] += wr * LOAD(row[i]);                                         \
        }                                                                                                      \
        for (int64_t i = 0; i < m; ++i) out[k + i] = STORE(sum[i] + wz * LOAD(z[k + i]));                      \
      }                                                                                                        \
    }                                                                                                          \
  }

PE_SUM_ROWS(sum_rows_bf16, uint16_t, bf16_to_f32, uint16_t, f32_to_bf16)
PE_SUM_ROWS(sum_rows_f16, uint16_t, f16_to_f32, uint16_t, f32_to_f16)
PE_SUM_ROWS(sum_rows_f32, float, f32_identity, float, f32_identity)
PE_SUM_ROWS(sum_rows_f32_bf16, float, f32_identity, uint16_t, f32_to_bf16)
PE_SUM_ROWS(sum_rows_f32_f16, float, f32_identity, uint16_t, f32_to_f16)

int pe_sum_types(int in_type, int out_type) {
  return in_type == out_type ? float_type(in_type) : in_type == PE_F32 && (out_type == PE_BF16 || out_type == PE_F16);
}

// Elements `at` bytes into each row of `rows`, of in_type, summed into `out` of out_type (a pair
// pe_sum_types accepts).
static void sum_rows(int in_type, int out_type, const uint8_t *const *rows, int64_t at, const float *weights,
                     int64_t nrows, int64_t n, uint8_t *out) {
  if (in_type == PE_BF16)
    sum_rows_bf16(rows, at, weights, nrows, n, (uint16_t *)out);
  else if (in_type == PE_F16)
    sum_rows_f16(rows, at, weights, nrows, n, (uint16_t *)out);
  else if (out_type == PE_BF16)
    sum_rows_f32_bf16(rows, at, weights, nrows, n, (uint16_t *)out);
  else if (out_type == PE_F16)
    sum_rows_f32_f16(rows, at, weights, nrows, n, (uint16_t *)out);
  else
    sum_rows_f32(rows, at, weights, nrows, n, (float *)out);
}

static void add_row(float *restrict sum, const uint8_t *restrict row, int type, float w, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const float v = type == PE_BF16   ? bf16_to_f32(((const uint16_t *)row)[k])
                    : type == PE_F16 ? f16_to_f32(((const uint16_t *)row)[k])
                                     : ((const float *)row)[k];
    sum[k] += w * v;
  }
}

#define SUM_BATCH 64  // source rows whose addresses a gathered sum collects at a time

void pe_gather_sum(const pe_field_t *fields, int nfields, const int64_t *index, const float *weights, int64_t n,
                   uint8_t *dst) {
  const uint8_t *rows[SUM_BATCH];
  for (int i = 0; i < nfields; ++i) {
    const pe_field_t *f = &fields[i];
    if (n <= SUM_BATCH) {
      for (int64_t r = 0; r < n; ++r) rows[r] = row_at(f, index[r]);
      sum_rows(f->mem_type, f->wire_type, rows, 0, weights, n, f->count, dst);
    } else {  // rare: more rows than a batch, added one by one, block by block
      const int wsize = pe_type_size(f->mem_type);
      float sum[RUN_BLOCK];
      for (int64_t c = 0; c < f->count; c += RUN_BLOCK) {
        const int64_t m = f->count - c < RUN_BLOCK ? f->count - c : RUN_BLOCK;
        memset(sum, 0, sizeof sum);
        for (int64_t r = 0; r < n; ++r) add_row(sum, row_at(f, index[r]) + c * wsize, f->mem_type, weights[r], m);
        pe_cast_f32(dst + c * pe_type_size(f->wire_type), f->wire_type, sum, m);
      }
    }
    dst += (int64_t)f->count * pe_type_size(f->wire_type);
  }
}

void pe_sum_final(const pe_field_t *fields, int nfields, const pe_field_t *final, int64_t index,
                  const uint8_t *const *rows, const float *weights, int64_t nrows) {
  int64_t at = 0;
  for (int i = 0; i < nfields; ++i) {
    const pe_field_t *f = &fields[i];
    if (f->kind == PE_REDUCE)
      sum_rows(f->wire_type, final[i].mem_type, rows, at, weights, nrows, f->count, row_at(&final[i], index));
    at += (int64_t)f->count * pe_type_size(f->wire_type);
  }
}

// ------------------------------------------------------------------------------------ FP8 cast
// float -> e4m3fn with round-to-nearest-even, as c10's fp8e4m3fn_from_fp32_value: magnitudes from
// 480 up become NaN (0x7f), the smallest ones subnormals. Branch-free (masks instead of tests) so
// that the loops over a group vectorize.
static inline uint32_t e4m3_bits(uint32_t bits) {
  const uint32_t sign = bits & 0x80000000u;
  bits ^= sign;
  // subnormal results: add 2^-... so that the float adder rounds, then take the low bits
  const uint32_t denorm_mask = 141u << 23;
  float magnitude, mask;
  memcpy(&magnitude, &bits, sizeof magnitude);
  memcpy(&mask, &denorm_mask, sizeof mask);
  const float sum = magnitude + mask;
  uint32_t sum_bits;
  memcpy(&sum_bits, &sum, sizeof sum_bits);
  const uint32_t subnormal = (sum_bits - denorm_mask) & 0xffu;
  // normal results: round the mantissa to 3 bits, to nearest even, and rebias the exponent
  const uint32_t mant_odd = (bits >> 20) & 1u;
  const uint32_t normal = ((bits + ((uint32_t)(7 - 127) << 23) + 0x7ffffu + mant_odd) >> 20) & 0xffu;
  const uint32_t is_subnormal = 0u - (uint32_t)(bits < (121u << 23));
  const uint32_t is_nan = 0u - (uint32_t)(bits >= (1087u << 20));  // from 480 up, and NaN
  uint32_t out = (subnormal & is_subnormal) | (normal & ~is_subnormal);
  out = (0x7fu & is_nan) | (out & ~is_nan);
  return out | (sign >> 24);
}

PE_WIDE static void fp8_cast_group(const float *restrict values, float scale, uint8_t *restrict dst) {
  float scaled[128];
  uint32_t bits[128];
  for (int j = 0; j < 128; ++j) scaled[j] = values[j] * scale;
  memcpy(bits, scaled, sizeof bits);
  for (int j = 0; j < 128; ++j) dst[j] = (uint8_t)e4m3_bits(bits[j]);
}

// The group's elements as float, and their largest magnitude (compared as integers: for finite
// non-negative floats the bit patterns order as the values do, so the loop vectorizes).
PE_WIDE static float group_to_f32(const uint8_t *restrict src, int type, float *restrict values) {
  if (type == PE_BF16) {
    const uint16_t *h = (const uint16_t *)src;
    for (int j = 0; j < 128; ++j) values[j] = bf16_to_f32(h[j]);
  } else if (type == PE_F16) {
    const uint16_t *h = (const uint16_t *)src;
    for (int j = 0; j < 128; ++j) values[j] = f16_to_f32(h[j]);
  } else {
    memcpy(values, src, 128 * sizeof(float));
  }
  uint32_t bits[128];
  memcpy(bits, values, sizeof bits);
  uint32_t top = 0;
  for (int j = 0; j < 128; ++j) {
    const uint32_t magnitude = bits[j] & 0x7fffffffu;
    top = magnitude > top ? magnitude : top;
  }
  float amax;
  memcpy(&amax, &top, sizeof amax);
  return amax;
}

void pe_fp8_cast(const void *x, int type, int64_t rows, int64_t hidden, int64_t row_stride, uint8_t *out,
                 float *scales, int round_scale) {
  const int64_t groups = hidden / 128;
  const int size = pe_type_size(type);
  float values[128] __attribute__((aligned(64)));
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t *row = (const uint8_t *)x + r * row_stride;
    for (int64_t g = 0; g < groups; ++g) {
      float amax = group_to_f32(row + g * 128 * size, type, values);
      amax = amax > 1e-4f ? amax : 1e-4f;  // clamp(min=1e-4)
      float scale, scale_inv;
      if (round_scale) {
        scale_inv = exp2f(ceilf(log2f(amax / 448.0f)));
        scale = 1.0f / scale_inv;
      } else {
        scale = (1.0f / amax) * 448.0f;  // torch's scalar / tensor: a reciprocal, then a product
        scale_inv = amax / 448.0f;
      }
      fp8_cast_group(values, scale, out + r * hidden + g * 128);
      scales[r * groups + g] = scale_inv;
    }
  }
}
