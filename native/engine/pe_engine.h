// The rank side of portep's data plane: credit-based streams between the ranks of one Buffer, with
// the per-byte work fused into them.
//
// Every ordered pair of ranks (s, d) has one stream. d's window holds `slots` receive slots of
// `chunk_bytes` for s; a message (a header, then its rows) is cut into chunks that go round the
// slots. s writes chunk n only once d has handed back the credit of chunk n - slots, so at most
// `slots` chunks are in flight per pair, whatever the fabric. Two kinds of counters make it:
//   landed(s, k): chunks from s that used slot k and have fully arrived (one counter per slot, so
//                 at most one put is in flight per counter: safe on fabrics that reorder);
//   credit(d):    chunks d has consumed, in s's window.
// A chunk for a peer on this node is stored straight into the peer's window (what NVLink / xGMI
// stores do on a GPU), then its counter raised; a chunk for a peer on another node is written into
// this rank's own staging slot and handed to the proxy as one PUT_SIGNAL descriptor, and credits
// travel back as SIGNAL descriptors.
//
// The rows are gathered from the caller's tensors straight into the slot (fields, index lists,
// dtype casts), and scattered or reduced (float32 accumulation, optional per-row weights) straight
// out of the slot into the caller's output tensors: no packing buffers in between. The header of a
// message carries its row count and a few int32 counts of the caller's choosing, so counts travel
// with the data instead of in a round trip of their own; it also carries a per-pair sequence
// number, the operation's name and the row width, so ranks that call different operations, or the
// same one with different shapes, get an error naming the peer.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "pe_proxy.h"
#include "pe_window.h"

#define PE_MAX_SLOTS 13  // receive slots per pair (with the credit, arena and pull counters, 16 per peer)
#define PE_SIGNALS_PER_PEER 16
#define PE_MAX_ARENA_BYTES (1ull << 36)  // per source node

// element types (in memory and on the wire)
enum pe_type { PE_U8 = 0, PE_I32 = 1, PE_I64 = 2, PE_BF16 = 3, PE_F16 = 4, PE_F32 = 5 };

// what a field does
enum pe_kind {
  PE_GATHER = 0,     // send: elements of row index[i] (cast from mem_type to wire_type: F32 -> BF16/F16)
  PE_ROW_INDEX = 1,  // send: the source row index itself, as wire_type I32 or I64
  PE_SCATTER = 2,    // receive: wire elements into row index[i] (same type)
  PE_REDUCE = 3,     // receive: float32 row index[i] += weight[i] * wire elements (BF16/F16/F32)
  PE_SKIP = 4,       // receive: ignore these wire bytes
};

// pe_field_t flags
enum pe_field_flag {
  // PE_SCATTER into an output the caller reads later, not the engine now (recv_x, an LL expert
  // block): rows of 2 KiB and more are written with non-temporal stores, which do not read the
  // destination into the cache first (about a third less memory traffic per copied byte).
  // PE_REDUCE into accumulators whose next copy comes in a later message (an HT combine's node
  // hop, before the network's partial sums): a row's first sum is written that way.
  PE_FIELD_STREAM = 1,
};

// Row r of a field starts at base + r * row_stride, or, with block_rows > 0 (a 3-D tensor seen as
// rows), at base + (r / block_rows) * block_stride + (r % block_rows) * row_stride.
typedef struct pe_field {
  uint64_t base;         // address of row 0
  int64_t row_stride;    // bytes between rows
  int64_t elem_stride;   // bytes between the elements of a row
  int64_t block_rows;    // rows per block, or 0
  int64_t block_stride;  // bytes between blocks
  int32_t count;         // elements per row
  uint8_t mem_type;      // enum pe_type
  uint8_t wire_type;     // enum pe_type
  uint8_t kind;          // enum pe_kind
  uint8_t flags;         // enum pe_field_flag
} pe_field_t;

// Rows of a message taken from one set of tensors: row i is source row index[i] (or first + i).
// With `group_end`, row i is instead a weighted sum of source rows: sum over j in
// [group_end[i - 1], group_end[i]) (from 0 for row 0) of weights[j] * source row index[j], summed
// in float32 and cast to the wire type (PE_GATHER fields of float types only; an LL combine's
// partial sums per token on the expert side).
typedef struct pe_segment {
  uint64_t fields;     // const pe_field_t *
  uint64_t index;      // const int64_t *, or 0
  int64_t first;
  int64_t nrows;
  int32_t nfields;
  int32_t pad;
  uint64_t group_end;  // const int64_t * [nrows], or 0
  uint64_t weights;    // const float * per index entry (with group_end)
} pe_segment_t;

// The message to one peer: its segments back to back, and its header counts.
typedef struct pe_send {
  uint64_t segments;  // const pe_segment_t *
  uint64_t counts;    // const int32_t * (ncounts of the exchange), or 0 for zeros
  int32_t nsegments;
  int32_t pad;
} pe_send_t;

// Rows that each go to several destination rows, named in the row itself (an LL dispatch sends a
// token once per rank, with the rank's experts it selected): the row's `list_count` int32 at byte
// `list_offset` are keys in [0, nkeys) or -1; for each key k the row is applied to destination
// row cursor[k]++, which must stay below end[k]. With `record`, each destination row is also
// written to record[recorded++], in the order applied (row order, then list order): where the
// rows went, in the order the sender listed them.
typedef struct pe_fanout {
  int32_t list_offset;
  int32_t list_count;
  int32_t nkeys;
  int32_t pad;
  uint64_t cursor;   // int64_t * [nkeys]
  uint64_t end;      // const int64_t * [nkeys]
  uint64_t record;   // int64_t *, or 0
  int64_t recorded;  // entries written to `record` so far
} pe_fanout_t;

// Where the sums of a reduce end (a combine, whose contributions per destination row are known):
// remaining[row] counts the contributions still to come to destination row `row`; the one that
// brings it to 0 writes (accumulator + its value), cast to each field's mem_type, into row `row`
// of `fields` (one per field of the receive: PE_SCATTER over BF16/F16/F32 rows for the PE_REDUCE
// fields, PE_SKIP for the others) instead of into the float32 accumulator, and sets
// touched[row] = 2: that row is final, and its accumulator row stale. One pass less per row (no
// separate cast at the end), and a half-width last write.
typedef struct pe_final {
  uint64_t remaining;  // int32_t * per destination row
  uint64_t fields;     // const pe_field_t *
  int32_t nfields;
  int32_t pad;
} pe_final_t;

// What to do with the rows from one peer: row i goes to destination row index[i] (or first + i),
// or, with `fanout`, to the rows its list names. Consecutive rows that reduce into the same
// destination row are summed block by block before the accumulator is touched (read and written
// once per run instead of once per row; the same sums, in the same order).
// `touched` (one byte per destination row, shared by every peer that reduces into the same rows)
// spares the caller from zeroing the accumulators: the first row to reach a destination row is
// stored (times its weight), later ones are added, and the byte is set.
typedef struct pe_recv {
  uint64_t fields;      // const pe_field_t *
  uint64_t index;       // const int64_t *, or 0
  uint64_t weights;     // const float * per received row for PE_REDUCE fields, or 0 (weight 1)
  uint64_t touched;     // uint8_t * per destination row, or 0 (the accumulators hold their start values)
  int64_t first;
  int64_t expect_rows;  // the sender must send exactly this many, or -1 (learned from the header)
  uint64_t fanout;      // const pe_fanout_t *, or 0
  int32_t nfields;
  int32_t pad;
  uint64_t final;       // const pe_final_t *, or 0 (reduce-only fields, an index and `touched` required)
} pe_recv_t;

// exchange flags
#define PE_DROP_DEAD 1  // a peer dropped as dead completes with 0 rows instead of failing the exchange
// A message's rows land contiguously in the receiver's arena for its sender (when they fit; the
// header still goes to a slot) and stay there, not in the recycled slots, until the receiver
// hands the arena back (pe_engine_release_arena); the sender's next arena message waits for that.
#define PE_ARENA 2
// Final sums made once every peer's rows have landed, each in one sweep over its copies straight
// into the final fields, instead of into the accumulators copy by copy as they arrive. Taken only
// where it cannot stall a stream (checked at the start, else ignored): every receive has the same
// final spec and fields, an expected row count, and each peer's whole message fits its slots.
#define PE_SUM_AT_END 4

// error kinds (pe_engine_error)
enum pe_error_kind {
  PE_OK = 0,
  PE_ERR_USAGE = 1,     // bad arguments (a bug of the caller)
  PE_ERR_PROTOCOL = 2,  // a peer disagrees: other operation, order, shape or row count
  PE_ERR_PEER = 3,      // a peer is unreachable (its link failed): `culprit` names it
  PE_ERR_PROXY = 4,     // this rank's proxy stopped serving
};

typedef struct pe_engine pe_engine_t;
typedef struct pe_exchange pe_exchange_t;

typedef struct pe_engine_stats {
  uint64_t chunks_written;
  uint64_t chunks_read;
  uint64_t messages_sent;
  uint64_t messages_split;  // messages that spanned more than one chunk
  uint64_t bytes_direct;    // payload bytes stored straight into same-node peers' windows
  uint64_t bytes_staged;    // payload bytes staged for the proxy
  uint64_t bytes_local;     // payload bytes a rank moved to itself
  uint64_t descriptors;     // descriptors pushed to the proxy
  uint64_t credit_stalls;   // times a stream waited for a credit
  uint64_t sleeps;          // times the rank slept on its doorbell
  uint64_t arena_messages;  // messages received whose rows landed in this rank's arena
  uint64_t bytes_pulled;    // payload bytes this rank copied out of its node's arenas itself
  uint64_t sums_at_end;     // exchanges whose final sums were made once all their rows were in
} pe_engine_stats_t;

// A rank's engine for one Buffer. The window (created by the caller) must have
// pe_engine_num_signals(world) signals and pe_engine_data_bytes(world, slots, chunk, arena, group)
// data bytes. Arenas (`arena_bytes`, 0 for none): one per node of `arena_group` ranks, for that
// node's rank with this rank's local index (the only one whose messages may land there).
uint32_t pe_engine_num_signals(int world);
uint64_t pe_engine_data_bytes(int world, int slots, uint64_t chunk_bytes, uint64_t arena_bytes, int arena_group);
pe_engine_t *pe_engine_create(int rank, int world, int slots, uint64_t chunk_bytes, uint64_t arena_bytes,
                              int arena_group, pe_window_t *window, char *err);
// Peer `peer` is on this node: its window (mapped here) takes direct stores.
int pe_engine_set_direct(pe_engine_t *e, int peer, pe_window_t *peer_window, char *err);
// Peer `peer` is reached through `proxy` (endpoint `endpoint`, fed by `ring`).
int pe_engine_set_proxied(pe_engine_t *e, int peer, pe_proxy_t *proxy, int endpoint, pe_ring_t *ring, char *err);

// Start an exchange among `peers` (group ranks, this rank among them): queue one message to each
// (`sends[i]` for peers[i]; rows of `row_bytes` wire bytes, `ncounts` header counts), and expect one
// from each. `recvs` (one per peer) may be NULL, then set later with pe_exchange_set_recv (e.g.
// once the header counts told the caller how big the outputs must be). The tensors the specs
// point to must stay alive and unchanged until the exchange completes.
pe_exchange_t *pe_exchange_start(pe_engine_t *e, const char *op, int npeers, const int32_t *peers,
                                 const pe_send_t *sends, int64_t row_bytes, int32_t ncounts, const pe_recv_t *recvs,
                                 int flags, char *err);
// Progress until every peer's header has arrived or `wait_s` passed. Returns 0 (then `rows[i]` and
// `counts[i * ncounts ...]` hold what peers[i] sends; 0 for a dropped peer), 1 (not yet) or -1.
int pe_exchange_headers(pe_exchange_t *x, double wait_s, int64_t *rows, int32_t *counts, char *err);
// The same wait, without copying the headers out.
int pe_exchange_wait_headers(pe_exchange_t *x, double wait_s, char *err);
int pe_exchange_set_recv(pe_exchange_t *x, const pe_recv_t *recvs, char *err);
// One pass of progress without waiting: write what credits allow (a send phase leaves with its rows
// in flight) and consume what landed. 0, or -1 on error.
int pe_exchange_push(pe_exchange_t *x, char *err);
// Progress until the exchange completed or `wait_s` passed. Returns 0 (done), 1 (not yet) or -1.
int pe_exchange_wait(pe_exchange_t *x, double wait_s, char *err);
// Peers the exchange still waits for (bit 1: to send to, bit 2: to receive from) into `state`
// (npeers entries), and a one-line account of what is missing into `text`.
void pe_exchange_describe(pe_exchange_t *x, int32_t *state, char *text, size_t cap);
// Peers dropped from it after they died (PE_DROP_DEAD), as 0/1 per peer.
void pe_exchange_dropped(pe_exchange_t *x, int32_t *dropped);
void pe_exchange_free(pe_exchange_t *x);
// Where the rows of peers[i]'s message landed, if in this rank's arena (header known), else NULL.
const uint8_t *pe_exchange_arena_rows(const pe_exchange_t *x, int i);
// Ranks with readers[r] != 0 are to read rows out of this rank's arenas once more (and then
// call pe_engine_pull_done).
void pe_engine_expect_pulls(pe_engine_t *e, const uint8_t *readers);
// Hand back the arena of `source` (its next arena message may land there): now, or with
// `after_pulls` once every read expected so far is done (checked as the engine makes progress).
// 0, or -1 (out of memory).
int pe_engine_release_arena(pe_engine_t *e, int source, int after_pulls);
uint64_t pe_engine_arena_bytes(const pe_engine_t *e);
// The arena `holder` (this rank or a peer whose window is mapped here) keeps for `source`, or NULL.
const uint8_t *pe_engine_peer_arena(const pe_engine_t *e, int holder, int source);
// Whether `peer`'s window is mapped here (it is this rank or a direct peer).
int pe_engine_maps(const pe_engine_t *e, int peer);
// This rank has finished reading rows out of `holder`'s arenas (this rank or a mapped peer):
// `bytes` of them.
void pe_engine_pull_done(pe_engine_t *e, int holder, uint64_t bytes);

// Give up on a dead peer: exchanges started with PE_DROP_DEAD complete without it, others keep
// waiting (the caller's liveness check fails them); later exchanges leave it out.
void pe_engine_drop(pe_engine_t *e, int peer);
// Progress until every peer but the dropped ones and `skip` (0/1 per rank, may be NULL) has
// consumed every chunk sent to it, or timeout_s passed. Returns the number of peers still owing.
int pe_engine_drain(pe_engine_t *e, const int32_t *skip, double timeout_s);
int pe_engine_rank(const pe_engine_t *e);
int pe_engine_world(const pe_engine_t *e);
// Record an error of `kind` found outside the engine's own calls (no rank at fault); returns -1.
int pe_engine_fail(pe_engine_t *e, int kind);
// The kind and culprit rank of the last error (-1: none in particular).
int pe_engine_error(pe_engine_t *e, int32_t *culprit);
void pe_engine_stats(pe_engine_t *e, pe_engine_stats_t *out);
void pe_engine_destroy(pe_engine_t *e);

// float32 rows to another float type (the end of a combine): dst[i] = src[i], n elements.
void pe_cast_f32(void *dst, int dst_type, const float *src, int64_t n);
