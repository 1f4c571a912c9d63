// Portability layer: one kernel source for CUDA (nvcc, NVRTC) and HIP (hipcc, hiprtc).
//
// Kernels include only this header (and portep_descriptor.h) and use its names for the few
// things that differ between vendors: integer types under runtime compilation, the warp size and
// warp shuffles, system-scope fences and release/acquire accesses to host-mapped memory, a
// nanosecond clock, a short sleep, and the e4m3 FP8 conversions.
//
// Macros that select a path (the loader in native/cuda.py sets them; the compile test uses the same):
//   PORTEP_RTC       compiled at run time (NVRTC / hiprtc): no system headers are included.
//   PORTEP_SOFT_FP8  e4m3 conversions in software (always on HIP; on CUDA when <cuda_fp8.h> is absent).
#pragma once

#if defined(__HIP__) || defined(__HIPCC_RTC__) || defined(__HIP_PLATFORM_AMD__)
#define PORTEP_HIP 1
#else
#define PORTEP_CUDA 1
#endif

#if defined(PORTEP_HIP) && !defined(PORTEP_SOFT_FP8)
#define PORTEP_SOFT_FP8 1
#endif

#if !defined(PORTEP_RTC)
#if defined(PORTEP_HIP)
#include <hip/hip_runtime.h>
#endif
#endif
#if defined(PORTEP_CUDA) && !defined(PORTEP_SOFT_FP8)
#include <cuda_fp8.h>
#endif

#include "portep_descriptor.h"

// ------------------------------------------------------------------------------ integer types
typedef portep_u8_t portep_u8;
typedef portep_u16_t portep_u16;
typedef portep_u32_t portep_u32;
typedef portep_u64_t portep_u64;
typedef int portep_i32;
typedef long long portep_i64;

#define PORTEP_DEVICE __device__ __forceinline__

// ------------------------------------------------------------------------------ warps
#if defined(PORTEP_HIP)
#if defined(__AMDGCN_WAVEFRONT_SIZE)
#define PORTEP_WARP_SIZE __AMDGCN_WAVEFRONT_SIZE
#else
#define PORTEP_WARP_SIZE 64
#endif
PORTEP_DEVICE float portep_shfl_xor(float v, int mask) { return __shfl_xor(v, mask); }
PORTEP_DEVICE unsigned portep_shfl_u32(unsigned v, int lane) { return (unsigned)__shfl((int)v, lane); }
PORTEP_DEVICE void portep_syncwarp() { __builtin_amdgcn_wave_barrier(); }
#else
#define PORTEP_WARP_SIZE 32
PORTEP_DEVICE float portep_shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
PORTEP_DEVICE unsigned portep_shfl_u32(unsigned v, int lane) { return __shfl_sync(0xffffffffu, v, lane); }
PORTEP_DEVICE void portep_syncwarp() { __syncwarp(); }
#endif

// The same 64-bit value in every lane: the one `lane` holds.
PORTEP_DEVICE portep_u64 portep_broadcast_u64(portep_u64 v, int lane) {
  portep_u32 lo = portep_shfl_u32((portep_u32)v, lane);
  portep_u32 hi = portep_shfl_u32((portep_u32)(v >> 32), lane);
  return ((portep_u64)hi << 32) | lo;
}

// ------------------------------------------------------------------------------ memory ordering
// Everything this thread wrote before becomes visible to the host (and other devices) before
// anything it writes after.
PORTEP_DEVICE void portep_fence_system() { __threadfence_system(); }

// Store that orders every earlier write of this thread before it, at system scope.
PORTEP_DEVICE void portep_store_release_system(portep_u64* p, portep_u64 v) {
#if defined(PORTEP_HIP)
  __atomic_store_n(p, v, __ATOMIC_RELEASE);  // AMDGPU atomics default to system scope
#else
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
#endif
}

// Load that orders every later access of this thread after it, at system scope (never cached).
PORTEP_DEVICE portep_u64 portep_load_acquire_system(const portep_u64* p) {
#if defined(PORTEP_HIP)
  return __atomic_load_n(p, __ATOMIC_ACQUIRE);
#else
  portep_u64 v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
#endif
}

// ------------------------------------------------------------------------------ time
#if defined(PORTEP_HIP) && !defined(PORTEP_WALL_CLOCK_KHZ)
#define PORTEP_WALL_CLOCK_KHZ 100000  // s_memrealtime: the constant 100 MHz counter of CDNA (gfx9) parts
#endif

// Nanoseconds from a device-wide clock (comparable between blocks of one device).
PORTEP_DEVICE portep_u64 portep_clock_ns() {
#if defined(PORTEP_HIP)
  return (portep_u64)__builtin_amdgcn_s_memrealtime() * (1000000ull / PORTEP_WALL_CLOCK_KHZ);
#else
  portep_u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
#endif
}

// The multiprocessor's cycle counter (fine-grained; convert with a rate measured against the clock).
PORTEP_DEVICE portep_u64 portep_cycles() { return (portep_u64)clock64(); }

// Yield the issue slot for a short while in a polling loop.
PORTEP_DEVICE void portep_pause() {
#if defined(PORTEP_HIP)
  __builtin_amdgcn_s_sleep(2);
#else
  __nanosleep(100);
#endif
}

// ------------------------------------------------------------------------------ number formats
PORTEP_DEVICE float portep_bf16_to_float(portep_u16 h) { return __uint_as_float((portep_u32)h << 16); }

// e4m3 in the OCP "fn" encoding (bias 7, max 448, 0x7f/0xff are NaN, no infinities) is the wire
// format on every device, so bytes cast on one vendor's GPU read the same on another's and on the
// CPU (torch.float8_e4m3fn). MI300's native FP8 (__hip_fp8_e4m3_fnuz: bias 8, max 240) is a
// different encoding, hence the software conversion on HIP. It rounds to nearest even exactly like
// torch's CPU cast; the two paths differ only for |x| >= 464, which a scaled cast never produces.
#if defined(PORTEP_SOFT_FP8)
typedef portep_u8 portep_fp8_e4m3;

PORTEP_DEVICE portep_u8 portep_float_to_e4m3(float f) {
  portep_u32 bits = __float_as_uint(f);
  const portep_u32 sign = bits & 0x80000000u;
  bits ^= sign;
  portep_u32 r;
  if (bits >= (1087u << 20)) {  // >= 480, inf or NaN
    r = 0x7f;
  } else if (bits < (121u << 23)) {  // below 2^-6: subnormal, rounded by adding 2^14
    r = __float_as_uint(__fadd_rn(__uint_as_float(bits), __uint_as_float(141u << 23))) - (141u << 23);
  } else {
    const portep_u32 odd = (bits >> 20) & 1u;
    bits += ((portep_u32)(7 - 127) << 23) + 0x7ffffu + odd;
    r = bits >> 20;
  }
  return (portep_u8)(r | (sign >> 24));
}

PORTEP_DEVICE float portep_e4m3_to_float(portep_u8 v) {
  const portep_u32 sign = (portep_u32)(v & 0x80) << 24;
  const portep_u32 exponent = (v >> 3) & 0xf, mantissa = v & 0x7;
  if (exponent == 0xf && mantissa == 0x7) return __uint_as_float(0x7fc00000u | sign);
  if (exponent == 0) return __uint_as_float(__float_as_uint((float)mantissa * 0.001953125f) | sign);
  return __uint_as_float(sign | ((exponent + 120u) << 23) | (mantissa << 20));
}
#else
typedef __nv_fp8_e4m3 portep_fp8_e4m3;

PORTEP_DEVICE portep_u8 portep_float_to_e4m3(float f) {
  return (portep_u8)__nv_cvt_float_to_fp8(f, __NV_SATFINITE, __NV_E4M3);
}

PORTEP_DEVICE float portep_e4m3_to_float(portep_u8 v) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)v, __NV_E4M3)));
}
#endif
