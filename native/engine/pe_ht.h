// Index maps of a high-throughput dispatch on the CPU: which rows go where, each in one pass
// instead of a handful of small tensor operations per call.
#pragma once

#include <stdint.h>

#include "pe_engine.h"

// For a row-major [rows, cols] mask (one byte per entry): the row indices of the set entries,
// ordered by (column, row), into `index` (at most rows * cols), and the count per column into
// `counts` ([cols]). Returns the number of entries.
int64_t pe_rows_by_column(const uint8_t *mask, int64_t rows, int64_t cols, int64_t *index, int64_t *counts);

// Where the rows of an HT node hop land: `counts` ([per_node, nodes]) rows arrive from each local
// rank j, grouped by the source node n they came from; the output holds them grouped by source
// rank n * per_node + j (ascending), source order kept. Writes the output row of each arriving row,
// ordered by (j, n), into `positions`.
void pe_ht_positions(const int64_t *counts, int per_node, int nodes, int64_t *positions);

// The routing a dispatch returns, from the global expert ids its rows carry ([rows, topk], -1 for
// none): `local_idx` the expert's index on this rank, or -1 for experts elsewhere; `local_weights`
// the weight there, or 0; `per_expert` ([local]) the selections per local expert.
void pe_ht_local_routing(const int64_t *topk_idx, const float *weights, int64_t rows, int topk, int64_t first_expert,
                         int local, int64_t *local_idx, float *local_weights, int64_t *per_expert);

// ---------------------------------------------------------------------------- on the engine
// A high-throughput dispatch and its combine as engine exchanges, with every index map built
// here: the network hop (each token once to each other node that needs it, to the rank with this
// rank's local index there, with that node's slice of the routing), then the node hop (to each rank
// of this node the rows it needs: this rank's own tokens straight from the caller's tensors, the
// network-hop rows from where they landed). The routing is kept for cached dispatches and combines.
// The caller waits on each exchange returned (between waits it checks its peers' liveness) and frees it.

typedef struct pe_ht pe_ht_t;

// Sizes of a routed dispatch (pe_ht_sizes).
enum {
  PE_HT_NET_SENT = 0,   // rows this rank sends over the network hop
  PE_HT_HOP_ROWS = 1,   // network-hop rows that landed here
  PE_HT_NODE_SENT = 2,  // node-hop rows this rank sends to the other ranks of its node
  PE_HT_NODE_RECEIVED = 3,  // node-hop rows received from the other ranks of the node (once counted)
  PE_HT_SIZES = 4,
};

// Route a dispatch: `in_rank` ([tokens, world] bytes, row-major: does token t go to rank r) on
// nodes of `per_node` ranks. Starts the network hop, whose rows are `fields` (PE_GATHER, source
// row = token), where field `mask_field` (per_node wire bytes) is replaced by the token's row of
// `in_rank` for the destination node. `*x` is the network hop's exchange (NULL on a single node,
// where there is none). NULL on error.
pe_ht_t *pe_ht_dispatch(pe_engine_t *e, const char *op, int per_node, const uint8_t *in_rank, int64_t tokens,
                        const pe_field_t *fields, int nfields, int mask_field, int flags, pe_exchange_t **x,
                        char *err);
// Once the network hop's headers arrived: where its rows land (kept by the route): rows that fit
// stay in this rank's arena (PE_ARENA), the others are copied into the route's buffer. 0, or -1.
int pe_ht_hop_receive(pe_ht_t *ht, pe_exchange_t *x, char *err);
// Once the node hop completed: hand the arenas back to their senders (those the node's ranks read
// rows out of, once every one of them is done). 0, or -1.
int pe_ht_release_arena(pe_ht_t *ht, char *err);
// A cached dispatch along the route: the network hop of `fields` (PE_GATHER, no routing column);
// its receive side is set by pe_ht_hop_receive. `*x` as for pe_ht_dispatch. 0, or -1.
int pe_ht_cached(pe_ht_t *ht, const char *op, const pe_field_t *fields, int nfields, int flags, pe_exchange_t **x,
                 char *err);
// Once the network hop completed: start the node hop of `fields` (PE_GATHER over the caller's
// tensors, the same columns as the network hop without its routing). Rows of the network hop that
// stayed in this rank's arena are not forwarded when every rank of the node maps this rank's
// window: the header tells each rank to read its own out of the arena (pe_ht_node_receive).
pe_exchange_t *pe_ht_forward(pe_ht_t *ht, const char *op, const pe_field_t *fields, int nfields, int flags,
                             char *err);
// Once the node hop's headers arrived: the rows this rank receives (-1 on error: a peer whose
// counts do not add up to its rows).
int64_t pe_ht_node_rows(pe_ht_t *ht, pe_exchange_t *x, char *err);
// Then: where they go (`fields`: PE_SCATTER over the output rows, grouped by source rank); the
// rows the node's arenas hold for this rank are copied out of them here. 0, or -1.
int pe_ht_node_receive(pe_ht_t *ht, pe_exchange_t *x, const pe_field_t *fields, int nfields, char *err);
// The combine's node hop: rows of the dispatch's output (`send_fields`, PE_GATHER) go back to the
// rank that forwarded them, which reduces them (`acc_fields`, PE_REDUCE; `touched` as in pe_recv_t)
// into accumulator rows: the network-hop rows' partial sums first, then this rank's tokens. With
// `final_fields` (pe_final_t's, over the same rows), each row's last copy writes its sum there
// (touched = 2): the network-hop rows' partial sums are then final after this hop, and this rank's
// tokens after the next.
pe_exchange_t *pe_ht_combine_node(pe_ht_t *ht, const char *op, const pe_field_t *send_fields, int nsend,
                                  const pe_field_t *acc_fields, int nacc, uint8_t *touched,
                                  const pe_field_t *final_fields, int nfinal, int flags, char *err);
// The combine's network hop: each partial sum goes back to its source (`send_fields` over the
// accumulator, or over the final rows when the node hop had them), which reduces it into its
// token's row (`final_fields` as for the node hop, whose countdown it goes on with). NULL without
// error on a single node (check `err[0]`).
pe_exchange_t *pe_ht_combine_net(pe_ht_t *ht, const char *op, const pe_field_t *send_fields, int nsend,
                                 const pe_field_t *acc_fields, int nacc, uint8_t *touched,
                                 const pe_field_t *final_fields, int nfinal, int flags, char *err);
// PE_HT_SIZES sizes (see the enum).
void pe_ht_sizes(const pe_ht_t *ht, int64_t *sizes);
void pe_ht_free(pe_ht_t *ht);
