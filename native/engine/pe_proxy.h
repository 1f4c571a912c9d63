// The proxy: one thread per NIC (on a CPU host, per rank process) that every Buffer of the process
// shares. Each Buffer adds an *endpoint*: its descriptor ring and its window. The loop reads as its
// steps: drain the rings, coalesce contiguous puts, post them to the transport (keeping, per peer,
// what the transport cannot take yet), make transport progress (completions; arrivals applied to
// windows, signals after the bytes they guard), and back off when idle — spin, then sleep until a
// rank rings its doorbell or the transport's file descriptor wakes it.
//
// A transport error toward one peer marks that peer failed (ranks waiting on it are told, naming
// it); the proxy keeps serving every other peer.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "pe_transport.h"
#include "pe_window.h"

typedef struct pe_proxy pe_proxy_t;

typedef struct pe_proxy_stats {
  uint64_t steps;            // loop passes
  uint64_t descriptors;      // descriptors taken from rings
  uint64_t posted;           // transport operations posted
  uint64_t coalesced;        // descriptors merged into an earlier one
  uint64_t max_queue_depth;  // deepest ring seen
  uint64_t backlog;          // descriptors waiting for the transport now
  uint64_t idle_polls;       // passes with nothing to do
  uint64_t sleeps;           // times the thread blocked waiting for work
  uint64_t wakeups;          // doorbell rings that woke it
  uint64_t failed_peers;     // peers marked failed
  uint64_t helped_steps;     // steps run by ranks' threads (pe_proxy_help)
  pe_transport_stats_t transport;
} pe_proxy_stats_t;

// Start a proxy thread over a new instance of `ops` (created with `options`). Once idle, the thread
// spins, yields and naps for `stay_awake_ns` before it sleeps until woken (pe_proxy_wake, or its
// transport's fd) or a few ms pass. Ranks wake it after they push, so a short time spares the
// cores they share; producers that cannot wake it (a GPU kernel, another process) want a long one.
pe_proxy_t *pe_proxy_create(const pe_transport_ops_t *ops, const char *options, uint64_t stay_awake_ns, char *err);
const char *pe_proxy_transport_name(const pe_proxy_t *p);
int pe_proxy_address(pe_proxy_t *p, uint8_t *buf, size_t cap, size_t *len, char *err);
// A peer process by its proxy's address (connected once; the same address gives the same id).
int pe_proxy_connect(pe_proxy_t *p, const uint8_t *addr, size_t len, char *err);

// A Buffer's endpoint: `ring` (the rank pushes, the proxy pops) and `window` (registered with the
// transport; its key blob is written to `key`). `world`: ranks of the Buffer's group.
int pe_proxy_add_endpoint(pe_proxy_t *p, pe_ring_t *ring, pe_window_t *window, int world, uint8_t *key, size_t cap,
                          size_t *key_len, char *err);
// Group rank `rank` of endpoint `ep` is peer `peer` (from pe_proxy_connect) with window key `key`.
int pe_proxy_set_rank(pe_proxy_t *p, int ep, int rank, int peer, const uint8_t *key, size_t key_len, char *err);
// Post what the endpoint's ring still holds, wait (at most timeout_s) for the transport to finish,
// then forget the endpoint. Returns 0, or 1 if the deadline passed first.
int pe_proxy_remove_endpoint(pe_proxy_t *p, int ep, double timeout_s);

// Wake the thread if it sleeps (after pushing descriptors).
void pe_proxy_wake(pe_proxy_t *p);
// Run one step of the proxy's loop on the calling thread when no other thread is in it, and wake the
// proxy thread for what is left (operations in flight, descriptors pushed meanwhile); when another
// thread is in it, only wake the thread. A rank that just pushed descriptors, or waits for its
// peers, moves them itself instead of waiting for the proxy thread to be scheduled, as
// applications drive a UCX worker's progress. Returns the work done (0: none, or not run).
uint64_t pe_proxy_help(pe_proxy_t *p);
// 0 while group rank `rank` of endpoint `ep` is reachable; -1 with the transport's error in `err`
// once it failed.
int pe_proxy_rank_status(pe_proxy_t *p, int ep, int rank, char *err);
// 0 while the proxy runs; -1 with the reason once it stopped serving altogether.
int pe_proxy_status(pe_proxy_t *p, char *err);
void pe_proxy_stats(pe_proxy_t *p, pe_proxy_stats_t *out);
// Test hook: make every later post toward group rank `rank` of endpoint `ep` fail, as a broken
// link to that peer would.
void pe_proxy_break_rank(pe_proxy_t *p, int ep, int rank);
// Stop the thread (posting what the rings hold first, for at most timeout_s) and free everything.
void pe_proxy_destroy(pe_proxy_t *p, double timeout_s);
