// Clocks, the engine's one back-off, futex doorbells and error strings (see pe_common.h).
#define _GNU_SOURCE
#include "pe_common.h"

#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

enum { SPIN_ATTEMPTS = 32, YIELD_ATTEMPTS = 48 };

uint64_t pe_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

double pe_now_s(void) { return (double)pe_now_ns() * 1e-9; }

void pe_backoff_init(pe_backoff_t *b, uint32_t max_sleep_us) {
  b->attempts = 0;
  b->max_sleep_us = max_sleep_us ? max_sleep_us : 1;
}

int pe_backoff_step(pe_backoff_t *b) {
  uint32_t n = b->attempts++;
  if (n < SPIN_ATTEMPTS) {
    for (int i = 0; i < 16; ++i) pe_cpu_relax();
    return 0;
  }
  if (n < YIELD_ATTEMPTS) {
    sched_yield();
    return 0;
  }
  uint32_t shift = n - YIELD_ATTEMPTS;
  uint64_t us = shift >= 20 ? b->max_sleep_us : (uint64_t)1 << shift;
  if (us > b->max_sleep_us) us = b->max_sleep_us;
  struct timespec ts = {0, (long)(us * 1000)};
  nanosleep(&ts, NULL);
  return 1;
}

static long futex(uint32_t *addr, int op, uint32_t value, const struct timespec *timeout) {
  return syscall(SYS_futex, addr, op, value, timeout, NULL, 0);
}

void pe_doorbell_wait(pe_doorbell_t *bell, uint32_t seen, uint32_t timeout_us, int shared) {
  struct timespec ts = {(time_t)(timeout_us / 1000000u), (long)(timeout_us % 1000000u) * 1000};
  int op = shared ? FUTEX_WAIT : FUTEX_WAIT_PRIVATE;
  futex(&bell->ring, op, seen, &ts);  // returns at once if the bell rang since `seen`
}

void pe_doorbell_ring(pe_doorbell_t *bell, int shared) {
  // Pairs with the waiter's sleepers increment + fence + last check of its condition: either the
  // waiter sees the news, or this load sees the waiter and wakes it.
  pe_fence_seq();
  if (__atomic_load_n(&bell->sleepers, __ATOMIC_RELAXED) == 0) return;
  __atomic_add_fetch(&bell->ring, 1, __ATOMIC_RELEASE);
  futex(&bell->ring, shared ? FUTEX_WAKE : FUTEX_WAKE_PRIVATE, INT_MAX, NULL);
}

static void verr(char *err, const char *fmt, va_list ap) {
  if (err != NULL) vsnprintf(err, PE_ERR_LEN, fmt, ap);
}

void pe_err(char *err, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  verr(err, fmt, ap);
  va_end(ap);
}

void pe_err_keep(char *err, const char *fmt, ...) {
  if (err == NULL || err[0] != '\0') return;
  va_list ap;
  va_start(ap, fmt);
  verr(err, fmt, ap);
  va_end(ap);
}
