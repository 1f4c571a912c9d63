// FP8 e4m3 cast with one float32 scale per token and 128 channels, and the cast back.
// Same arithmetic, in the same order, as native/cpu.py fp8_cast / fp8_cast_back.
#include "portep_port.h"

#define PORTEP_FP8_GROUP 128
#define PORTEP_FP8_MAX 448.0f
#define PORTEP_FP8_MIN_AMAX 1e-4f
#define PORTEP_FP8_PER_LANE (PORTEP_FP8_GROUP / PORTEP_WARP_SIZE)

PORTEP_DEVICE float portep_load_float(const float* p) { return *p; }
PORTEP_DEVICE float portep_load_float(const portep_u16* p) { return portep_bf16_to_float(*p); }

// One warp per group of 128 channels (grid-stride over all groups of the contiguous [N, hidden]
// input). round_scale: scales are powers of two, 2^ceil(log2(amax / 448)), computed exactly.
template <typename T>
__device__ void portep_fp8_cast(const T* __restrict__ x, portep_i64 num_groups, int round_scale,
                                portep_u8* __restrict__ out, float* __restrict__ scales) {
  const int lane = threadIdx.x % PORTEP_WARP_SIZE;
  const portep_i64 warps_per_block = blockDim.x / PORTEP_WARP_SIZE;
  const portep_i64 first = blockIdx.x * warps_per_block + threadIdx.x / PORTEP_WARP_SIZE;
  for (portep_i64 g = first; g < num_groups; g += gridDim.x * warps_per_block) {
    const T* src = x + g * PORTEP_FP8_GROUP;
    float v[PORTEP_FP8_PER_LANE];
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < PORTEP_FP8_PER_LANE; ++i) {
      v[i] = portep_load_float(src + lane + i * PORTEP_WARP_SIZE);
      amax = fmaxf(amax, fabsf(v[i]));
    }
#pragma unroll
    for (int mask = PORTEP_WARP_SIZE / 2; mask > 0; mask >>= 1) amax = fmaxf(amax, portep_shfl_xor(amax, mask));
    amax = fmaxf(amax, PORTEP_FP8_MIN_AMAX);
    float scale, scale_inv;
    if (round_scale) {
      const portep_u32 bits = __float_as_uint(__fdiv_rn(amax, PORTEP_FP8_MAX));
      const int exponent = (int)((bits >> 23) & 0xff) - 127 + ((bits & 0x7fffff) != 0);
      scale_inv = __uint_as_float((portep_u32)(exponent + 127) << 23);
      scale = __uint_as_float((portep_u32)(127 - exponent) << 23);
    } else {
      scale = __fmul_rn(__fdiv_rn(1.0f, amax), PORTEP_FP8_MAX);  // torch's `448 / t` is reciprocal(t) * 448
      scale_inv = __fdiv_rn(amax, PORTEP_FP8_MAX);
    }
    portep_u8* dst = out + g * PORTEP_FP8_GROUP;
#pragma unroll
    for (int i = 0; i < PORTEP_FP8_PER_LANE; ++i) {
      dst[lane + i * PORTEP_WARP_SIZE] = portep_float_to_e4m3(__fmul_rn(v[i], scale));
    }
    if (lane == 0) scales[g] = scale_inv;
  }
}

extern "C" __global__ void portep_fp8_cast_bf16(const portep_u16* __restrict__ x, portep_i64 num_groups,
                                                int round_scale, portep_u8* __restrict__ out,
                                                float* __restrict__ scales) {
  portep_fp8_cast(x, num_groups, round_scale, out, scales);
}

extern "C" __global__ void portep_fp8_cast_f32(const float* __restrict__ x, portep_i64 num_groups, int round_scale,
                                               portep_u8* __restrict__ out, float* __restrict__ scales) {
  portep_fp8_cast(x, num_groups, round_scale, out, scales);
}

// out[n, c] = e4m3(x[n, c]) * scales[n, c / (hidden / groups)], float32.
extern "C" __global__ void portep_fp8_cast_back(const portep_u8* __restrict__ x, const float* __restrict__ scales,
                                                portep_i64 num_elements, int hidden, int groups,
                                                float* __restrict__ out) {
  const int group_width = hidden / groups;
  for (portep_i64 i = blockIdx.x * (portep_i64)blockDim.x + threadIdx.x; i < num_elements;
       i += (portep_i64)gridDim.x * blockDim.x) {
    const portep_i64 row = i / hidden;
    const int group = (int)(i % hidden) / group_width;
    out[i] = __fmul_rn(portep_e4m3_to_float(x[i]), scales[row * groups + group]);
  }
}
