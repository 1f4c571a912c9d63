// Row movement and reduction for dispatch and combine, on both modes.
//   portep_pack_rows      gather per-token fields into one byte row per message (HT/LL dispatch send)
//   portep_scatter_rows   place received rows into the expert-major output (LL dispatch receive)
//   portep_reduce_rows_*  sum rows per destination in float32, optionally weighted (HT combine
//                         reduce, LL combine weighted reduce); in source-row order, without fused
//                         multiply-adds, which is the order and rounding of torch's index_add_ on the
//                         CPU, so the sums are the same bit for bit.
#include "portep_port.h"

// Cooperative copy of n bytes by `count` threads, with the widest access all three of the
// addresses and the length allow.
PORTEP_DEVICE void portep_copy_bytes(portep_u8* __restrict__ dst, const portep_u8* __restrict__ src, portep_i64 n,
                                     int thread, int count) {
  const portep_u64 alignment = (portep_u64)dst | (portep_u64)src | (portep_u64)n;
  if ((alignment & 15) == 0) {
    for (portep_i64 i = thread; i < n / 16; i += count) {
      reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(src)[i];
    }
  } else if ((alignment & 3) == 0) {
    for (portep_i64 i = thread; i < n / 4; i += count) {
      reinterpret_cast<portep_u32*>(dst)[i] = reinterpret_cast<const portep_u32*>(src)[i];
    }
  } else {
    for (portep_i64 i = thread; i < n; i += count) dst[i] = src[i];
  }
}

// out[r, field.offset : field.offset + field.bytes] = field.src[index[r]] for every field; one block
// per row (grid-stride). fields: num_fields x (src address, src row stride, bytes, offset), u64.
// index: nullptr for rows in order.
extern "C" __global__ void portep_pack_rows(const portep_u64* __restrict__ fields, int num_fields,
                                            const portep_i64* __restrict__ index, portep_i64 rows,
                                            portep_i64 row_bytes, portep_u8* __restrict__ out) {
  for (portep_i64 r = blockIdx.x; r < rows; r += gridDim.x) {
    const portep_i64 src_row = index != nullptr ? index[r] : r;
    for (int f = 0; f < num_fields; ++f) {
      const portep_u8* src =
          reinterpret_cast<const portep_u8*>(fields[4 * f]) + src_row * (portep_i64)fields[4 * f + 1];
      portep_copy_bytes(out + r * row_bytes + fields[4 * f + 3], src, (portep_i64)fields[4 * f + 2], threadIdx.x,
                        blockDim.x);
    }
  }
}

// dst[expert[r], slot[r], :] = src[r, :]: src is contiguous [rows, width] of elem_bytes elements,
// dst has element strides (stride_expert, stride_slot, stride_col) (transposed scales included).
extern "C" __global__ void portep_scatter_rows(const portep_u8* __restrict__ src, portep_i64 rows, portep_i64 width,
                                               int elem_bytes, const portep_i64* __restrict__ expert,
                                               const portep_i64* __restrict__ slot, portep_u8* __restrict__ dst,
                                               portep_i64 stride_expert, portep_i64 stride_slot,
                                               portep_i64 stride_col) {
  for (portep_i64 r = blockIdx.x; r < rows; r += gridDim.x) {
    portep_u8* base = dst + (expert[r] * stride_expert + slot[r] * stride_slot) * elem_bytes;
    const portep_u8* row = src + r * width * elem_bytes;
    if (stride_col == 1) {
      portep_copy_bytes(base, row, width * elem_bytes, threadIdx.x, blockDim.x);
      continue;
    }
    for (portep_i64 c = threadIdx.x; c < width; c += blockDim.x) {
      portep_u8* to = base + c * stride_col * elem_bytes;
      const portep_u8* from = row + c * elem_bytes;
      switch (elem_bytes) {
        case 1: *to = *from; break;
        case 2: *reinterpret_cast<portep_u16*>(to) = *reinterpret_cast<const portep_u16*>(from); break;
        case 4: *reinterpret_cast<portep_u32*>(to) = *reinterpret_cast<const portep_u32*>(from); break;
        default: *reinterpret_cast<portep_u64*>(to) = *reinterpret_cast<const portep_u64*>(from); break;
      }
    }
  }
}

PORTEP_DEVICE float portep_value(const float* p) { return *p; }
PORTEP_DEVICE float portep_value(const portep_u16* p) { return portep_bf16_to_float(*p); }

// out[d, :] = sum over j in [offsets[d], offsets[d+1]) of values[order[j], :] (* weights[order[j]]),
// float32, in increasing j. Blocks: x over destinations (grid-stride), y over column tiles.
template <typename T>
__device__ void portep_reduce_rows(const T* __restrict__ values, portep_i64 width, const portep_i64* __restrict__ order,
                                   const portep_i64* __restrict__ offsets, const float* __restrict__ weights,
                                   portep_i64 num_out, float* __restrict__ out) {
  for (portep_i64 d = blockIdx.x; d < num_out; d += gridDim.x) {
    const portep_i64 begin = offsets[d], end = offsets[d + 1];
    for (portep_i64 c = blockIdx.y * (portep_i64)blockDim.x + threadIdx.x; c < width;
         c += (portep_i64)gridDim.y * blockDim.x) {
      float sum = 0.0f;
      for (portep_i64 j = begin; j < end; ++j) {
        const portep_i64 i = order[j];
        float v = portep_value(values + i * width + c);
        if (weights != nullptr) v = __fmul_rn(v, weights[i]);
        sum = __fadd_rn(sum, v);
      }
      out[d * width + c] = sum;
    }
  }
}

extern "C" __global__ void portep_reduce_rows_bf16(const portep_u16* __restrict__ values, portep_i64 width,
                                                   const portep_i64* __restrict__ order,
                                                   const portep_i64* __restrict__ offsets,
                                                   const float* __restrict__ weights, portep_i64 num_out,
                                                   float* __restrict__ out) {
  portep_reduce_rows(values, width, order, offsets, weights, num_out, out);
}

extern "C" __global__ void portep_reduce_rows_f32(const float* __restrict__ values, portep_i64 width,
                                                  const portep_i64* __restrict__ order,
                                                  const portep_i64* __restrict__ offsets,
                                                  const float* __restrict__ weights, portep_i64 num_out,
                                                  float* __restrict__ out) {
  portep_reduce_rows(values, width, order, offsets, weights, num_out, out);
}
