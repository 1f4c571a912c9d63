// Shared-memory segments, descriptor rings and windows.
//
// A window is one rank's registered memory for one Buffer: a control page (the doorbell a sleeping
// rank waits on), int64 signal counters, then the data area (receive and staging slots). Every
// rank of a Buffer creates its window with the same sizes, so offsets mean the same in all of
// them. Descriptor offsets are relative to the data area, signal slots index the counters.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "../portep_descriptor.h"
#include "pe_common.h"

#define PE_PAGE 4096
#define PE_WINDOW_MAGIC 0x57455050u  // "PPEW"
#define PE_SHM_NAME_MAX 96

// ------------------------------------------------------------------------------ shared memory
typedef struct pe_shm {
  char name[PE_SHM_NAME_MAX];  // without the leading '/'
  void *base;
  size_t len;
  int owner;
} pe_shm_t;

// Create a zero-filled segment `name` of `len` bytes (pages are touched lazily).
int pe_shm_create(pe_shm_t *shm, const char *name, size_t len, char *err);
// Map an existing segment (its size is read from the segment).
int pe_shm_attach(pe_shm_t *shm, const char *name, char *err);
// Remove the name (mappings stay valid until unmapped): call once every peer has attached.
void pe_shm_unlink(pe_shm_t *shm);
void pe_shm_close(pe_shm_t *shm);

// --------------------------------------------------------------------------------------- ring
// Single-producer / single-consumer ring of 32-byte descriptors (layout in portep_descriptor.h):
// the producer writes slots then publishes `head` (release); the consumer reads `head` (acquire),
// copies the slots out, then publishes `tail` (release).
typedef struct pe_ring {
  uint64_t *head;
  uint64_t *tail;
  uint64_t capacity;
  portep_descriptor_t *slots;
} pe_ring_t;

size_t pe_ring_bytes(uint64_t capacity);
// Format `mem` (pe_ring_bytes(capacity) bytes, capacity a power of two) as an empty ring.
int pe_ring_format(pe_ring_t *ring, void *mem, uint64_t capacity, char *err);
// View a ring formatted elsewhere (e.g. by another process, or by a GPU kernel's host).
int pe_ring_view(pe_ring_t *ring, void *mem, char *err);
// Producer: append up to n descriptors; returns how many fit.
uint64_t pe_ring_push(pe_ring_t *ring, const portep_descriptor_t *items, uint64_t n);
// Consumer: take up to max descriptors.
uint64_t pe_ring_pop(pe_ring_t *ring, portep_descriptor_t *out, uint64_t max);
uint64_t pe_ring_pending(const pe_ring_t *ring);
// Benchmark consumer: pop `count` descriptors as fast as possible (or until timeout_s); returns how
// many were taken and, in `seconds`, the time from the first to the last batch.
uint64_t pe_ring_consume(pe_ring_t *ring, uint64_t count, double timeout_s, double *seconds);

// ------------------------------------------------------------------------------------- window
typedef struct pe_window_control {
  uint32_t magic;
  uint32_t num_signals;
  uint64_t data_bytes;
  uint8_t pad0[PE_CACHE_LINE - 16];
  pe_doorbell_t doorbell;  // rung by whoever raises a signal of this window while its rank sleeps
  uint8_t pad1[PE_CACHE_LINE - sizeof(pe_doorbell_t)];
} pe_window_control_t;

typedef struct pe_window {
  pe_shm_t shm;
  pe_window_control_t *control;
  int64_t *signals;
  uint8_t *data;
  uint32_t num_signals;
  uint64_t data_bytes;
} pe_window_t;

uint64_t pe_window_signals_offset(void);
uint64_t pe_window_data_offset(uint32_t num_signals);
size_t pe_window_bytes(uint32_t num_signals, uint64_t data_bytes);
int pe_window_create(pe_window_t *w, const char *name, uint32_t num_signals, uint64_t data_bytes, char *err);
int pe_window_attach(pe_window_t *w, const char *name, uint32_t num_signals, uint64_t data_bytes, char *err);
void pe_window_close(pe_window_t *w);

// Raise a signal of a window mapped here (direct stores to same-node peers, the shm transport):
// release add, then wake its rank if it sleeps.
void pe_window_signal(pe_window_t *w, uint32_t slot, int64_t value);
