// A minimal compiled consumer of DescriptorRings (proxy/ring.py's layout, portep_descriptor.h): it
// polls the rings round robin, copies each published batch out and releases it by storing the tail,
// which is the least any proxy loop does per descriptor. Benchmarks use it to separate the cost of
// the ring itself from the cost of a Python consumer.
//
//   ring_consumer COUNT TIMEOUT_S NAME...
//
// Takes COUNT descriptors in total from the named shared-memory segments and checks that each
// ring's descriptors carry consecutive src_offset values from 0 (the benchmark kernels' sequence
// numbers), except with COUNT given as a negative number -N: then N are taken unchecked.
// Prints "taken <n> bad <n> batches <n> seconds <s>"; exits 2 when TIMEOUT_S passes first.
#define _POSIX_C_SOURCE 200809L
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "portep_descriptor.h"

#define MAX_RINGS 256

typedef struct ring {
  uint64_t* head;
  uint64_t* tail;
  uint64_t capacity;
  const portep_descriptor_t* slots;
  uint64_t next_sequence;
} ring_t;

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int open_ring(const char* name, ring_t* ring) {
  char path[512];
  snprintf(path, sizeof path, "/%s", name[0] == '/' ? name + 1 : name);
  int fd = shm_open(path, O_RDWR, 0);
  if (fd < 0) return -1;
  struct stat st;
  if (fstat(fd, &st) != 0) return -1;
  unsigned char* base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (base == MAP_FAILED) return -1;
  ring->head = (uint64_t*)(base + PORTEP_RING_HEAD_OFFSET);
  ring->tail = (uint64_t*)(base + PORTEP_RING_TAIL_OFFSET);
  ring->capacity = *(uint64_t*)(base + PORTEP_RING_CAPACITY_OFFSET);
  ring->slots = (const portep_descriptor_t*)(base + PORTEP_RING_SLOTS_OFFSET);
  ring->next_sequence = 0;
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 4 || argc - 3 > MAX_RINGS) {
    fprintf(stderr, "usage: %s COUNT TIMEOUT_S NAME...\n", argv[0]);
    return 1;
  }
  long long count = atoll(argv[1]);
  const int check = count >= 0;
  const unsigned long long want = (unsigned long long)(count >= 0 ? count : -count);
  const double timeout_s = atof(argv[2]);
  const int num_rings = argc - 3;
  static ring_t rings[MAX_RINGS];
  for (int r = 0; r < num_rings; ++r) {
    if (open_ring(argv[3 + r], &rings[r]) != 0) {
      perror(argv[3 + r]);
      return 1;
    }
  }
  portep_descriptor_t copy[64];
  unsigned long long taken = 0, bad = 0, batches = 0;
  const double start = now_s();
  unsigned long long polls = 0;
  while (taken < want) {
    for (int r = 0; r < num_rings; ++r) {
      ring_t* ring = &rings[r];
      const uint64_t head = __atomic_load_n(ring->head, __ATOMIC_ACQUIRE);
      uint64_t tail = *ring->tail;  // only this consumer writes it
      if (head == tail) continue;
      ++batches;
      while (tail != head) {  // copy out in chunks, as a proxy would before posting them
        uint64_t n = head - tail < 64 ? head - tail : 64;
        for (uint64_t i = 0; i < n; ++i) copy[i] = ring->slots[(tail + i) & (ring->capacity - 1)];
        if (check) {
          for (uint64_t i = 0; i < n; ++i) bad += copy[i].src_offset != ring->next_sequence++;
        }
        tail += n;
      }
      taken += head - *ring->tail;
      __atomic_store_n(ring->tail, head, __ATOMIC_RELEASE);
    }
    if ((++polls & 0xfff) == 0 && now_s() - start > timeout_s) {
      printf("taken %llu bad %llu batches %llu seconds %.6f\n", taken, bad, batches, now_s() - start);
      return 2;
    }
  }
  printf("taken %llu bad %llu batches %llu seconds %.6f\n", taken, bad, batches, now_s() - start);
  return 0;
}
