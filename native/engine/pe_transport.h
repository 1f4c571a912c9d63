// The transport interface of portep's compiled proxy: a small table of operations, in the spirit
// of NCCL's network plugins, so that a new fabric is one file that fills the table.
//
// Model. A transport instance belongs to one proxy (one per NIC; on a CPU host, one per rank
// process) and is driven by that proxy's thread only: nothing here needs a lock. It connects to
// peer *processes* (their proxies' addresses, exchanged by the control plane), exposes local
// memory *regions* (a Buffer's window: a shared-memory segment holding signals and data), and
// imports peers' regions from the key blobs they publish. It then posts one-sided puts:
//
//   put_signal(region, src_off, remote, dst_off, len, sig_off, value)
//     copy [src_off, src_off + len) of local `region` to [dst_off, dst_off + len) of `remote`,
//     then add `value` to the int64 at `sig_off` of `remote`, such that a reader of that counter
//     who sees the new value (acquire load) also sees every byte of this put. len == 0 posts the
//     signal alone; sig_off == PE_NO_SIGNAL posts the bytes alone.
//
// How the guarantee is kept is the transport's business: a shared-memory copy then a release add
// (shm); a put, a fence and a remote atomic (UCX); RDMA write with immediate, applied by the
// receiving proxy when the write completes (verbs RC); writes whose bytes the receiving proxy
// counts before it applies the signal, so that delivery order never matters (EFA SRD, the software
// fabric). Receive-side signals are applied with pe_signal_apply(), which also wakes a rank that
// sleeps on that window.
//
// Offsets are relative to the region base. A producer keeps at most one put in flight per signal
// counter (the stream protocol guarantees it), so byte counting per (source, counter) is exact.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "pe_common.h"

#define PE_NO_SIGNAL UINT64_MAX
#define PE_BLOB_MAX 1024  // bytes of an address or a region key

// put_signal results
#define PE_POSTED 0
#define PE_BUSY 1  // the peer's in-flight window is full: call progress() and post again later
#define PE_FAILED (-1)

typedef struct pe_transport pe_transport_t;

// Counters every transport keeps; the proxy publishes them (portep status, Buffer.get_stats()).
typedef struct pe_transport_stats {
  uint64_t puts;             // puts posted (signal-only posts excluded)
  uint64_t bytes;            // bytes posted
  uint64_t signals;          // signals posted
  uint64_t signals_applied;  // signals applied here on the receive side (message fabrics)
  uint64_t messages_in;      // fabric messages received (message fabrics)
  uint64_t fragments;        // pieces puts were cut into on the wire
  uint64_t stalls;           // posts refused with PE_BUSY
  uint64_t reordered;        // deliveries made out of arrival order (fault injection)
  uint64_t delayed;          // deliveries held back (fault injection)
  uint64_t dropped;          // deliveries discarded (fault injection)
} pe_transport_stats_t;

typedef struct pe_transport_ops {
  const char *name;
  // A new instance. `options`: "key=value,key=value" (e.g. the fault injection of the software
  // fabric: "reorder,delay=4,drop=0.01,seed=7"); NULL or "" for none. NULL with `err` set on failure.
  pe_transport_t *(*create)(const char *options, char *err);
  // This instance's address blob, for peers' connect().
  int (*address)(pe_transport_t *t, uint8_t *buf, size_t cap, size_t *len, char *err);
  // Open the path to a peer process; returns a peer id >= 0, or -1 with `err` set. Connecting to
  // this instance's own address must work (a rank exchanging with itself through its proxy).
  int (*connect)(pe_transport_t *t, const uint8_t *addr, size_t len, char *err);
  // Expose [base, base + len) to peers; returns a region id >= 0 and writes its key blob.
  // `shm_name`: the POSIX shared-memory segment the region is (windows are), for transports that
  // map peers' memory (shm); NULL when the region is not one.
  int (*register_region)(pe_transport_t *t, void *base, size_t len, const char *shm_name, uint8_t *key, size_t cap,
                         size_t *key_len, char *err);
  void (*deregister_region)(pe_transport_t *t, int region);
  // A peer's region, from the key blob it published; returns a remote region id >= 0.
  int (*import_region)(pe_transport_t *t, int peer, const uint8_t *key, size_t len, char *err);
  void (*release_region)(pe_transport_t *t, int remote);
  // Post a put and/or a signal (see the top of this file). Returns PE_POSTED, PE_BUSY, or
  // PE_FAILED with `err` naming what went wrong; a failure concerns the remote's peer only.
  int (*put_signal)(pe_transport_t *t, int region, uint64_t src_off, int remote, uint64_t dst_off, uint64_t len,
                    uint64_t sig_off, int64_t value, char *err);
  // Make progress: complete posted operations, apply what arrived. Returns the number of events
  // handled (0: idle), or PE_FAILED with `err` set and `*failed_peer` the peer at fault (-1: the
  // transport itself failed). Must never block.
  int (*progress)(pe_transport_t *t, int *failed_peer, char *err);
  // Operations posted and not complete yet (0: every put has left and its source may be reused).
  uint64_t (*pending)(pe_transport_t *t);
  // A file descriptor that becomes readable when work arrives for this instance (the proxy then
  // sleeps in poll() on it), or -1: the proxy wakes up periodically instead. May re-arm.
  int (*wait_fd)(pe_transport_t *t);
  void (*stats)(pe_transport_t *t, pe_transport_stats_t *out);
  void (*destroy)(pe_transport_t *t);
} pe_transport_ops_t;

// Apply a signal that arrived (receive side of message fabrics): add `value` to the int64 at
// `sig_off` of the local region starting at `region_base` (a window), with release order, and wake
// a rank sleeping on that window. Defined by the engine (pe_window.c).
void pe_signal_apply(void *region_base, uint64_t sig_off, int64_t value);

// The built-in transports (each in its own pe_transport_*.c file).
const pe_transport_ops_t *pe_transport_shm(void);
const pe_transport_ops_t *pe_transport_fabric(void);
const pe_transport_ops_t *pe_transport_verbs(void);
const pe_transport_ops_t *pe_transport_efa(void);
// 1 when a usable RDMA device of that kind (EFA, or InfiniBand / RoCE) exists, else 0 with why in
// `err` (libibverbs missing, no device, a device of the other kind).
int pe_verbs_probe(int efa, char *err);
