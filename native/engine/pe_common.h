// Shared helpers of portep's compiled engine: explicit atomics, clocks, back-off, futex waits and
// error strings. Every cross-thread or cross-process word is accessed through these wrappers, with
// the memory order spelled out (acquire loads, release stores and adds), so the engine is correct
// on weakly ordered CPUs (Arm) as well as on x86.
#pragma once

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define PE_ERR_LEN 512
#define PE_CACHE_LINE 64

#define PE_LIKELY(x) __builtin_expect(!!(x), 1)
#define PE_UNLIKELY(x) __builtin_expect(!!(x), 0)

// ------------------------------------------------------------------------------------------ atomics
static inline uint64_t pe_load_acquire_u64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline int64_t pe_load_acquire_i64(const int64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint32_t pe_load_acquire_u32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline int32_t pe_load_acquire_i32(const int32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint64_t pe_load_relaxed_u64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline int64_t pe_load_relaxed_i64(const int64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void pe_store_release_u64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void pe_store_release_i64(int64_t *p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void pe_store_release_u32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void pe_store_release_i32(int32_t *p, int32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void pe_store_relaxed_i64(int64_t *p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline void pe_store_relaxed_u64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline int64_t pe_add_release_i64(int64_t *p, int64_t v) { return __atomic_add_fetch(p, v, __ATOMIC_RELEASE); }
static inline uint64_t pe_add_relaxed_u64(uint64_t *p, uint64_t v) { return __atomic_add_fetch(p, v, __ATOMIC_RELAXED); }
static inline uint32_t pe_add_seq_u32(uint32_t *p, uint32_t v) { return __atomic_add_fetch(p, v, __ATOMIC_SEQ_CST); }
static inline void pe_fence_seq(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

static inline void pe_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield" ::: "memory");
#endif
}

// ------------------------------------------------------------------------------------------- clocks
double pe_now_s(void);
uint64_t pe_now_ns(void);

// ------------------------------------------------------------------------------------------ waiting
// One back-off for every wait of the engine: spin briefly (latency), then yield (other processes
// on the same core), then sleep a little longer each time up to `max_sleep_us` (never starve the
// ranks and proxies that share the cores).
typedef struct pe_backoff {
  uint32_t attempts;
  uint32_t max_sleep_us;
} pe_backoff_t;

void pe_backoff_init(pe_backoff_t *b, uint32_t max_sleep_us);
// True once the spinning phase is over (a caller may then block on a doorbell instead).
int pe_backoff_step(pe_backoff_t *b);
static inline void pe_backoff_reset(pe_backoff_t *b) { b->attempts = 0; }

// A doorbell: a 32-bit word writers bump after publishing something, so that a waiter can sleep
// in the kernel (futex) instead of polling. `shared`: the word lives in memory shared between
// processes. A waiter announces itself in `*sleepers` before it checks its condition a last time.
typedef struct pe_doorbell {
  uint32_t ring;
  uint32_t sleepers;
} pe_doorbell_t;

// Wait until the bell rings past `seen` or `timeout_us` passes.
void pe_doorbell_wait(pe_doorbell_t *bell, uint32_t seen, uint32_t timeout_us, int shared);
// Ring it (a no-op unless somebody sleeps). Call after the release store that publishes the news.
void pe_doorbell_ring(pe_doorbell_t *bell, int shared);

// ------------------------------------------------------------------------------------------- errors
// Errors are reported as strings of at most PE_ERR_LEN bytes into a caller's buffer.
void pe_err(char *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
// Same, but keep an error that is already there (the first cause wins).
void pe_err_keep(char *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static inline uint64_t pe_round_up(uint64_t n, uint64_t to) { return (n + to - 1) / to * to; }
