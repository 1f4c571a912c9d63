// The descriptor a device kernel writes into a ring for the proxy (see proxy/descriptor.py,
// which defines the same 32 bytes; tests/test_descriptor.py checks they agree byte for byte).
#pragma once

#if defined(PORTEP_RTC)
// Runtime compilers (NVRTC, hiprtc) have no <stdint.h>: the same widths from builtin types.
typedef unsigned char portep_u8_t;
typedef unsigned short portep_u16_t;
typedef unsigned int portep_u32_t;
typedef int portep_i32_t;
typedef unsigned long long portep_u64_t;
#else
#include <stdint.h>
typedef uint8_t portep_u8_t;
typedef uint16_t portep_u16_t;
typedef uint32_t portep_u32_t;
typedef int32_t portep_i32_t;
typedef uint64_t portep_u64_t;
#endif

#define PORTEP_DESCRIPTOR_VERSION 1
#define PORTEP_DESCRIPTOR_BYTES 32

enum portep_op {
  PORTEP_OP_PUT = 1,         // copy bytes
  PORTEP_OP_PUT_SIGNAL = 2,  // copy bytes, then apply the signal once they have all landed
  PORTEP_OP_SIGNAL = 3,      // apply the signal only
  PORTEP_OP_FENCE = 4,       // earlier descriptors to dst_rank complete before later ones start
  PORTEP_OP_BARRIER = 5,     // every rank's proxy arrives before any continues
};

typedef struct portep_descriptor {
  portep_u8_t version;
  portep_u8_t opcode;
  portep_u16_t signal_slot;
  portep_u32_t dst_rank;
  portep_u64_t src_offset;
  portep_u64_t dst_offset;
  portep_u32_t length;
  portep_i32_t signal_value;
} portep_descriptor_t;

// The ring a kernel writes into (proxy/ring.py): head and tail counters on their own cache lines,
// the capacity (a power of two), then the 32-byte slots; slot i % capacity holds descriptor i.
#define PORTEP_RING_HEAD_OFFSET 0
#define PORTEP_RING_TAIL_OFFSET 64
#define PORTEP_RING_CAPACITY_OFFSET 128
#define PORTEP_RING_SLOTS_OFFSET 192

#ifdef __cplusplus
static_assert(sizeof(portep_descriptor_t) == PORTEP_DESCRIPTOR_BYTES, "descriptor must be 32 bytes");
#else
_Static_assert(sizeof(portep_descriptor_t) == PORTEP_DESCRIPTOR_BYTES, "descriptor must be 32 bytes");
#endif
