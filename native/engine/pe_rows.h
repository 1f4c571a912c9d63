// Row kernels of the engine: gather a row from the caller's tensors into wire bytes, and scatter or
// reduce wire bytes into the caller's tensors, field by field (see pe_field_t in pe_engine.h).
#pragma once

#include <stdint.h>

#include "pe_engine.h"

// Wire bytes of one row of `fields` (sum over fields of count * size of wire_type).
int64_t pe_fields_wire_bytes(const pe_field_t *fields, int nfields);
int pe_type_size(int type);
// Check a field list for a send (`sending`) or a receive; 0 or -1 with `err`.
int pe_fields_check(const pe_field_t *fields, int nfields, int sending, char *err);
// Write source row `index` as wire bytes at `dst`.
void pe_gather_row(const pe_field_t *fields, int nfields, int64_t index, uint8_t *dst);
// Whether every field is a PE_GATHER of float rows (BF16, F16, F32; contiguous): rows of it can be
// summed (pe_gather_sum).
int pe_fields_summable(const pe_field_t *fields, int nfields);
// Write the weighted sum of source rows index[0..n) (weights[j] each) as one wire row at `dst`:
// float32 sums in index order, cast to each field's wire type (zeros for n = 0).
void pe_gather_sum(const pe_field_t *fields, int nfields, const int64_t *index, const float *weights, int64_t n,
                   uint8_t *dst);
// Whether pe_sum_final can sum wire elements of `in_type` into a final field of `out_type`.
int pe_sum_types(int in_type, int out_type);
// Write the sum of wire rows rows[0..nrows) (weights[j] each), float32 in row order, straight into
// destination row `index` of the final fields (one per field; the accumulators are not touched).
void pe_sum_final(const pe_field_t *fields, int nfields, const pe_field_t *final, int64_t index,
                  const uint8_t *const *rows, const float *weights, int64_t nrows);
// Source row `index` itself when it already is the wire row (one field, a plain contiguous copy of
// `row_bytes`): a rank's rows to itself are then applied straight from it. NULL otherwise.
const uint8_t *pe_source_row(const pe_field_t *fields, int nfields, int64_t index, int64_t row_bytes);
// Apply the wire bytes at `src` to destination row `index` (scatter, or reduce with `weight`:
// pe_reduce_rows on a run of one; `store`: the row's first contribution, written instead of added).
void pe_scatter_row(const pe_field_t *fields, int nfields, int64_t index, float weight, int store,
                    const uint8_t *src);
// Whether every field reduces (or skips): rows that only reduce can be summed as runs.
int pe_fields_reduce_only(const pe_field_t *fields, int nfields);
// Reduce `nrows` rows of wire bytes (at `src`, `row_bytes` apart), weighted by weights[i] (or 1),
// into destination row `index`: (store ? 0 : accumulator) + each row times its weight, in row
// order (the same sums as adding the rows one by one), with the accumulator read and written once:
// the rows are summed block by block while the block stays in L1.
// With `lead` (a wire row, weight `lead_weight`), that row is summed first, before the `nrows`
// (which may then be 0). With `final` (one field per field, as pe_final_t's), the sum is written,
// cast, to row `index` of those instead of the accumulator.
void pe_reduce_rows(const pe_field_t *fields, int nfields, int64_t index, const float *weights, int store,
                    const uint8_t *src, int64_t row_bytes, int64_t nrows, const uint8_t *lead, float lead_weight,
                    const pe_field_t *final);

// Orders the non-temporal stores of earlier scatters (large copies bypass the cache) before
// what follows: call it before anything that tells a reader the rows are there.
void pe_stream_fence(void);

// The end of a sum of `rows` rows of `width`: dst row r = acc row r where touched[r] is 1, zeros
// where it is 0 (a row no copy reached), in dst_type (BF16, F16 or F32); rows whose touched[r] is
// 2 are final in dst already (pe_final_t) and left as they are.
void pe_finish_rows(void *dst, int dst_type, const float *acc, const uint8_t *touched, int64_t rows, int64_t width);

// Per-token, per-128-channel cast to e4m3 (x: `rows` rows of `hidden` elements of `type`, rows
// `row_stride` bytes apart): out = e4m3(x * scale) with scale = (1 / amax) * 448 (amax clamped to 1e-4),
// scales = 1 / scale (a power of two with `round_scale`), exactly as portep.native.cpu.fp8_cast.
void pe_fp8_cast(const void *x, int type, int64_t rows, int64_t hidden, int64_t row_stride, uint8_t *out,
                 float *scales, int round_scale);
