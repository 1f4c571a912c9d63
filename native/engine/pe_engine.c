// The rank side of the data plane: streams, exchanges and their progress (see pe_engine.h).
#define _GNU_SOURCE
#include "pe_engine.h"

#include <stdlib.h>
#include <string.h>

#include "pe_rows.h"

#define HEADER_BYTES 64
#define HEADER_MAGIC 0x33504550u  // "PEP3"
#define OP_CHARS 36
#define HEADER_ARENA 1u  // the message's rows land in the receiver's arena, not in its slots
#define SLEEP_SLICE_US 1000  // the longest a waiting rank sleeps before it looks again
#define LIVENESS_PERIOD_S 0.002
#define SPIN_ATTEMPTS 48  // back-off steps (spins, then yields) before a waiting rank sleeps

enum peer_mode { PEER_UNSET = 0, PEER_SELF, PEER_DIRECT, PEER_PROXIED };

typedef struct header {
  uint32_t magic;
  uint32_t seq;
  uint64_t nrows;
  uint32_t row_bytes;
  int32_t ncounts;
  uint32_t flags;  // HEADER_ARENA
  char op[OP_CHARS];
} header_t;
_Static_assert(sizeof(header_t) == HEADER_BYTES, "the message header is 64 bytes");

typedef struct out_msg {
  pe_exchange_t *x;
  int index;           // the peer's position in the exchange
  uint64_t total;      // header + row bytes
  uint64_t sent;       // stream bytes written so far
  int segment;         // cursor: segment of the next row, and the row where that segment starts
  int64_t segment_start;
  int arena;           // the rows go to the peer's arena (the header alone to its slot)
  uint64_t arena_seq;  // this message's number among the arena messages to the peer
  int arena_wait;      // its rows wait for the peer to hand its arena back
  struct out_msg *next;
} out_msg_t;

typedef struct in_msg {
  pe_exchange_t *x;
  int index;
  int header_seen;
  int arena;           // the rows land in this rank's arena
  uint64_t total;
  uint64_t received;   // stream bytes consumed so far
  uint8_t *partial;    // a row that straddles two chunks
  struct in_msg *next;
} in_msg_t;

typedef struct peer {
  int mode;
  pe_window_t *window;  // direct: the peer's window
  pe_proxy_t *proxy;    // proxied
  int endpoint;
  pe_ring_t *ring;
  uint64_t sent_chunks;
  uint64_t consumed_chunks;
  uint32_t send_seq;
  uint32_t recv_seq;
  int64_t credit_owed;  // credits to hand back through the proxy
  uint64_t arena_sent;  // arena messages queued to the peer
  int release_pending;  // its arena goes back once the readers named in release_after are done
  int64_t *release_after;  // [world]: per rank, the pull-done count to wait for (or NULL)
  out_msg_t *out_head, *out_tail;
  in_msg_t *in_head, *in_tail;
  int gone;
} peer_t;

struct pe_exchange {
  pe_engine_t *e;
  char op[OP_CHARS + 1];
  int npeers;
  int32_t *peers;
  int flags;
  int64_t row_bytes;
  int32_t ncounts;
  uint64_t header_bytes;
  pe_send_t *sends;  // copies, with their segments and fields
  pe_recv_t *recvs;  // copies with their fields, or NULL until set
  int64_t *rows;
  int32_t *counts;
  uint8_t *header_known;
  uint8_t *to_done;
  uint8_t *from_done;
  uint8_t *dropped;
  uint8_t *in_arena;  // per peer: its rows landed in this rank's arena
  // This rank's own rows into final sums, held back (see move_local): per destination row, the
  // source row and its weight, summed first when a peer's row for it arrives, or at the end.
  const uint8_t **held;
  float *held_weight;
  int64_t held_rows;   // destination rows the arrays cover
  int local_held;      // this rank's rows have been held back, not yet all applied
  int pending_to;
  int pending_from;
  int refs;  // the caller's, plus one per queued message
};

struct pe_engine {
  int rank;
  int world;
  int slots;
  uint64_t chunk_bytes;
  uint64_t arena_bytes;  // per source node: where the rows of PE_ARENA messages land
  int arena_group;       // ranks per node: arena messages come from the ranks of this one's local index
  int64_t *pulls_expected;  // [world]: reads out of this rank's arenas each rank is to finish
  pe_window_t *window;
  peer_t *peers;
  int error_kind;
  int culprit;
  uint8_t *bounce;  // one row, for rows that straddle chunks (send side) and for self messages
  uint64_t bounce_bytes;
  uint8_t *own_rows;  // this rank's rows to itself, as wire rows, for sums made at the end
  uint64_t own_rows_bytes;
  pe_engine_stats_t stats;
  pe_proxy_t *proxy;  // the proxy of the proxied peers (one per process)
};

// ------------------------------------------------------------------------------------ layout
uint32_t pe_engine_num_signals(int world) { return (uint32_t)world * PE_SIGNALS_PER_PEER; }

uint64_t pe_engine_data_bytes(int world, int slots, uint64_t chunk_bytes, uint64_t arena_bytes, int arena_group) {
  // receive slots, staging slots, then an arena per node (for its rank of this one's local index)
  const uint64_t nodes = arena_group > 0 ? (uint64_t)(world / arena_group) : 0;
  return 2ull * (uint64_t)world * (uint64_t)slots * chunk_bytes + nodes * arena_bytes;
}

static inline uint32_t landed_signal(int source, int slot) { return (uint32_t)(source * PE_SIGNALS_PER_PEER + slot); }
static inline uint32_t credit_signal(int dest) { return (uint32_t)(dest * PE_SIGNALS_PER_PEER + PE_SIGNALS_PER_PEER - 1); }
// arena messages `dest` is done with (it handed its arena back), in the sender's window
static inline uint32_t arena_signal(int dest) { return (uint32_t)(dest * PE_SIGNALS_PER_PEER + PE_SIGNALS_PER_PEER - 2); }
// times `reader` finished copying rows out of this rank's arenas, in this rank's window
static inline uint32_t pull_signal(int reader) { return (uint32_t)(reader * PE_SIGNALS_PER_PEER + PE_SIGNALS_PER_PEER - 3); }

static inline uint64_t recv_offset(const pe_engine_t *e, int source, uint64_t chunk) {
  return ((uint64_t)source * (uint64_t)e->slots + chunk % (uint64_t)e->slots) * e->chunk_bytes;
}

static inline uint64_t stage_offset(const pe_engine_t *e, int dest, uint64_t chunk) {
  return ((uint64_t)(e->world + dest) * (uint64_t)e->slots + chunk % (uint64_t)e->slots) * e->chunk_bytes;
}

static inline uint64_t arena_offset(const pe_engine_t *e, int source) {
  return 2ull * (uint64_t)e->world * (uint64_t)e->slots * e->chunk_bytes +
         (uint64_t)(source / e->arena_group) * e->arena_bytes;
}

// Whether `source`'s messages to `dest` may land in an arena: one rank per node has one there,
// the rank of dest's local index on another node.
static inline int arena_pair(const pe_engine_t *e, int source, int dest) {
  return e->arena_bytes > 0 && source != dest && source % e->arena_group == dest % e->arena_group;
}

static int fail(pe_engine_t *e, int kind, int culprit) {
  e->error_kind = kind;
  e->culprit = culprit;
  return -1;
}

// -------------------------------------------------------------------------------- engine
pe_engine_t *pe_engine_create(int rank, int world, int slots, uint64_t chunk_bytes, uint64_t arena_bytes,
                              int arena_group, pe_window_t *window, char *err) {
  if (arena_group < 1 || world % arena_group || arena_bytes > PE_MAX_ARENA_BYTES) {
    pe_err(err, "engine: bad arenas (%llu bytes, %d ranks per node of %d: at most %llu bytes)",
           (unsigned long long)arena_bytes, arena_group, world, (unsigned long long)PE_MAX_ARENA_BYTES);
    return NULL;
  }
  if (world < 1 || rank < 0 || rank >= world || slots < 1 || slots > PE_MAX_SLOTS || chunk_bytes < 4096 ||
      chunk_bytes % 64) {
    pe_err(err, "engine: bad layout (rank %d of %d, %d slots of %llu bytes: at most %d slots, chunks of at least "
           "4096 bytes in multiples of 64)", rank, world, slots, (unsigned long long)chunk_bytes, PE_MAX_SLOTS);
    return NULL;
  }
  if (window->num_signals < pe_engine_num_signals(world) ||
      window->data_bytes < pe_engine_data_bytes(world, slots, chunk_bytes, arena_bytes, arena_group)) {
    pe_err(err, "engine: the window is too small for %d ranks, %d slots of %llu bytes, arenas of %llu bytes", world,
           slots, (unsigned long long)chunk_bytes, (unsigned long long)arena_bytes);
    return NULL;
  }
  pe_engine_t *e = calloc(1, sizeof *e);
  peer_t *peers = calloc((size_t)world, sizeof *peers);
  int64_t *pulls = calloc((size_t)world, sizeof *pulls);
  if (e == NULL || peers == NULL || pulls == NULL) {
    free(e);
    free(peers);
    free(pulls);
    pe_err(err, "engine: out of memory");
    return NULL;
  }
  e->rank = rank;
  e->world = world;
  e->slots = slots;
  e->chunk_bytes = chunk_bytes;
  e->arena_bytes = arena_bytes;
  e->arena_group = arena_group;
  e->window = window;
  e->peers = peers;
  e->pulls_expected = pulls;
  e->culprit = -1;
  e->peers[rank].mode = PEER_SELF;
  return e;
}

int pe_engine_set_direct(pe_engine_t *e, int peer, pe_window_t *peer_window, char *err) {
  if (peer < 0 || peer >= e->world || peer == e->rank) {
    pe_err(err, "engine: bad direct peer %d", peer);
    return -1;
  }
  e->peers[peer].mode = PEER_DIRECT;
  e->peers[peer].window = peer_window;
  return 0;
}

int pe_engine_set_proxied(pe_engine_t *e, int peer, pe_proxy_t *proxy, int endpoint, pe_ring_t *ring, char *err) {
  if (peer < 0 || peer >= e->world) {
    pe_err(err, "engine: bad proxied peer %d", peer);
    return -1;
  }
  peer_t *p = &e->peers[peer];
  p->mode = PEER_PROXIED;
  p->proxy = proxy;
  p->endpoint = endpoint;
  p->ring = ring;
  e->proxy = proxy;
  return 0;
}

static uint8_t *bounce(pe_engine_t *e, uint64_t bytes) {
  if (bytes > e->bounce_bytes) {
    uint8_t *more = realloc(e->bounce, bytes);
    if (more == NULL) return NULL;
    e->bounce = more;
    e->bounce_bytes = bytes;
  }
  return e->bounce;
}

// ------------------------------------------------------------------------------ exchanges
static void release(pe_exchange_t *x) {
  if (--x->refs > 0) return;
  if (x->sends != NULL) {
    for (int i = 0; i < x->npeers; ++i) {
      pe_segment_t *segs = (pe_segment_t *)(uintptr_t)x->sends[i].segments;
      for (int s = 0; segs != NULL && s < x->sends[i].nsegments; ++s) free((void *)(uintptr_t)segs[s].fields);
      free(segs);
      free((void *)(uintptr_t)x->sends[i].counts);
    }
  }
  if (x->recvs != NULL)
    for (int i = 0; i < x->npeers; ++i) free((void *)(uintptr_t)x->recvs[i].fields);
  free(x->sends);
  free(x->recvs);
  free(x->peers);
  free(x->rows);
  free(x->counts);
  free(x->header_known);
  free(x->to_done);
  free(x->from_done);
  free(x->dropped);
  free(x->in_arena);
  free(x->held);
  free(x->held_weight);
  free(x);
}

static void *copy_of(const void *src, size_t bytes) {
  if (bytes == 0) return NULL;
  void *dst = malloc(bytes);
  if (dst != NULL) memcpy(dst, src, bytes);
  return dst;
}

static int copy_send(pe_exchange_t *x, int i, const pe_send_t *send, char *err) {
  pe_send_t *mine = &x->sends[i];
  mine->nsegments = send->nsegments;
  mine->segments = 0;
  mine->counts = 0;
  if (send->counts && x->ncounts) {
    mine->counts = (uint64_t)(uintptr_t)copy_of((const void *)(uintptr_t)send->counts, (size_t)x->ncounts * 4);
    if (!mine->counts) goto oom;
  }
  if (send->nsegments == 0) return 0;
  const pe_segment_t *segs = (const pe_segment_t *)(uintptr_t)send->segments;
  pe_segment_t *copy = copy_of(segs, (size_t)send->nsegments * sizeof *segs);
  if (copy == NULL) goto oom;
  mine->segments = (uint64_t)(uintptr_t)copy;
  for (int s = 0; s < send->nsegments; ++s) copy[s].fields = 0;
  for (int s = 0; s < send->nsegments; ++s) {
    const pe_field_t *fields = (const pe_field_t *)(uintptr_t)segs[s].fields;
    if (segs[s].nrows < 0 || (segs[s].nrows > 0 && pe_fields_check(fields, segs[s].nfields, 1, err) != 0)) return -1;
    if (segs[s].group_end && (!segs[s].index || !segs[s].weights || !pe_fields_summable(fields, segs[s].nfields))) {
      pe_err(err, "%s: segment %d of the message to rank %d sums rows: it needs an index, weights and float fields",
             x->op, s, x->peers[i]);
      return -1;
    }
    if (segs[s].nrows > 0 && pe_fields_wire_bytes(fields, segs[s].nfields) != x->row_bytes) {
      pe_err(err, "%s: segment %d of the message to rank %d has rows of %lld bytes, the exchange %lld", x->op, s,
             x->peers[i], (long long)pe_fields_wire_bytes(fields, segs[s].nfields), (long long)x->row_bytes);
      return -1;
    }
    copy[s].fields = (uint64_t)(uintptr_t)copy_of(fields, (size_t)segs[s].nfields * sizeof *fields);
    if (segs[s].nfields && !copy[s].fields) goto oom;
  }
  return 0;
oom:
  pe_err(err, "%s: out of memory", x->op);
  return -1;
}

static int copy_recvs(pe_exchange_t *x, const pe_recv_t *recvs, char *err) {
  pe_recv_t *copy = calloc((size_t)x->npeers, sizeof *copy);
  if (copy == NULL) {
    pe_err(err, "%s: out of memory", x->op);
    return -1;
  }
  for (int i = 0; i < x->npeers; ++i) {
    copy[i] = recvs[i];
    copy[i].fields = 0;
  }
  for (int i = 0; i < x->npeers; ++i) {
    const pe_field_t *fields = (const pe_field_t *)(uintptr_t)recvs[i].fields;
    if (pe_fields_check(fields, recvs[i].nfields, 0, err) != 0 ||
        (recvs[i].nfields && pe_fields_wire_bytes(fields, recvs[i].nfields) != x->row_bytes)) {
      if (!err[0])
        pe_err(err, "%s: the receive fields for rank %d take rows of %lld bytes, the exchange %lld", x->op,
               x->peers[i], (long long)pe_fields_wire_bytes(fields, recvs[i].nfields), (long long)x->row_bytes);
      for (int j = 0; j < i; ++j) free((void *)(uintptr_t)copy[j].fields);
      free(copy);
      return -1;
    }
    const pe_final_t *fin = (const pe_final_t *)(uintptr_t)recvs[i].final;
    if (fin != NULL && (!recvs[i].index || !recvs[i].touched || recvs[i].fanout || fin->nfields != recvs[i].nfields ||
                        !pe_fields_reduce_only(fields, recvs[i].nfields))) {
      pe_err(err, "%s: a final spec needs reduce-only fields, an index, `touched` and one final field per field",
             x->op);
      for (int j = 0; j < i; ++j) free((void *)(uintptr_t)copy[j].fields);
      free(copy);
      return -1;
    }
    copy[i].fields = (uint64_t)(uintptr_t)copy_of(fields, (size_t)recvs[i].nfields * sizeof *fields);
  }
  x->recvs = copy;
  return 0;
}

static int64_t send_rows(const pe_send_t *send) {
  int64_t rows = 0;
  const pe_segment_t *segs = (const pe_segment_t *)(uintptr_t)send->segments;
  for (int s = 0; s < send->nsegments; ++s) rows += segs[s].nrows;
  return rows;
}

static void mark_dropped(pe_exchange_t *x, int i) {
  if (!x->to_done[i]) x->pending_to--;
  if (!x->from_done[i]) x->pending_from--;
  x->to_done[i] = x->from_done[i] = x->dropped[i] = x->header_known[i] = 1;
  x->rows[i] = 0;
  if (x->ncounts) memset(&x->counts[(int64_t)i * x->ncounts], 0, (size_t)x->ncounts * 4);
}

static uint64_t message_chunks(const pe_engine_t *e, uint64_t total) {
  return (total + e->chunk_bytes - 1) / e->chunk_bytes;
}

// Whether the exchange's final sums can wait for every peer's rows (PE_SUM_AT_END): see there.
static int sum_at_end_fits(const pe_exchange_t *x) {
  const pe_engine_t *e = x->e;
  if (x->recvs == NULL || (x->flags & PE_ARENA) || x->row_bytes == 0) return 0;
  const pe_recv_t *r0 = &x->recvs[0];
  const pe_final_t *fin = (const pe_final_t *)(uintptr_t)r0->final;
  if (fin == NULL) return 0;
  const pe_field_t *fields = (const pe_field_t *)(uintptr_t)r0->fields;
  const pe_field_t *final = (const pe_field_t *)(uintptr_t)fin->fields;
  for (int k = 0; k < r0->nfields; ++k)
    if (fields[k].kind == PE_REDUCE && !pe_sum_types(fields[k].wire_type, final[k].mem_type)) return 0;
  for (int i = 0; i < x->npeers; ++i) {
    const pe_recv_t *r = &x->recvs[i];
    if (r->final != r0->final || r->touched != r0->touched || r->nfields != r0->nfields || r->expect_rows < 0 ||
        memcmp((const void *)(uintptr_t)r->fields, fields, (size_t)r->nfields * sizeof *fields) != 0)
      return 0;
    const uint64_t total = x->header_bytes + (uint64_t)r->expect_rows * (uint64_t)x->row_bytes;
    if (x->peers[i] != e->rank && message_chunks(e, total) > (uint64_t)e->slots) return 0;
  }
  return 1;
}

static void write_header(const pe_exchange_t *x, int i, uint32_t seq, int arena, uint8_t *dst) {
  header_t h = {.magic = HEADER_MAGIC, .seq = seq, .nrows = (uint64_t)send_rows(&x->sends[i]),
                .row_bytes = (uint32_t)x->row_bytes, .ncounts = x->ncounts, .flags = arena ? HEADER_ARENA : 0};
  memcpy(h.op, x->op, strnlen(x->op, OP_CHARS));
  memset(dst, 0, x->header_bytes);
  memcpy(dst, &h, sizeof h);
  if (x->ncounts && x->sends[i].counts)
    memcpy(dst + HEADER_BYTES, (const void *)(uintptr_t)x->sends[i].counts, (size_t)x->ncounts * 4);
}

pe_exchange_t *pe_exchange_start(pe_engine_t *e, const char *op, int npeers, const int32_t *peers,
                                 const pe_send_t *sends, int64_t row_bytes, int32_t ncounts, const pe_recv_t *recvs,
                                 int flags, char *err) {
  e->error_kind = PE_OK;
  e->culprit = -1;
  pe_exchange_t *x = calloc(1, sizeof *x);
  if (x == NULL) {
    pe_err(err, "%s: out of memory", op);
    fail(e, PE_ERR_USAGE, -1);
    return NULL;
  }
  x->e = e;
  snprintf(x->op, sizeof x->op, "%s", op);
  x->npeers = npeers;
  x->flags = flags;
  x->row_bytes = row_bytes;
  x->ncounts = ncounts;
  x->refs = 1;
  x->header_bytes = HEADER_BYTES + pe_round_up((uint64_t)(ncounts > 0 ? ncounts : 0) * 4, 64);
  x->peers = copy_of(peers, (size_t)npeers * 4);
  x->sends = calloc((size_t)npeers, sizeof *x->sends);
  x->rows = calloc((size_t)npeers, sizeof *x->rows);
  x->counts = calloc((size_t)npeers * (size_t)(ncounts > 0 ? ncounts : 1), sizeof *x->counts);
  x->header_known = calloc((size_t)npeers, 1);
  x->to_done = calloc((size_t)npeers, 1);
  x->from_done = calloc((size_t)npeers, 1);
  x->dropped = calloc((size_t)npeers, 1);
  x->in_arena = calloc((size_t)npeers, 1);
  int ok = x->peers && x->sends && x->rows && x->counts && x->header_known && x->to_done && x->from_done &&
           x->dropped && x->in_arena;
  if (!ok) pe_err(err, "%s: out of memory", op);
  if (ok && (ncounts < 0 || row_bytes < 0 || x->header_bytes + (uint64_t)row_bytes > (1ull << 40))) {
    pe_err(err, "%s: bad row width %lld or count %d", op, (long long)row_bytes, ncounts);
    ok = 0;
  }
  int self = -1;
  for (int i = 0; ok && i < npeers; ++i) {
    int p = peers[i];
    if (p < 0 || p >= e->world || e->peers[p].mode == PEER_UNSET) {
      pe_err(err, "%s: rank %d is not a peer of this Buffer's engine", op, p);
      ok = 0;
    } else if (p == e->rank) {
      self = i;
    }
    if (ok) ok = copy_send(x, i, &sends[i], err) == 0;
  }
  if (ok && self < 0) {
    pe_err(err, "%s: rank %d is not among the exchange's ranks", op, e->rank);
    ok = 0;
  }
  if (ok && recvs != NULL) ok = copy_recvs(x, recvs, err) == 0;
  if (ok && (flags & PE_SUM_AT_END) && !sum_at_end_fits(x)) x->flags &= ~PE_SUM_AT_END;
  for (int i = 0; ok && i < npeers; ++i) {
    peer_t *p = &e->peers[peers[i]];
    if (p->gone && !(flags & PE_DROP_DEAD)) {
      pe_err(err, "%s: rank %d was dropped after it died", op, peers[i]);
      fail(e, PE_ERR_PEER, peers[i]);
      release(x);
      return NULL;
    }
  }
  if (!ok) {
    fail(e, PE_ERR_USAGE, -1);
    release(x);
    return NULL;
  }
  x->pending_to = x->pending_from = npeers;
  for (int i = 0; i < npeers; ++i) {
    int pr = peers[i];
    peer_t *p = &e->peers[pr];
    if (pr == e->rank) {  // this rank's own rows: moved when the receive side is known
      x->to_done[i] = 1;
      x->pending_to--;
      x->header_known[i] = 1;
      x->rows[i] = send_rows(&x->sends[i]);
      if (ncounts && x->sends[i].counts)
        memcpy(&x->counts[(int64_t)i * ncounts], (const void *)(uintptr_t)x->sends[i].counts, (size_t)ncounts * 4);
      continue;
    }
    if (p->gone) {
      mark_dropped(x, i);
      continue;
    }
    out_msg_t *out = calloc(1, sizeof *out);
    in_msg_t *in = calloc(1, sizeof *in);
    if (out == NULL || in == NULL) {  // nothing queued yet for this peer: fail cleanly
      free(out);
      free(in);
      pe_err(err, "%s: out of memory", op);
      fail(e, PE_ERR_USAGE, -1);
      for (int j = i; j < npeers; ++j)
        if (peers[j] != e->rank && !e->peers[peers[j]].gone) mark_dropped(x, j);
      release(x);
      return NULL;
    }
    out->x = x;
    out->index = i;
    const uint64_t rows_bytes = (uint64_t)send_rows(&x->sends[i]) * (uint64_t)row_bytes;
    out->total = x->header_bytes + rows_bytes;
    out->arena = (flags & PE_ARENA) && arena_pair(e, e->rank, pr) && rows_bytes > 0 && rows_bytes <= e->arena_bytes;
    if (out->arena) out->arena_seq = p->arena_sent++;
    in->x = x;
    in->index = i;
    x->refs += 2;
    if (p->out_tail) p->out_tail->next = out; else p->out_head = out;
    p->out_tail = out;
    if (p->in_tail) p->in_tail->next = in; else p->in_head = in;
    p->in_tail = in;
    e->stats.messages_sent++;
    if (out->total > e->chunk_bytes) e->stats.messages_split++;
  }
  return x;
}

// ------------------------------------------------------------------------------ sending
// The source row of row k of a segment that does not sum rows.
static inline int64_t segment_source(const pe_segment_t *seg, int64_t k) {
  const int64_t *index = (const int64_t *)(uintptr_t)seg->index;
  return index ? index[k] : seg->first + k;
}

// Row k of a segment where it sits in its source tensor, if that already is the wire row; else NULL.
static const uint8_t *segment_wire_row(const pe_segment_t *seg, int64_t k, int64_t row_bytes) {
  return seg->group_end ? NULL
                        : pe_source_row((const pe_field_t *)(uintptr_t)seg->fields, seg->nfields,
                                        segment_source(seg, k), row_bytes);
}

// Row i of a segment as wire bytes at `dst`: a source row, or a weighted sum of them.
static void gather_segment_row(const pe_segment_t *seg, int64_t i, uint8_t *dst) {
  const pe_field_t *fields = (const pe_field_t *)(uintptr_t)seg->fields;
  const int64_t *index = (const int64_t *)(uintptr_t)seg->index;
  if (seg->group_end) {
    const int64_t *end = (const int64_t *)(uintptr_t)seg->group_end;
    const int64_t from = i > 0 ? end[i - 1] : 0;
    pe_gather_sum(fields, seg->nfields, index + from, (const float *)(uintptr_t)seg->weights + from, end[i] - from,
                  dst);
  } else {
    pe_gather_row(fields, seg->nfields, segment_source(seg, i), dst);
  }
}

// Gather bytes [a, b) of the rows of message `m` into `dst`.
static void gather_bytes(pe_engine_t *e, out_msg_t *m, uint64_t a, uint64_t b, uint8_t *dst) {
  const pe_exchange_t *x = m->x;
  const uint64_t rb = (uint64_t)x->row_bytes;
  if (rb == 0) return;
  const pe_send_t *send = &x->sends[m->index];
  const pe_segment_t *segs = (const pe_segment_t *)(uintptr_t)send->segments;
  int64_t row = (int64_t)(a / rb);
  uint64_t off = a % rb;
  while (a < b) {
    while (row >= m->segment_start + segs[m->segment].nrows) {
      m->segment_start += segs[m->segment].nrows;
      m->segment++;
    }
    const pe_segment_t *seg = &segs[m->segment];
    const int64_t i = row - m->segment_start;
    uint64_t take = rb - off < b - a ? rb - off : b - a;
    if (off == 0 && take == rb) {
      gather_segment_row(seg, i, dst);
    } else {  // a row that straddles two chunks: gather it whole, keep the part of this chunk
      uint8_t *row_bytes = bounce(e, rb);
      if (row_bytes == NULL) abort();
      gather_segment_row(seg, i, row_bytes);
      memcpy(dst, row_bytes + off, take);
    }
    dst += take;
    a += take;
    row++;
    off = 0;
  }
}

static void push_descriptor(pe_engine_t *e, peer_t *p, const portep_descriptor_t *d) {
  pe_backoff_t b;
  pe_backoff_init(&b, 100);
  while (pe_ring_push(p->ring, d, 1) == 0) {  // full: the proxy drains it
    pe_proxy_wake(p->proxy);
    pe_backoff_step(&b);
  }
  e->stats.descriptors++;
}

// Write the next chunk of the head message to peer `pr`; returns 1 if one was written.
static int send_chunk(pe_engine_t *e, int pr) {
  peer_t *p = &e->peers[pr];
  out_msg_t *m = p->out_head;
  if (m == NULL) return 0;
  const uint64_t chunk = p->sent_chunks;
  const int64_t credit = pe_load_acquire_i64(&e->window->signals[credit_signal(pr)]);
  if ((int64_t)chunk - credit >= e->slots) {
    e->stats.credit_stalls++;
    return 0;
  }
  const pe_exchange_t *x = m->x;
  const uint64_t start = m->sent;
  uint64_t end = start + e->chunk_bytes < m->total ? start + e->chunk_bytes : m->total;
  uint64_t dst_offset = recv_offset(e, e->rank, chunk);
  if (m->arena && start == 0) {
    end = x->header_bytes;  // the header alone goes to the slot
  } else if (m->arena) {
    // The rows go to the peer's arena for this rank, once the peer is done with its last contents.
    m->arena_wait = start == x->header_bytes &&
                    pe_load_acquire_i64(&e->window->signals[arena_signal(pr)]) < (int64_t)m->arena_seq;
    if (m->arena_wait) {
      e->stats.credit_stalls++;
      return 0;
    }
    dst_offset = arena_offset(e, e->rank) + (start - x->header_bytes);
  }
  uint8_t *dst = p->mode == PEER_DIRECT ? p->window->data + dst_offset : e->window->data + stage_offset(e, pr, chunk);
  uint8_t *at = dst;
  uint64_t pos = start;
  if (pos < x->header_bytes) {
    uint8_t head[HEADER_BYTES + 4096];
    uint8_t *h = x->header_bytes <= sizeof head ? head : bounce(e, x->header_bytes);
    write_header(x, m->index, p->send_seq, m->arena, h);
    uint64_t hend = end < x->header_bytes ? end : x->header_bytes;
    memcpy(at, h + pos, hend - pos);
    at += hend - pos;
    pos = hend;
    if (hend == x->header_bytes) p->send_seq++;
  }
  if (pos < end) gather_bytes(e, m, pos - x->header_bytes, end - x->header_bytes, at);
  const uint64_t used = end - start;
  const int slot = (int)(chunk % (uint64_t)e->slots);
  if (p->mode == PEER_DIRECT) {
    pe_window_signal(p->window, landed_signal(e->rank, slot), 1);
    e->stats.bytes_direct += used;
  } else {
    portep_descriptor_t d = {.version = PORTEP_DESCRIPTOR_VERSION, .opcode = PORTEP_OP_PUT_SIGNAL,
                             .signal_slot = (uint16_t)landed_signal(e->rank, slot), .dst_rank = (uint32_t)pr,
                             .src_offset = stage_offset(e, pr, chunk), .dst_offset = dst_offset,
                             .length = (uint32_t)used, .signal_value = 1};
    push_descriptor(e, p, &d);
    e->stats.bytes_staged += used;
  }
  p->sent_chunks++;
  e->stats.chunks_written++;
  m->sent = end;
  if (end == m->total) {
    pe_exchange_t *mx = m->x;
    mx->to_done[m->index] = 1;
    mx->pending_to--;
    p->out_head = m->next;
    if (p->out_head == NULL) p->out_tail = NULL;
    free(m);
    release(mx);
  }
  return 1;
}

// ------------------------------------------------------------------------------ receiving
// Reduce `nrows` rows (wire bytes at `bytes`, `row_bytes` apart) into destination row `dst`, as
// one run; with a final spec, the contribution that completes the row writes its final value. -1
// if the row was already complete (more contributions than announced).
// A row of this rank's own held back for `dst` joins the run (summed first).
static int reduce_run(pe_exchange_t *x, const pe_recv_t *r, int64_t dst, const float *weights, const uint8_t *bytes,
                      int64_t row_bytes, int64_t nrows) {
  const pe_field_t *fields = (const pe_field_t *)(uintptr_t)r->fields;
  uint8_t *touched = (uint8_t *)(uintptr_t)r->touched;
  const pe_final_t *fin = (const pe_final_t *)(uintptr_t)r->final;
  const pe_field_t *final = NULL;
  const uint8_t *lead = NULL;
  float lead_weight = 0.0f;
  if (x->held != NULL && dst >= 0 && dst < x->held_rows && x->held[dst] != NULL) {
    lead = x->held[dst];
    lead_weight = x->held_weight[dst];
    x->held[dst] = NULL;
  }
  const int64_t copies = nrows + (lead != NULL);
  if (fin != NULL) {
    int32_t *remaining = (int32_t *)(uintptr_t)fin->remaining;
    if (remaining[dst] < copies) return -1;
    remaining[dst] -= (int32_t)copies;
    if (remaining[dst] == 0) final = (const pe_field_t *)(uintptr_t)fin->fields;
  }
  pe_reduce_rows(fields, r->nfields, dst, weights, touched ? !touched[dst] : 0, bytes, row_bytes, nrows, lead,
                 lead_weight, final);
  if (touched) touched[dst] = final != NULL ? 2 : 1;
  return 0;
}

// Apply received row `row` (its wire bytes) as `r` says; -1 if it names a destination it may not
// (a fan-out key out of range or past its end, a final row already complete).
static int apply_row(pe_exchange_t *x, const pe_recv_t *r, int64_t row, const uint8_t *bytes) {
  const pe_field_t *fields = (const pe_field_t *)(uintptr_t)r->fields;
  if (r->fanout) {
    pe_fanout_t *f = (pe_fanout_t *)(uintptr_t)r->fanout;
    int64_t *cursor = (int64_t *)(uintptr_t)f->cursor;
    const int64_t *end = (const int64_t *)(uintptr_t)f->end;
    int64_t *record = (int64_t *)(uintptr_t)f->record;
    for (int j = 0; j < f->list_count; ++j) {
      int32_t key;
      memcpy(&key, bytes + f->list_offset + 4 * j, sizeof key);
      if (key < 0) continue;
      if (key >= f->nkeys || cursor[key] >= end[key]) return -1;
      if (record != NULL) record[f->recorded++] = cursor[key];
      pe_scatter_row(fields, r->nfields, cursor[key]++, 1.0f, 0, bytes);
    }
    return 0;
  }
  const int64_t *index = (const int64_t *)(uintptr_t)r->index;
  const float *weights = (const float *)(uintptr_t)r->weights;
  uint8_t *touched = (uint8_t *)(uintptr_t)r->touched;
  const int64_t dst = index ? index[row] : r->first + row;
  if (r->final) return reduce_run(x, r, dst, weights ? weights + row : NULL, bytes, 0, 1);
  pe_scatter_row(fields, r->nfields, dst, weights ? weights[row] : 1.0f, touched ? !touched[dst] : 0, bytes);
  if (touched) touched[dst] = 1;
  return 0;
}

// Apply the rows in bytes [a, b) of message `m`; -1 (with `err`) if a row was refused.
static int scatter_bytes(pe_engine_t *e, int pr, in_msg_t *m, uint64_t a, uint64_t b, const uint8_t *src,
                         char *err) {
  pe_exchange_t *x = m->x;
  const uint64_t rb = (uint64_t)x->row_bytes;
  if (rb == 0) return 0;
  const pe_recv_t *r = &x->recvs[m->index];
  int64_t row = (int64_t)(a / rb);
  uint64_t off = a % rb;
  const int64_t *index = (const int64_t *)(uintptr_t)r->index;
  const int runs = index != NULL && !r->fanout &&
                   pe_fields_reduce_only((const pe_field_t *)(uintptr_t)r->fields, r->nfields);
  while (a < b) {
    if (runs && off == 0) {  // whole rows reducing into one destination row: summed as one run
      const int64_t whole = (int64_t)((b - a) / rb), dst = index[row];
      int64_t n = 1;
      while (n < whole && index[row + n] == dst) n++;
      if (n > 1) {
        const float *weights = (const float *)(uintptr_t)r->weights;
        if (reduce_run(x, r, dst, weights ? weights + row : NULL, src, (int64_t)rb, n) != 0) {
          pe_err(err, "%s: rows %lld.. from rank %d add more to a sum than were announced", x->op, (long long)row,
                 pr);
          return fail(e, PE_ERR_PROTOCOL, pr);
        }
        src += (uint64_t)n * rb;
        a += (uint64_t)n * rb;
        row += n;
        continue;
      }
    }
    uint64_t take = rb - off < b - a ? rb - off : b - a;
    const uint8_t *bytes = src;
    if (off != 0 || take != rb) {  // a row that straddles two chunks: assembled, then applied
      memcpy(m->partial + off, src, take);
      bytes = off + take == rb ? m->partial : NULL;
    }
    if (bytes != NULL && apply_row(x, r, row, bytes) != 0) {
      pe_err(err, "%s: row %lld from rank %d names destinations outside what its header announced", x->op,
             (long long)row, pr);
      return fail(e, PE_ERR_PROTOCOL, pr);
    }
    src += take;
    a += take;
    row++;
    off = 0;
  }
  pe_stream_fence();
  return 0;
}

static int landed(const pe_engine_t *e, int pr, uint64_t chunk) {
  const int slot = (int)(chunk % (uint64_t)e->slots);
  return pe_load_acquire_i64(&e->window->signals[landed_signal(pr, slot)]) >= (int64_t)(chunk / (uint64_t)e->slots) + 1;
}

static int check_header(pe_engine_t *e, int pr, in_msg_t *m, const header_t *h, char *err) {
  pe_exchange_t *x = m->x;
  peer_t *p = &e->peers[pr];
  char op[OP_CHARS + 1];
  memcpy(op, h->op, OP_CHARS);
  op[OP_CHARS] = '\0';
  if (h->magic != HEADER_MAGIC) {
    pe_err(err, "%s: corrupt message from rank %d (bad magic)", x->op, pr);
    return fail(e, PE_ERR_PROTOCOL, pr);
  }
  if (h->seq != p->recv_seq || strncmp(op, x->op, OP_CHARS) != 0) {
    pe_err(err, "%s: rank %d is in '%s' (its call #%u with this rank) while rank %d is in '%s' (call #%u): ranks "
           "called portep operations in different orders", x->op, pr, op, h->seq, e->rank, x->op, p->recv_seq);
    return fail(e, PE_ERR_PROTOCOL, pr);
  }
  if ((int64_t)h->row_bytes != x->row_bytes || h->ncounts != x->ncounts) {
    pe_err(err, "%s: rank %d sends rows of %u bytes, rank %d expects %lld: ranks disagree on the shape (hidden, "
           "top-k, dtype or buffer sizes)", x->op, pr, h->row_bytes, e->rank, (long long)x->row_bytes);
    return fail(e, PE_ERR_PROTOCOL, pr);
  }
  const uint64_t rows_bytes = h->nrows * (uint64_t)x->row_bytes;
  if ((h->flags & HEADER_ARENA) && (!(x->flags & PE_ARENA) || !arena_pair(e, pr, e->rank) || rows_bytes == 0 ||
                                    rows_bytes > e->arena_bytes)) {
    pe_err(err, "%s: rank %d put %llu bytes of rows into an arena of %llu bytes on rank %d: ranks disagree on the "
           "arena size", x->op, pr, (unsigned long long)rows_bytes, (unsigned long long)e->arena_bytes, e->rank);
    return fail(e, PE_ERR_PROTOCOL, pr);
  }
  p->recv_seq++;
  m->header_seen = 1;
  m->arena = (h->flags & HEADER_ARENA) != 0;
  x->in_arena[m->index] = (uint8_t)m->arena;
  e->stats.arena_messages += (uint64_t)m->arena;
  m->total = x->header_bytes + rows_bytes;
  x->rows[m->index] = (int64_t)h->nrows;
  if (x->ncounts)
    memcpy(&x->counts[(int64_t)m->index * x->ncounts], (const uint8_t *)h + HEADER_BYTES, (size_t)x->ncounts * 4);
  x->header_known[m->index] = 1;
  return 0;
}

static int check_rows(pe_engine_t *e, int pr, in_msg_t *m, char *err) {
  const pe_exchange_t *x = m->x;
  const pe_recv_t *r = &x->recvs[m->index];
  if (r->expect_rows >= 0 && r->expect_rows != x->rows[m->index]) {
    pe_err(err, "%s: rank %d sent %lld row(s), rank %d expected %lld", x->op, pr, (long long)x->rows[m->index],
           e->rank, (long long)r->expect_rows);
    return fail(e, PE_ERR_PROTOCOL, pr);
  }
  if (x->row_bytes && m->partial == NULL && (m->partial = malloc((size_t)x->row_bytes)) == NULL) {
    pe_err(err, "%s: out of memory", x->op);
    return fail(e, PE_ERR_USAGE, -1);
  }
  return 0;
}

// Message `m` from peer `pr` is consumed whole: the exchange is done with it.
static void finish_message(pe_engine_t *e, int pr, in_msg_t *m) {
  peer_t *p = &e->peers[pr];
  pe_exchange_t *x = m->x;
  x->from_done[m->index] = 1;
  x->pending_from--;
  p->in_head = m->next;
  if (p->in_head == NULL) p->in_tail = NULL;
  free(m->partial);
  free(m);
  release(x);
}

// This rank's rows to itself must be as many as its receive expects (when it says): 0, or -1.
static int check_own_rows(pe_engine_t *e, const pe_exchange_t *x, int i, char *err) {
  const pe_recv_t *r = &x->recvs[i];
  if (r->expect_rows < 0 || r->expect_rows == x->rows[i]) return 0;
  pe_err(err, "%s: rank %d sends %lld row(s) to itself, expected %lld", x->op, e->rank, (long long)x->rows[i],
         (long long)r->expect_rows);
  return fail(e, PE_ERR_USAGE, -1);
}

static void hand_back_credit(pe_engine_t *e, int pr) {
  peer_t *p = &e->peers[pr];
  if (p->mode == PEER_DIRECT)
    pe_window_signal(p->window, credit_signal(e->rank), 1);
  else
    p->credit_owed++;
}

// Consume the next landed chunk from peer `pr`; returns 1 if one was consumed, 0 if none could
// be, -1 on error.
static int recv_chunk(pe_engine_t *e, int pr, char *err) {
  peer_t *p = &e->peers[pr];
  in_msg_t *m = p->in_head;
  if (m == NULL || !landed(e, pr, p->consumed_chunks)) return 0;
  const uint8_t *src = e->window->data + recv_offset(e, pr, p->consumed_chunks);
  pe_exchange_t *x = m->x;
  if (!m->header_seen && check_header(e, pr, m, (const header_t *)src, err) != 0) return -1;
  if (x->recvs == NULL) return 0;  // the caller has not said where the rows go yet
  if (m->received == 0 && check_rows(e, pr, m, err) != 0) return -1;
  if (x->flags & PE_SUM_AT_END) return 0;  // left in the slots: sum_at_end consumes the whole message
  const uint64_t start = m->received;
  uint64_t end = start + e->chunk_bytes < m->total ? start + e->chunk_bytes : m->total;
  if (m->arena && start == 0)
    end = x->header_bytes;
  else if (m->arena)
    src = e->window->data + arena_offset(e, pr) + (start - x->header_bytes);
  uint64_t pos = start < x->header_bytes ? (end < x->header_bytes ? end : x->header_bytes) : start;
  if (pos < end && scatter_bytes(e, pr, m, pos - x->header_bytes, end - x->header_bytes, src + (pos - start), err) != 0)
    return -1;
  m->received = end;
  p->consumed_chunks++;
  e->stats.chunks_read++;
  hand_back_credit(e, pr);
  if (end == m->total) finish_message(e, pr, m);
  return 1;
}

// Whether this rank's rows to itself can be held back until a peer's row for the same sum
// arrives (a final sum, so the accumulator is then never written for a row of two copies): rows
// that reduce into final sums and that already are the wire rows in their source tensors (checked
// on each segment's first row here, on every row by hold_local).
static int holdable(const pe_exchange_t *x, int i) {
  const pe_recv_t *r = &x->recvs[i];
  if (!r->final || !r->index || r->fanout || !r->touched) return 0;
  const pe_segment_t *segs = (const pe_segment_t *)(uintptr_t)x->sends[i].segments;
  for (int s = 0; s < x->sends[i].nsegments; ++s)
    if (segs[s].nrows > 0 && segment_wire_row(&segs[s], 0, x->row_bytes) == NULL) return 0;
  return 1;
}

static void drop_held(pe_exchange_t *x) {
  free(x->held);
  free(x->held_weight);
  x->held = NULL;
  x->held_weight = NULL;
  x->held_rows = 0;
}

// Hold this rank's rows to itself back (see `holdable`); 0, or -1 (not held: out of memory, a row
// that is not the wire row, or two rows into one sum).
static int hold_local(pe_exchange_t *x, int i) {
  const pe_recv_t *r = &x->recvs[i];
  const int64_t *index = (const int64_t *)(uintptr_t)r->index;
  const float *weights = (const float *)(uintptr_t)r->weights;
  const int64_t rows = x->rows[i];
  int64_t top = -1;
  for (int64_t k = 0; k < rows; ++k) top = index[k] > top ? index[k] : top;
  x->held_rows = top + 1;
  x->held = calloc((size_t)(top + 1 > 0 ? top + 1 : 1), sizeof *x->held);
  x->held_weight = malloc((size_t)(top + 1 > 0 ? top + 1 : 1) * sizeof *x->held_weight);
  if (x->held == NULL || x->held_weight == NULL) {
    drop_held(x);
    return -1;
  }
  const pe_segment_t *segs = (const pe_segment_t *)(uintptr_t)x->sends[i].segments;
  int64_t out = 0;
  for (int s = 0; s < x->sends[i].nsegments; ++s) {
    for (int64_t k = 0; k < segs[s].nrows; ++k, ++out) {
      const int64_t dst = index[out];
      const uint8_t *row = segment_wire_row(&segs[s], k, x->row_bytes);
      if (row == NULL || dst < 0 || x->held[dst] != NULL) {
        drop_held(x);
        return -1;
      }
      x->held[dst] = row;
      x->held_weight[dst] = weights ? weights[out] : 1.0f;
    }
  }
  x->local_held = 1;
  return 0;
}

// The rows still held back once every peer's rows are in: each a sum of its own.
static int apply_held(pe_exchange_t *x, int i) {
  const pe_recv_t *r = &x->recvs[i];
  for (int64_t dst = 0; dst < x->held_rows; ++dst)
    if (x->held[dst] != NULL && reduce_run(x, r, dst, NULL, NULL, 0, 0) != 0) return -1;
  x->local_held = 0;
  return 0;
}

// ------------------------------------------------------------------- sums made at the end
// Row `row` of message `m` from peer `pr`, whose first chunk is the peer's next unconsumed one and
// which has landed whole: in place, or assembled in m->partial when the end of the peer's slots
// splits it (one row of a message at most, as a message spans no more chunks than there are slots).
static const uint8_t *landed_row(pe_engine_t *e, int pr, in_msg_t *m, int64_t row) {
  const peer_t *p = &e->peers[pr];
  const uint64_t rb = (uint64_t)m->x->row_bytes, slots = (uint64_t)e->slots;
  const uint64_t pos = m->x->header_bytes + (uint64_t)row * rb;
  uint64_t chunk = p->consumed_chunks + pos / e->chunk_bytes, off = pos % e->chunk_bytes;
  const uint64_t last = p->consumed_chunks + (pos + rb - 1) / e->chunk_bytes;
  if (chunk % slots + (last - chunk) < slots) return e->window->data + recv_offset(e, pr, chunk) + off;
  for (uint64_t done = 0; done < rb; ++chunk, off = 0) {
    const uint64_t take = e->chunk_bytes - off < rb - done ? e->chunk_bytes - off : rb - done;
    memcpy(m->partial + done, e->window->data + recv_offset(e, pr, chunk) + off, take);
    done += take;
  }
  return m->partial;
}

// Whether peer i's whole message of exchange `x` has landed (its header checked).
static int message_landed(pe_engine_t *e, const pe_exchange_t *x, int i) {
  const int pr = x->peers[i];
  const peer_t *p = &e->peers[pr];
  const in_msg_t *m = p->in_head;
  if (m == NULL || m->x != x || !m->header_seen || m->partial == NULL) return 0;
  const uint64_t n = message_chunks(e, m->total);
  for (uint64_t j = 0; j < n; ++j)  // each slot has its own counter: a reordering fabric lands them in any order
    if (!landed(e, pr, p->consumed_chunks + j)) return 0;
  return 1;
}

// This rank's rows to itself as wire rows: where they already are, or gathered into own_rows.
static int own_wire_rows(pe_engine_t *e, pe_exchange_t *x, int i, const uint8_t **rows) {
  const int64_t n = x->rows[i], rb = x->row_bytes;
  const pe_segment_t *segs = (const pe_segment_t *)(uintptr_t)x->sends[i].segments;
  if ((uint64_t)(n * rb) > e->own_rows_bytes) {
    uint8_t *more = realloc(e->own_rows, (size_t)(n * rb));
    if (more == NULL) return -1;
    e->own_rows = more;
    e->own_rows_bytes = (uint64_t)(n * rb);
  }
  int64_t out = 0;
  for (int s = 0; s < x->sends[i].nsegments; ++s)
    for (int64_t k = 0; k < segs[s].nrows; ++k, ++out) {
      rows[out] = segment_wire_row(&segs[s], k, rb);
      if (rows[out] == NULL) {
        gather_segment_row(&segs[s], k, e->own_rows + out * rb);
        rows[out] = e->own_rows + out * rb;
      }
    }
  return 0;
}

// Consume peer i's landed message at once: its credits go back, the exchange is done with it.
static void consume_message(pe_engine_t *e, const pe_exchange_t *x, int i) {
  const int pr = x->peers[i];
  peer_t *p = &e->peers[pr];
  in_msg_t *m = p->in_head;
  const uint64_t n = message_chunks(e, m->total);
  for (uint64_t j = 0; j < n; ++j) hand_back_credit(e, pr);
  p->consumed_chunks += n;
  e->stats.chunks_read += n;
  finish_message(e, pr, m);
}

// PE_SUM_AT_END: once every peer's message has landed whole, each destination row's copies (this
// rank's own among them) are summed in one sweep straight into its final row, in the order of the
// exchange's ranks, and every message is consumed at once. 1 when done, 0 while rows are on their
// way, -1 on error.
static int sum_at_end(pe_engine_t *e, pe_exchange_t *x, char *err) {
  if (x->recvs == NULL || x->pending_from == 0) return 0;
  int64_t total = 0, ndst = 0;
  for (int i = 0; i < x->npeers; ++i) {
    if (x->from_done[i]) continue;  // dropped
    if (x->peers[i] != e->rank && !message_landed(e, x, i)) return 0;
    if (x->peers[i] == e->rank && check_own_rows(e, x, i, err) != 0) return -1;
    const int64_t *index = (const int64_t *)(uintptr_t)x->recvs[i].index;
    for (int64_t k = 0; k < x->rows[i]; ++k) ndst = index[k] >= ndst ? index[k] + 1 : ndst;
    total += x->rows[i];
  }
  const pe_recv_t *r0 = &x->recvs[0];
  const pe_final_t *fin = (const pe_final_t *)(uintptr_t)r0->final;
  int32_t *remaining = (int32_t *)(uintptr_t)fin->remaining;
  uint8_t *touched = (uint8_t *)(uintptr_t)r0->touched;
  const uint8_t **rows = malloc((size_t)(total > 0 ? total : 1) * sizeof *rows);
  const uint8_t **list = malloc((size_t)(total > 0 ? total : 1) * sizeof *list);
  float *weight = malloc((size_t)(total > 0 ? total : 1) * sizeof *weight);
  int64_t *start = calloc((size_t)ndst + 1, sizeof *start), *fill = malloc(((size_t)ndst + 1) * sizeof *fill);
  int rc = -1, culprit = -1;
  if (!rows || !list || !weight || !start || !fill) {
    pe_err(err, "%s: out of memory", x->op);
    goto out;
  }
  // every copy's row, and a list per destination row (counting sort), checked against the count
  int64_t at = 0;
  for (int i = 0; i < x->npeers; ++i) {
    if (x->from_done[i]) continue;
    const int pr = x->peers[i];
    const int64_t *index = (const int64_t *)(uintptr_t)x->recvs[i].index;
    if (pr == e->rank) {
      if (own_wire_rows(e, x, i, rows + at) != 0) {
        pe_err(err, "%s: out of memory", x->op);
        goto out;
      }
    } else {
      for (int64_t k = 0; k < x->rows[i]; ++k) rows[at + k] = landed_row(e, pr, e->peers[pr].in_head, k);
    }
    for (int64_t k = 0; k < x->rows[i]; ++k) {
      if (index[k] < 0) {
        pe_err(err, "%s: row %lld from rank %d names destination %lld", x->op, (long long)k, pr, (long long)index[k]);
        culprit = pr;
        goto out;
      }
      start[index[k] + 1]++;
    }
    at += x->rows[i];
  }
  for (int64_t d = 0; d < ndst; ++d) start[d + 1] += start[d];
  memcpy(fill, start, ((size_t)ndst + 1) * sizeof *fill);
  at = 0;
  for (int i = 0; i < x->npeers; ++i) {
    if (x->from_done[i]) continue;
    const int64_t *index = (const int64_t *)(uintptr_t)x->recvs[i].index;
    const float *w = (const float *)(uintptr_t)x->recvs[i].weights;
    for (int64_t k = 0; k < x->rows[i]; ++k) {
      const int64_t d = index[k], j = fill[d]++;
      if (j - start[d] >= remaining[d]) {
        pe_err(err, "%s: rows from rank %d add more to a sum than were announced", x->op, x->peers[i]);
        culprit = x->peers[i];
        goto out;
      }
      list[j] = rows[at + k];
      weight[j] = w ? w[k] : 1.0f;
    }
    at += x->rows[i];
  }
  const pe_field_t *fields = (const pe_field_t *)(uintptr_t)r0->fields;
  const pe_field_t *final = (const pe_field_t *)(uintptr_t)fin->fields;
  for (int64_t d = 0; d < ndst; ++d) {
    const int64_t n = start[d + 1] - start[d];
    if (n == 0) continue;
    pe_sum_final(fields, r0->nfields, final, d, list + start[d], weight + start[d], n);
    remaining[d] -= (int32_t)n;
    touched[d] = 2;
  }
  for (int i = 0; i < x->npeers; ++i) {
    if (x->from_done[i]) continue;
    if (x->peers[i] != e->rank) {
      consume_message(e, x, i);
    } else {
      e->stats.bytes_local += (uint64_t)(x->rows[i] * x->row_bytes);
      x->from_done[i] = 1;
      x->pending_from--;
    }
  }
  e->stats.sums_at_end++;
  rc = 1;
out:
  free(rows);
  free(list);
  free(weight);
  free(start);
  free(fill);
  if (rc < 0) return fail(e, culprit >= 0 ? PE_ERR_PROTOCOL : PE_ERR_USAGE, culprit);
  return rc;
}

// This rank's rows to itself: straight from the source tensors to the destination ones, row by
// row, through a one-row bounce buffer (it stays in the cache) unless the source row already is
// the wire row. Rows into final sums are held back instead, when they can be (`holdable`), and
// summed with the first peer row for the same sum: one pass over the output, none over a float32
// accumulator, for a sum of two copies.
static int move_local(pe_engine_t *e, pe_exchange_t *x, char *err) {
  if (x->flags & PE_SUM_AT_END) return sum_at_end(e, x, err);
  int i = 0;
  while (x->peers[i] != e->rank) ++i;
  if (x->from_done[i] || x->recvs == NULL) return 0;
  const pe_recv_t *r = &x->recvs[i];
  const int64_t rows = x->rows[i];
  if (x->local_held) {  // held back: done once every peer's rows are in
    if (x->pending_from > 1) return 0;
    if (apply_held(x, i) != 0) {
      pe_err(err, "%s: rank %d adds more rows to its own sums than were announced", x->op, e->rank);
      return fail(e, PE_ERR_USAGE, -1);
    }
    pe_stream_fence();
    x->from_done[i] = 1;
    x->pending_from--;
    return 1;
  }
  if (check_own_rows(e, x, i, err) != 0) return -1;
  if (rows > 0 && x->pending_from > 1 && holdable(x, i) && hold_local(x, i) == 0) {
    e->stats.bytes_local += (uint64_t)(rows * x->row_bytes);
    return 1;
  }
  uint8_t *row = x->row_bytes ? bounce(e, (uint64_t)x->row_bytes) : NULL;
  if (x->row_bytes && row == NULL) {
    pe_err(err, "%s: out of memory", x->op);
    return fail(e, PE_ERR_USAGE, -1);
  }
  const pe_send_t *send = &x->sends[i];
  const pe_segment_t *segs = (const pe_segment_t *)(uintptr_t)send->segments;
  int64_t out = 0;
  for (int s = 0; x->row_bytes && s < send->nsegments; ++s) {
    const pe_segment_t *seg = &segs[s];
    for (int64_t k = 0; k < seg->nrows; ++k, ++out) {
      const uint8_t *src = segment_wire_row(seg, k, x->row_bytes);  // no copy when it already is the wire row
      if (src == NULL) {
        gather_segment_row(seg, k, row);
        src = row;
      }
      if (apply_row(x, r, out, src) != 0) {
        pe_err(err, "%s: a row rank %d sends to itself names destinations outside its counts", x->op, e->rank);
        return fail(e, PE_ERR_USAGE, -1);
      }
    }
  }
  pe_stream_fence();
  e->stats.bytes_local += (uint64_t)(rows * x->row_bytes);
  x->from_done[i] = 1;
  x->pending_from--;
  return 1;
}

// Raise counter `signal` of proxied peer `pr`'s window by `value`, through the proxy.
static void push_signal(pe_engine_t *e, int pr, uint32_t signal, int64_t value) {
  portep_descriptor_t d = {.version = PORTEP_DESCRIPTOR_VERSION, .opcode = PORTEP_OP_SIGNAL,
                           .signal_slot = (uint16_t)signal, .dst_rank = (uint32_t)pr, .signal_value = (int32_t)value};
  push_descriptor(e, &e->peers[pr], &d);
}

static void flush_credits(pe_engine_t *e) {
  for (int pr = 0; pr < e->world; ++pr) {
    peer_t *p = &e->peers[pr];
    if (p->credit_owed == 0) continue;
    push_signal(e, pr, credit_signal(e->rank), p->credit_owed);
    p->credit_owed = 0;
  }
}

static void release_ready(pe_engine_t *e);

// One pass over every stream: consume what landed, write what credits allow, hand back the
// arenas whose readers are done. Returns chunks moved (0: nothing to do), or -1 on error.
static int progress(pe_engine_t *e, pe_exchange_t *x, char *err) {
  int moved = 0;
  int pushed = 0;
  release_ready(e);
  for (int k = 1; k < e->world; ++k) {
    const int pr = (e->rank + k) % e->world;  // start after this rank: peers do not all hit rank 0 first
    peer_t *p = &e->peers[pr];
    if (p->mode == PEER_UNSET || p->gone) continue;
    for (;;) {
      int got = recv_chunk(e, pr, err);
      if (got < 0) return -1;
      if (!got) break;
      moved++;
    }
    while (send_chunk(e, pr)) {
      moved++;
      pushed |= p->mode == PEER_PROXIED;
    }
  }
  if (x != NULL) {
    int local = move_local(e, x, err);
    if (local < 0) return -1;
    moved += local;
  }
  for (int pr = 0; pr < e->world; ++pr) pushed |= e->peers[pr].credit_owed != 0;
  if (pushed) {
    flush_credits(e);
    if (e->proxy) pe_proxy_help(e->proxy);  // post them now rather than wait for the proxy thread
  }
  return moved;
}

// Fail if the exchange waits on a peer whose link failed, or on this rank's stopped proxy.
static int check_links(pe_engine_t *e, pe_exchange_t *x, char *err) {
  if (e->proxy && pe_proxy_status(e->proxy, NULL) != 0) {
    char why[PE_ERR_LEN] = "";
    pe_proxy_status(e->proxy, why);
    pe_err(err, "%s: this rank's proxy stopped: %s", x->op, why);
    return fail(e, PE_ERR_PROXY, e->rank);
  }
  for (int i = 0; i < x->npeers; ++i) {
    if (x->to_done[i] && x->from_done[i]) continue;
    peer_t *p = &e->peers[x->peers[i]];
    char why[PE_ERR_LEN] = "";
    if (p->mode == PEER_PROXIED && pe_proxy_rank_status(p->proxy, p->endpoint, x->peers[i], why) != 0) {
      if (x->flags & PE_DROP_DEAD) {  // as for a dead rank: go on without it
        pe_engine_drop(e, x->peers[i]);
        continue;
      }
      pe_err(err, "%s: rank %d is unreachable: %s", x->op, x->peers[i], why);
      return fail(e, PE_ERR_PEER, x->peers[i]);
    }
    in_msg_t *head = p->in_head;
    if (!x->from_done[i] && head != NULL && head->x != x && head->x->recvs == NULL && head->header_seen) {
      pe_err(err, "%s: an earlier call's rows from rank %d are still waiting for their receive (call the receive "
             "hooks in the order of the calls)", x->op, x->peers[i]);
      return fail(e, PE_ERR_USAGE, -1);
    }
  }
  return 0;
}

static int headers_done(const pe_exchange_t *x) {
  for (int i = 0; i < x->npeers; ++i)
    if (!x->header_known[i]) return 0;
  return 1;
}

static int exchange_done(const pe_exchange_t *x) { return x->pending_to == 0 && x->pending_from == 0; }

// Progress until `done(x)` or `wait_s` passed: 0, 1 (not yet) or -1.
static int wait_for(pe_exchange_t *x, int (*done)(const pe_exchange_t *), double wait_s, char *err) {
  pe_engine_t *e = x->e;
  const double start = pe_now_s(), until = start + wait_s;
  double last_check = start;
  pe_backoff_t b;
  pe_backoff_init(&b, SLEEP_SLICE_US);
  pe_window_control_t *ctl = e->window->control;
  for (;;) {
    int moved = progress(e, x, err);
    if (moved < 0) return -1;
    if (done(x)) return 0;
    if (moved || (e->proxy && pe_proxy_help(e->proxy))) {  // nothing of ours to move: move the proxy's
      pe_backoff_reset(&b);
      continue;
    }
    double now = pe_now_s();
    if (now - last_check > LIVENESS_PERIOD_S) {
      last_check = now;
      if (check_links(e, x, err) != 0) return -1;
    }
    if (now >= until) return 1;
    if (b.attempts < SPIN_ATTEMPTS) {  // spin, then yield: the data may be moments away
      pe_backoff_step(&b);
      continue;
    }
    // Sleep on this window's doorbell; whoever raises one of its signals rings it.
    const uint32_t seen = pe_load_acquire_u32(&ctl->doorbell.ring);
    pe_add_seq_u32(&ctl->doorbell.sleepers, 1);
    moved = progress(e, x, err);  // a last look after announcing ourselves
    if (moved == 0 && !done(x)) {
      double left_us = (until - pe_now_s()) * 1e6;
      uint32_t timeout = left_us < SLEEP_SLICE_US ? (left_us > 0 ? (uint32_t)left_us : 1) : SLEEP_SLICE_US;
      e->stats.sleeps++;
      pe_doorbell_wait(&ctl->doorbell, seen, timeout, 1);
    }
    __atomic_sub_fetch(&ctl->doorbell.sleepers, 1, __ATOMIC_SEQ_CST);
    if (moved < 0) return -1;
    if (moved > 0) pe_backoff_reset(&b);
  }
}

int pe_exchange_wait_headers(pe_exchange_t *x, double wait_s, char *err) {
  return headers_done(x) ? 0 : wait_for(x, headers_done, wait_s, err);
}

int pe_exchange_headers(pe_exchange_t *x, double wait_s, int64_t *rows, int32_t *counts, char *err) {
  int rc = pe_exchange_wait_headers(x, wait_s, err);
  if (rc == 0) {
    memcpy(rows, x->rows, (size_t)x->npeers * sizeof *rows);
    if (x->ncounts) memcpy(counts, x->counts, (size_t)x->npeers * (size_t)x->ncounts * 4);
  }
  return rc;
}

int pe_exchange_set_recv(pe_exchange_t *x, const pe_recv_t *recvs, char *err) {
  if (x->recvs != NULL) {
    pe_err(err, "%s: the receive side was already set", x->op);
    return fail(x->e, PE_ERR_USAGE, -1);
  }
  if (copy_recvs(x, recvs, err) != 0) return fail(x->e, PE_ERR_USAGE, -1);
  return 0;
}

int pe_exchange_push(pe_exchange_t *x, char *err) { return progress(x->e, x, err) < 0 ? -1 : 0; }

int pe_exchange_wait(pe_exchange_t *x, double wait_s, char *err) {
  if (x->recvs == NULL) {
    pe_err(err, "%s: set the receive side before waiting for the rows", x->op);
    return fail(x->e, PE_ERR_USAGE, -1);
  }
  return exchange_done(x) ? 0 : wait_for(x, exchange_done, wait_s, err);
}

void pe_exchange_describe(pe_exchange_t *x, int32_t *state, char *text, size_t cap) {
  pe_engine_t *e = x->e;
  size_t used = 0;
  text[0] = '\0';
  for (int i = 0; i < x->npeers; ++i) {
    state[i] = x->peers[i] == e->rank ? 0 : (x->to_done[i] ? 0 : 1) | (x->from_done[i] ? 0 : 2);
    if (!state[i] || used + 1 >= cap) continue;
    peer_t *p = &e->peers[x->peers[i]];
    int n = 0;
    if (!x->from_done[i]) {
      uint64_t have = 0, total = 0;
      int seen = 0;
      for (in_msg_t *m = p->in_head; m != NULL; m = m->next)
        if (m->x == x) {
          have = m->received;
          total = m->total;
          seen = m->header_seen;
        }
      if (seen)
        n = snprintf(text + used, cap - used, "%srank %d: %llu of %llu byte(s) missing", used ? "; " : "",
                     x->peers[i], (unsigned long long)(total - have), (unsigned long long)total);
      else
        n = snprintf(text + used, cap - used, "%srank %d: nothing arrived", used ? "; " : "", x->peers[i]);
    }
    if (n > 0 && (size_t)n < cap - used) used += (size_t)n;
    if (!x->to_done[i] && used + 1 < cap) {
      int arena_wait = 0;
      for (out_msg_t *m = p->out_head; m != NULL; m = m->next) arena_wait |= m->x == x && m->arena_wait;
      if (arena_wait)
        n = snprintf(text + used, cap - used, "%srank %d has not handed its arena back (its node's ranks are still "
                     "reading it)", used ? "; " : "", x->peers[i]);
      else
        n = snprintf(text + used, cap - used, "%srank %d: no credit for chunk %llu", used ? "; " : "", x->peers[i],
                     (unsigned long long)p->sent_chunks);
      if (n > 0 && (size_t)n < cap - used) used += (size_t)n;
    }
  }
}

void pe_exchange_dropped(pe_exchange_t *x, int32_t *dropped) {
  for (int i = 0; i < x->npeers; ++i) dropped[i] = x->dropped[i];
}

const uint8_t *pe_exchange_arena_rows(const pe_exchange_t *x, int i) {
  return x->in_arena[i] ? x->e->window->data + arena_offset(x->e, x->peers[i]) : NULL;
}

static void release_arena_now(pe_engine_t *e, int source) {
  peer_t *p = &e->peers[source];
  p->release_pending = 0;
  if (p->mode == PEER_DIRECT) {
    pe_window_signal(p->window, arena_signal(e->rank), 1);
  } else if (p->mode == PEER_PROXIED && !p->gone) {
    push_signal(e, source, arena_signal(e->rank), 1);
    pe_proxy_help(p->proxy);
  }
}

void pe_engine_expect_pulls(pe_engine_t *e, const uint8_t *readers) {
  for (int r = 0; r < e->world; ++r) e->pulls_expected[r] += readers[r] != 0;
}

int pe_engine_release_arena(pe_engine_t *e, int source, int after_pulls) {
  peer_t *p = &e->peers[source];
  if (!after_pulls) {
    release_arena_now(e, source);
    return 0;
  }
  if (p->release_after == NULL && (p->release_after = malloc((size_t)e->world * sizeof *p->release_after)) == NULL)
    return -1;
  memcpy(p->release_after, e->pulls_expected, (size_t)e->world * sizeof *p->release_after);
  p->release_pending = 1;
  return 0;
}

// Hand back the arenas whose readers are all done (pe_engine_release_arena with `pulls`).
static void release_ready(pe_engine_t *e) {
  for (int s = 0; s < e->world; ++s) {
    peer_t *p = &e->peers[s];
    if (!p->release_pending) continue;
    int ready = 1;
    for (int r = 0; ready && r < e->world; ++r)
      ready = pe_load_acquire_i64(&e->window->signals[pull_signal(r)]) >= p->release_after[r];
    if (ready) release_arena_now(e, s);
  }
}

uint64_t pe_engine_arena_bytes(const pe_engine_t *e) { return e->arena_bytes; }

const uint8_t *pe_engine_peer_arena(const pe_engine_t *e, int holder, int source) {
  if (holder < 0 || holder >= e->world || source < 0 || source >= e->world || !arena_pair(e, source, holder))
    return NULL;
  if (holder == e->rank) return e->window->data + arena_offset(e, source);
  const peer_t *p = &e->peers[holder];
  return p->mode == PEER_DIRECT ? p->window->data + arena_offset(e, source) : NULL;
}

int pe_engine_maps(const pe_engine_t *e, int peer) { return peer == e->rank || e->peers[peer].mode == PEER_DIRECT; }

void pe_engine_pull_done(pe_engine_t *e, int holder, uint64_t bytes) {
  e->stats.bytes_pulled += bytes;
  pe_window_signal(holder == e->rank ? e->window : e->peers[holder].window, pull_signal(e->rank), 1);
}

void pe_exchange_free(pe_exchange_t *x) {
  if (x != NULL) release(x);
}

// ------------------------------------------------------------------------------ dead peers
void pe_engine_drop(pe_engine_t *e, int peer) {
  if (peer < 0 || peer >= e->world || peer == e->rank) return;
  peer_t *p = &e->peers[peer];
  p->gone = 1;
  while (p->out_head) {
    out_msg_t *m = p->out_head;
    p->out_head = m->next;
    if (m->x->flags & PE_DROP_DEAD) mark_dropped(m->x, m->index);
    release(m->x);
    free(m);
  }
  while (p->in_head) {
    in_msg_t *m = p->in_head;
    p->in_head = m->next;
    if (m->x->flags & PE_DROP_DEAD) mark_dropped(m->x, m->index);
    release(m->x);
    free(m->partial);
    free(m);
  }
  p->out_tail = NULL;
  p->in_tail = NULL;
}

int pe_engine_drain(pe_engine_t *e, const int32_t *skip, double timeout_s) {
  const double deadline = pe_now_s() + timeout_s;
  pe_backoff_t b;
  pe_backoff_init(&b, SLEEP_SLICE_US);
  char err[PE_ERR_LEN] = "";
  for (;;) {
    int owing = 0;
    for (int pr = 0; pr < e->world; ++pr) {
      peer_t *p = &e->peers[pr];
      if (pr == e->rank || p->gone || p->mode == PEER_UNSET || (skip && skip[pr])) continue;
      if (p->out_head || pe_load_acquire_i64(&e->window->signals[credit_signal(pr)]) < (int64_t)p->sent_chunks)
        owing++;
    }
    if (owing == 0 || pe_now_s() > deadline) return owing;
    if (progress(e, NULL, err) > 0)
      pe_backoff_reset(&b);
    else
      pe_backoff_step(&b);
  }
}

int pe_engine_rank(const pe_engine_t *e) { return e->rank; }

int pe_engine_world(const pe_engine_t *e) { return e->world; }

int pe_engine_fail(pe_engine_t *e, int kind) { return fail(e, kind, -1); }

int pe_engine_error(pe_engine_t *e, int32_t *culprit) {
  *culprit = e->culprit;
  return e->error_kind;
}

void pe_engine_stats(pe_engine_t *e, pe_engine_stats_t *out) { *out = e->stats; }

void pe_engine_destroy(pe_engine_t *e) {
  if (e == NULL) return;
  for (int pr = 0; pr < e->world; ++pr) {
    peer_t *p = &e->peers[pr];
    int gone = p->gone;
    pe_engine_drop(e, pr);
    p->gone = gone;
  }
  for (int pr = 0; pr < e->world; ++pr) free(e->peers[pr].release_after);
  free(e->bounce);
  free(e->own_rows);
  free(e->peers);
  free(e->pulls_expected);
  free(e);
}
