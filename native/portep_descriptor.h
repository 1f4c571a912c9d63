// The descriptor a device kernel writes into a ring for the proxy (see proxy/descriptor.py,
// which defines the same 32 bytes; tests/test_descriptor.py checks they agree byte for byte).
#pragma once
#include <stdint.h>

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
  uint8_t version;
  uint8_t opcode;
  uint16_t signal_slot;
  uint32_t dst_rank;
  uint64_t src_offset;
  uint64_t dst_offset;
  uint32_t length;
  int32_t signal_value;
} portep_descriptor_t;

#ifdef __cplusplus
static_assert(sizeof(portep_descriptor_t) == PORTEP_DESCRIPTOR_BYTES, "descriptor must be 32 bytes");
#else
_Static_assert(sizeof(portep_descriptor_t) == PORTEP_DESCRIPTOR_BYTES, "descriptor must be 32 bytes");
#endif
