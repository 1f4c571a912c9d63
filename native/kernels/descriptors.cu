// The descriptor writer: kernels push portep_descriptor_t records into a DescriptorRing that lives
// in host shared memory mapped into the device's address space (proxy/ring.py's layout, see
// portep_descriptor.h). The kernel is the ring's only producer, the proxy its only consumer.
//
// Ordering: a warp writes a batch of slots, every lane fences at system scope, then lane 0 stores
// the new head with release semantics, so a consumer that reads the head sees every slot before it.
// (The benchmark kernels can leave the fence out and rely on the warp barrier and the release store
// alone, to measure what the explicit fence costs.)
// The tail is read with acquire semantics, and only when the ring looks too full for the next
// batch; a full ring makes the warp wait (pausing between polls) up to its deadline, after which it
// stops and reports how far it got instead of hanging.
#include "portep_port.h"

#define PORTEP_RING_OK 0ull
#define PORTEP_RING_TIMEOUT 1ull

union portep_descriptor_words {
  portep_descriptor_t descriptor;
  uint4 words[2];
};

// Source of the records a push writes: an array of descriptors in device memory.
struct portep_records_from_array {
  const portep_descriptor_t* records;
  PORTEP_DEVICE void write(portep_u64 i, portep_descriptor_t* slot) const {
    const uint4* from = reinterpret_cast<const uint4*>(records + i);
    uint4* to = reinterpret_cast<uint4*>(slot);
    to[0] = from[0];
    to[1] = from[1];
  }
};

// Source of generated PUTs (benchmarks): descriptor i of producer `rank` has dst_rank rank,
// src_offset i, dst_offset 64 * i, length 64 and signal_value i, so a consumer can check each one.
struct portep_generated_puts {
  portep_u32 rank;
  PORTEP_DEVICE void write(portep_u64 i, portep_descriptor_t* slot) const {
    portep_descriptor_words w;
    w.descriptor.version = PORTEP_DESCRIPTOR_VERSION;
    w.descriptor.opcode = PORTEP_OP_PUT;
    w.descriptor.signal_slot = 0;
    w.descriptor.dst_rank = rank;
    w.descriptor.src_offset = i;
    w.descriptor.dst_offset = 64 * i;
    w.descriptor.length = 64;
    w.descriptor.signal_value = (portep_i32)i;
    uint4* to = reinterpret_cast<uint4*>(slot);
    to[0] = w.words[0];
    to[1] = w.words[1];
  }
};

// The whole warp pushes `count` records from `source`, at most `max_batch` per published head.
// status[0]: records pushed; status[1]: PORTEP_RING_OK or PORTEP_RING_TIMEOUT.
template <bool kSystemFence, typename Source>
PORTEP_DEVICE void portep_ring_push_warp(portep_u8* ring, const Source& source, portep_u64 count, portep_u64 max_batch,
                                         portep_u64 timeout_ns, portep_u64* status) {
  const int lane = threadIdx.x % PORTEP_WARP_SIZE;
  portep_u64* head_word = reinterpret_cast<portep_u64*>(ring + PORTEP_RING_HEAD_OFFSET);
  const portep_u64* tail_word = reinterpret_cast<const portep_u64*>(ring + PORTEP_RING_TAIL_OFFSET);
  const portep_u64 capacity = *reinterpret_cast<volatile const portep_u64*>(ring + PORTEP_RING_CAPACITY_OFFSET);
  portep_descriptor_t* slots = reinterpret_cast<portep_descriptor_t*>(ring + PORTEP_RING_SLOTS_OFFSET);

  // Lane 0 reads the shared words; every lane works from the values it broadcasts.
  portep_u64 head = portep_broadcast_u64(lane == 0 ? *reinterpret_cast<volatile portep_u64*>(head_word) : 0, 0);
  portep_u64 tail = portep_broadcast_u64(lane == 0 ? portep_load_acquire_system(tail_word) : 0, 0);
  portep_u64 done = 0, waiting_since = 0;
  while (done < count) {
    const portep_u64 want = count - done < max_batch ? count - done : max_batch;
    if (capacity - (head - tail) < want) {
      tail = portep_broadcast_u64(lane == 0 ? portep_load_acquire_system(tail_word) : 0, 0);
    }
    const portep_u64 room = capacity - (head - tail);
    if (room == 0) {
      const portep_u64 now = portep_broadcast_u64(lane == 0 ? portep_clock_ns() : 0, 0);
      if (waiting_since == 0) {
        waiting_since = now;
      } else if (now - waiting_since > timeout_ns) {
        if (lane == 0) {
          status[0] = done;
          status[1] = PORTEP_RING_TIMEOUT;
        }
        return;
      }
      portep_pause();
      continue;
    }
    waiting_since = 0;
    const portep_u64 n = want < room ? want : room;
    for (portep_u64 i = lane; i < n; i += PORTEP_WARP_SIZE) source.write(done + i, &slots[(head + i) & (capacity - 1)]);
    if (kSystemFence) portep_fence_system();  // this lane's slots before the head, at system scope
    portep_syncwarp();
    head += n;
    done += n;
    if (lane == 0) portep_store_release_system(head_word, head);
  }
  if (lane == 0) {
    status[0] = done;
    status[1] = PORTEP_RING_OK;
  }
}

// Block b's first warp pushes records[offsets[b] : offsets[b + 1]] into the ring at rings[b]
// (one ring per block: each ring has one producer). status: 2 words per block.
extern "C" __global__ void portep_ring_push(const portep_u64* __restrict__ rings,
                                           const portep_descriptor_t* __restrict__ records,
                                           const portep_u64* __restrict__ offsets, portep_u64 max_batch,
                                           portep_u64 timeout_ns, portep_u64* __restrict__ status) {
  if (threadIdx.x >= PORTEP_WARP_SIZE) return;
  const int b = blockIdx.x;
  const portep_records_from_array source{records + offsets[b]};
  portep_ring_push_warp<true>(reinterpret_cast<portep_u8*>(rings[b]), source, offsets[b + 1] - offsets[b],
                              max_batch, timeout_ns, status + 2 * b);
}

// Descriptor rate: block b's first warp pushes `count` generated PUTs into rings[b] (system_fence:
// as portep_ring_push does, or with the release store alone).
// times[2b], times[2b + 1]: clock (ns) before the first and after the last head store.
extern "C" __global__ void portep_ring_bench_rate(const portep_u64* __restrict__ rings, portep_u64 count,
                                                 portep_u64 max_batch, portep_u64 timeout_ns, int system_fence,
                                                 portep_u64* __restrict__ times, portep_u64* __restrict__ status) {
  if (threadIdx.x >= PORTEP_WARP_SIZE) return;
  const int b = blockIdx.x;
  const portep_u64 start = portep_clock_ns();
  const portep_generated_puts source{(portep_u32)b};
  portep_u8* ring = reinterpret_cast<portep_u8*>(rings[b]);
  if (system_fence) {
    portep_ring_push_warp<true>(ring, source, count, max_batch, timeout_ns, status + 2 * b);
  } else {
    portep_ring_push_warp<false>(ring, source, count, max_batch, timeout_ns, status + 2 * b);
  }
  portep_fence_system();
  if (threadIdx.x == 0) {
    times[2 * b] = start;
    times[2 * b + 1] = portep_clock_ns();
  }
}

// Descriptor latency, one thread: `iterations` times, publish one descriptor whose dst_offset holds
// the clock at the start (src_offset: its sequence number), then poll the ring's tail until the
// consumer has taken it. round_trip[2i], round_trip[2i + 1]: ns (device clock) and cycles (the
// finer multiprocessor counter) from the stamp to seeing the tail past descriptor i, i.e. the GPU's
// slot write + fence + head store reaching host memory, the consumer noticing and popping it and
// storing the tail, and the GPU's read of that tail. totals[0], totals[1]: ns and cycles of the
// whole loop, to convert cycles to ns. system_fence: as in portep_ring_bench_rate.
extern "C" __global__ void portep_ring_bench_latency(portep_u8* ring, int iterations, portep_u64 timeout_ns,
                                                    int system_fence, portep_u64* __restrict__ round_trip,
                                                    portep_u64* __restrict__ totals,
                                                    portep_u64* __restrict__ status) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  portep_u64* head_word = reinterpret_cast<portep_u64*>(ring + PORTEP_RING_HEAD_OFFSET);
  const portep_u64* tail_word = reinterpret_cast<const portep_u64*>(ring + PORTEP_RING_TAIL_OFFSET);
  const portep_u64 capacity = *reinterpret_cast<volatile const portep_u64*>(ring + PORTEP_RING_CAPACITY_OFFSET);
  portep_descriptor_t* slots = reinterpret_cast<portep_descriptor_t*>(ring + PORTEP_RING_SLOTS_OFFSET);
  portep_u64 head = *reinterpret_cast<volatile portep_u64*>(head_word);
  const portep_u64 first_ns = portep_clock_ns(), first_cycles = portep_cycles();
  for (int i = 0; i < iterations; ++i) {
    const portep_u64 stamp = portep_clock_ns(), stamp_cycles = portep_cycles();
    portep_descriptor_words w;
    w.descriptor.version = PORTEP_DESCRIPTOR_VERSION;
    w.descriptor.opcode = PORTEP_OP_SIGNAL;
    w.descriptor.signal_slot = 0;
    w.descriptor.dst_rank = 0;
    w.descriptor.src_offset = (portep_u64)i;
    w.descriptor.dst_offset = stamp;
    w.descriptor.length = 0;
    w.descriptor.signal_value = 1;
    uint4* to = reinterpret_cast<uint4*>(&slots[head & (capacity - 1)]);
    to[0] = w.words[0];
    to[1] = w.words[1];
    if (system_fence) portep_fence_system();
    portep_store_release_system(head_word, ++head);
    while (portep_load_acquire_system(tail_word) < head) {
      if (portep_clock_ns() - stamp > timeout_ns) {
        status[0] = (portep_u64)i;
        status[1] = PORTEP_RING_TIMEOUT;
        return;
      }
    }
    const portep_u64 seen_cycles = portep_cycles();
    round_trip[2 * i] = portep_clock_ns() - stamp;
    round_trip[2 * i + 1] = seen_cycles - stamp_cycles;
  }
  totals[0] = portep_clock_ns() - first_ns;
  totals[1] = portep_cycles() - first_cycles;
  status[0] = (portep_u64)iterations;
  status[1] = PORTEP_RING_OK;
}

// The cost of one read of host memory: out[0] = ns for `iterations` acquire loads of the tail,
// one after the other.
extern "C" __global__ void portep_host_read_latency(const portep_u8* ring, int iterations, portep_u64* out) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  const portep_u64* tail_word = reinterpret_cast<const portep_u64*>(ring + PORTEP_RING_TAIL_OFFSET);
  portep_u64 sink = 0;
  const portep_u64 start = portep_clock_ns();
  for (int i = 0; i < iterations; ++i) sink += portep_load_acquire_system(tail_word);
  out[0] = portep_clock_ns() - start;
  out[1] = sink;
}
