// Shared-memory segments, descriptor rings and windows (see pe_window.h).
#define _GNU_SOURCE
#include "pe_window.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "pe_transport.h"

// ------------------------------------------------------------------------------ shared memory
static void shm_path(char *path, size_t cap, const char *name) {
  snprintf(path, cap, "/%s", name[0] == '/' ? name + 1 : name);
}

static int map_fd(pe_shm_t *shm, int fd, size_t len, char *err) {
  void *base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (base == MAP_FAILED) {
    pe_err(err, "mmap of shared memory segment %s (%zu bytes) failed: %s", shm->name, len, strerror(errno));
    return -1;
  }
  shm->base = base;
  shm->len = len;
  return 0;
}

int pe_shm_create(pe_shm_t *shm, const char *name, size_t len, char *err) {
  memset(shm, 0, sizeof *shm);
  snprintf(shm->name, sizeof shm->name, "%s", name[0] == '/' ? name + 1 : name);
  char path[PE_SHM_NAME_MAX + 2];
  shm_path(path, sizeof path, name);
  int fd = shm_open(path, O_RDWR | O_CREAT | O_EXCL, 0600);
  if (fd < 0) {
    pe_err(err, "cannot create shared memory segment %s: %s", path, strerror(errno));
    return -1;
  }
  if (ftruncate(fd, (off_t)len) != 0) {
    pe_err(err, "cannot size shared memory segment %s to %zu bytes: %s", path, len, strerror(errno));
    close(fd);
    shm_unlink(path);
    return -1;
  }
  if (map_fd(shm, fd, len, err) != 0) {
    shm_unlink(path);
    return -1;
  }
  shm->owner = 1;
  return 0;
}

int pe_shm_attach(pe_shm_t *shm, const char *name, char *err) {
  memset(shm, 0, sizeof *shm);
  snprintf(shm->name, sizeof shm->name, "%s", name[0] == '/' ? name + 1 : name);
  char path[PE_SHM_NAME_MAX + 2];
  shm_path(path, sizeof path, name);
  int fd = shm_open(path, O_RDWR, 0);
  if (fd < 0) {
    pe_err(err, "cannot open shared memory segment %s: %s", path, strerror(errno));
    return -1;
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    pe_err(err, "cannot stat shared memory segment %s: %s", path, strerror(errno));
    close(fd);
    return -1;
  }
  return map_fd(shm, fd, (size_t)st.st_size, err);
}

void pe_shm_unlink(pe_shm_t *shm) {
  if (!shm->owner || shm->name[0] == '\0') return;
  char path[PE_SHM_NAME_MAX + 2];
  shm_path(path, sizeof path, shm->name);
  shm_unlink(path);
  shm->owner = 0;
}

void pe_shm_close(pe_shm_t *shm) {
  pe_shm_unlink(shm);
  if (shm->base != NULL) munmap(shm->base, shm->len);
  shm->base = NULL;
  shm->len = 0;
}

// --------------------------------------------------------------------------------------- ring
size_t pe_ring_bytes(uint64_t capacity) {
  return PORTEP_RING_SLOTS_OFFSET + capacity * sizeof(portep_descriptor_t);
}

int pe_ring_view(pe_ring_t *ring, void *mem, char *err) {
  uint8_t *base = mem;
  ring->head = (uint64_t *)(base + PORTEP_RING_HEAD_OFFSET);
  ring->tail = (uint64_t *)(base + PORTEP_RING_TAIL_OFFSET);
  ring->capacity = *(uint64_t *)(base + PORTEP_RING_CAPACITY_OFFSET);
  ring->slots = (portep_descriptor_t *)(base + PORTEP_RING_SLOTS_OFFSET);
  if (ring->capacity == 0 || (ring->capacity & (ring->capacity - 1))) {
    pe_err(err, "descriptor ring capacity %llu is not a power of two", (unsigned long long)ring->capacity);
    return -1;
  }
  return 0;
}

int pe_ring_format(pe_ring_t *ring, void *mem, uint64_t capacity, char *err) {
  if (capacity == 0 || (capacity & (capacity - 1))) {
    pe_err(err, "descriptor ring capacity must be a power of two, got %llu", (unsigned long long)capacity);
    return -1;
  }
  memset(mem, 0, PORTEP_RING_SLOTS_OFFSET);
  *(uint64_t *)((uint8_t *)mem + PORTEP_RING_CAPACITY_OFFSET) = capacity;
  return pe_ring_view(ring, mem, err);
}

uint64_t pe_ring_push(pe_ring_t *ring, const portep_descriptor_t *items, uint64_t n) {
  const uint64_t head = pe_load_relaxed_u64(ring->head);  // only this producer writes it
  const uint64_t room = ring->capacity - (head - pe_load_acquire_u64(ring->tail));
  if (n > room) n = room;
  const uint64_t mask = ring->capacity - 1;
  for (uint64_t i = 0; i < n; ++i) ring->slots[(head + i) & mask] = items[i];
  if (n) pe_store_release_u64(ring->head, head + n);
  return n;
}

uint64_t pe_ring_pop(pe_ring_t *ring, portep_descriptor_t *out, uint64_t max) {
  const uint64_t tail = pe_load_relaxed_u64(ring->tail);  // only this consumer writes it
  uint64_t n = pe_load_acquire_u64(ring->head) - tail;
  if (n > max) n = max;
  const uint64_t mask = ring->capacity - 1;
  for (uint64_t i = 0; i < n; ++i) out[i] = ring->slots[(tail + i) & mask];
  if (n) pe_store_release_u64(ring->tail, tail + n);
  return n;
}

uint64_t pe_ring_pending(const pe_ring_t *ring) {
  return pe_load_acquire_u64(ring->head) - pe_load_acquire_u64(ring->tail);
}

// ------------------------------------------------------------------------------------- window
uint64_t pe_window_signals_offset(void) { return PE_PAGE; }

uint64_t pe_window_data_offset(uint32_t num_signals) {
  return PE_PAGE + pe_round_up((uint64_t)num_signals * sizeof(int64_t), PE_PAGE);
}

size_t pe_window_bytes(uint32_t num_signals, uint64_t data_bytes) {
  return pe_window_data_offset(num_signals) + pe_round_up(data_bytes ? data_bytes : 1, PE_PAGE);
}

static void window_view(pe_window_t *w, uint32_t num_signals, uint64_t data_bytes) {
  uint8_t *base = w->shm.base;
  w->control = (pe_window_control_t *)base;
  w->signals = (int64_t *)(base + pe_window_signals_offset());
  w->data = base + pe_window_data_offset(num_signals);
  w->num_signals = num_signals;
  w->data_bytes = data_bytes;
}

int pe_window_create(pe_window_t *w, const char *name, uint32_t num_signals, uint64_t data_bytes, char *err) {
  memset(w, 0, sizeof *w);
  if (pe_shm_create(&w->shm, name, pe_window_bytes(num_signals, data_bytes), err) != 0) return -1;
  window_view(w, num_signals, data_bytes);
  w->control->num_signals = num_signals;
  w->control->data_bytes = data_bytes;
  pe_store_release_u32(&w->control->magic, PE_WINDOW_MAGIC);
  return 0;
}

int pe_window_attach(pe_window_t *w, const char *name, uint32_t num_signals, uint64_t data_bytes, char *err) {
  memset(w, 0, sizeof *w);
  if (pe_shm_attach(&w->shm, name, err) != 0) return -1;
  if (w->shm.len < pe_window_bytes(num_signals, data_bytes)) {
    pe_err(err, "window %s has %zu bytes, expected %zu: ranks disagree on the Buffer's sizes", name, w->shm.len,
           pe_window_bytes(num_signals, data_bytes));
    pe_shm_close(&w->shm);
    return -1;
  }
  window_view(w, num_signals, data_bytes);
  if (pe_load_acquire_u32(&w->control->magic) != PE_WINDOW_MAGIC || w->control->num_signals != num_signals ||
      w->control->data_bytes != data_bytes) {
    pe_err(err, "window %s does not match this Buffer's layout (%u signals, %llu data bytes)", name, num_signals,
           (unsigned long long)data_bytes);
    pe_shm_close(&w->shm);
    return -1;
  }
  return 0;
}

void pe_window_close(pe_window_t *w) {
  pe_shm_close(&w->shm);
  w->control = NULL;
  w->signals = NULL;
  w->data = NULL;
}

void pe_signal_apply(void *region_base, uint64_t sig_off, int64_t value) {
  pe_add_release_i64((int64_t *)((uint8_t *)region_base + sig_off), value);
  pe_doorbell_ring(&((pe_window_control_t *)region_base)->doorbell, 1);
}

void pe_window_signal(pe_window_t *w, uint32_t slot, int64_t value) {
  pe_signal_apply(w->shm.base, pe_window_signals_offset() + (uint64_t)slot * sizeof(int64_t), value);
}

uint64_t pe_ring_consume(pe_ring_t *ring, uint64_t count, double timeout_s, double *seconds) {
  portep_descriptor_t batch[256];
  uint64_t taken = 0;
  uint64_t first_ns = 0, last_ns = 0;
  const double deadline = pe_now_s() + timeout_s;
  uint32_t idle = 0;
  while (taken < count) {
    uint64_t n = pe_ring_pop(ring, batch, 256);
    if (n) {
      last_ns = pe_now_ns();
      if (!first_ns) first_ns = last_ns;
      taken += n;
      idle = 0;
      continue;
    }
    pe_cpu_relax();
    if ((++idle & 0xfff) == 0 && pe_now_s() > deadline) break;
  }
  *seconds = (double)(last_ns - first_ns) * 1e-9;
  return taken;
}
