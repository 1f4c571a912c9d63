// Index maps of a high-throughput dispatch on the CPU (see pe_ht.h).
#include "pe_ht.h"

#include <stdlib.h>
#include <string.h>

#include "pe_common.h"
#include "pe_rows.h"

int64_t pe_rows_by_column(const uint8_t *mask, int64_t rows, int64_t cols, int64_t *index, int64_t *counts) {
  memset(counts, 0, (size_t)cols * sizeof *counts);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) counts[c] += mask[r * cols + c] != 0;
  int64_t total = 0;
  for (int64_t c = 0; c < cols; ++c) {
    int64_t at = total;
    for (int64_t r = 0; r < rows && at < total + counts[c]; ++r)
      if (mask[r * cols + c]) index[at++] = r;
    total += counts[c];
  }
  return total;
}

void pe_ht_positions(const int64_t *counts, int per_node, int nodes, int64_t *positions) {
  int64_t at = 0;
  for (int j = 0; j < per_node; ++j) {
    for (int n = 0; n < nodes; ++n) {
      int64_t first = 0;  // rows of the source ranks before (n, j)
      const int source = n * per_node + j;
      for (int s = 0; s < source; ++s) first += counts[(int64_t)(s % per_node) * nodes + s / per_node];
      for (int64_t i = 0; i < counts[(int64_t)j * nodes + n]; ++i) positions[at++] = first + i;
    }
  }
}

void pe_ht_local_routing(const int64_t *topk_idx, const float *weights, int64_t rows, int topk, int64_t first_expert,
                         int local, int64_t *local_idx, float *local_weights, int64_t *per_expert) {
  memset(per_expert, 0, (size_t)local * sizeof *per_expert);
  for (int64_t i = 0; i < rows * topk; ++i) {
    const int64_t e = topk_idx[i] - first_expert;
    const int mine = topk_idx[i] >= 0 && e >= 0 && e < local;
    local_idx[i] = mine ? e : -1;
    if (local_weights != NULL) local_weights[i] = mine ? weights[i] : 0.0f;
    if (mine) per_expert[e]++;
  }
}

// ---------------------------------------------------------------------------- on the engine
struct pe_ht {
  pe_engine_t *e;
  int rank, world, per_node, nodes, node, local;
  int64_t tokens;          // this rank's tokens
  int32_t *net_peers;      // [nodes]: the rank with this rank's local index on each node
  int32_t *node_peers;     // [per_node]: the ranks of this node
  int64_t *net_index;      // tokens sent over the network, by (node, token)
  int64_t *net_first;      // [nodes + 1]
  int64_t *own_index;      // this rank's tokens each rank of its node needs, by (local rank, token)
  int64_t *own_first;      // [per_node + 1]
  int64_t *hop_first;      // [nodes + 1]: network-hop rows from each node, in landing order
  uint8_t *hop;            // those rows, as they were on the wire, unless they stay in the arena
  const uint8_t **hop_base;  // [nodes]: where node n's network-hop rows are (the arena or `hop`)
  uint8_t *arena_held;     // [nodes]: node n's rows are in this rank's arena, not handed back yet
  // Forwarder side: node n's rows are read by the node's ranks straight out of this rank's arena
  // in the dispatch under way (pull), and were in the first dispatch (a cached one pulls only those).
  uint8_t *pull;           // [nodes]
  uint8_t *pulled_first;   // [nodes]
  // Reader side, by (local rank j, node n): what the node hop's header from j says.
  uint8_t *cell_pulled;    // [per_node * nodes]: the rows are to be read out of j's arena
  int64_t *cell_arena_rows;  // [per_node * nodes]: rows in j's arena for node n
  int64_t *pull_rows;      // the arena rows this rank takes, by cell (found by the first dispatch)
  int64_t *pull_first;     // [per_node * nodes + 1]
  int64_t *msg_positions;  // output rows of the rows the messages carry (the cells not pulled), by j
  int64_t *msg_first;      // [per_node + 1]
  size_t hop_cap;
  int64_t hop_row_bytes;
  int64_t mask_offset;     // of the routing column in a hop row (first dispatch only), or -1
  int64_t *send_index;     // node hop: rows for local rank j from node n, by (j, n): tokens (own node) or hop rows
  int64_t *send_first;     // [per_node * nodes + 1]
  int64_t *recv_first;     // [per_node * nodes + 1]: rows from local rank j that came from node n, by (j, n)
  int64_t *positions;      // their output rows
  int64_t *node_targets;   // combine: the accumulator row of each node-hop row sent (made by the first combine)
  int64_t *net_targets;    // combine: the accumulator row of each token sent over the network
  int32_t *contributions;  // combine: copies each accumulator row sums (made by the first combine with finals)
  int32_t *remaining;      // their countdown in the combine under way
  pe_final_t final;        // that combine's final spec
};

void pe_ht_free(pe_ht_t *ht) {
  if (ht == NULL) return;
  void *owned[] = {ht->net_peers, ht->node_peers, ht->net_index, ht->net_first, ht->own_index, ht->own_first,
                   ht->hop_first, ht->hop, ht->hop_base, ht->arena_held, ht->pull, ht->pulled_first,
                   ht->cell_pulled, ht->cell_arena_rows, ht->pull_rows, ht->pull_first, ht->msg_positions,
                   ht->msg_first, ht->send_index, ht->send_first, ht->recv_first, ht->positions, ht->node_targets,
                   ht->net_targets, ht->contributions, ht->remaining};
  for (size_t i = 0; i < sizeof owned / sizeof owned[0]; ++i) free(owned[i]);
  free(ht);
}

static int ht_fail(pe_ht_t *ht, int kind, char *err, const char *what) {
  if (!err[0]) pe_err(err, "%s", what);
  return pe_engine_fail(ht->e, kind);
}

static int64_t *ht_index(int64_t n) { return malloc((size_t)(n > 0 ? n : 1) * sizeof(int64_t)); }

static int ht_cells(const pe_ht_t *ht) { return ht->per_node * ht->nodes; }

// Start an exchange among `peers` and let its rows leave as far as credits allow.
static pe_exchange_t *ht_start(pe_ht_t *ht, const char *op, int npeers, const int32_t *peers, const pe_send_t *sends,
                               int64_t row_bytes, int32_t ncounts, const pe_recv_t *recvs, int flags, char *err) {
  pe_exchange_t *x = pe_exchange_start(ht->e, op, npeers, peers, sends, row_bytes, ncounts, recvs, flags, err);
  if (x != NULL && pe_exchange_push(x, err) != 0) {
    pe_exchange_free(x);
    x = NULL;
  }
  return x;
}

// Room for the network hop's rows (hop_first and hop_row_bytes set).
static int ht_reserve_hop(pe_ht_t *ht) {
  const size_t need = (size_t)(ht->hop_first[ht->nodes] * ht->hop_row_bytes) + PE_CACHE_LINE;
  if (need <= ht->hop_cap) return 0;
  free(ht->hop);
  ht->hop = NULL;
  ht->hop_cap = 0;
  if (posix_memalign((void **)&ht->hop, PE_CACHE_LINE, need) != 0) return -1;
  ht->hop_cap = need;
  return 0;
}

// The network hop's receive side: each node's rows, raw, into its block of `hop`.
static void ht_hop_recvs(const pe_ht_t *ht, pe_field_t *field, pe_recv_t *recvs) {
  *field = (pe_field_t){.base = (uint64_t)(uintptr_t)ht->hop, .row_stride = ht->hop_row_bytes, .elem_stride = 1,
                        .count = (int32_t)ht->hop_row_bytes, .mem_type = PE_U8, .wire_type = PE_U8,
                        .kind = PE_SCATTER};
  for (int n = 0; n < ht->nodes; ++n)
    recvs[n] = (pe_recv_t){.fields = (uint64_t)(uintptr_t)field, .first = ht->hop_first[n],
                           .expect_rows = ht->hop_first[n + 1] - ht->hop_first[n], .nfields = 1};
}

// Start the network hop: tokens net_index of node n, by `fields`, with field `mask_field` (>= 0 on
// a first dispatch) taken from `in_rank`'s slice of node n. No exchange on a single node.
static int ht_start_net(pe_ht_t *ht, const char *op, const uint8_t *in_rank, const pe_field_t *fields, int nfields,
                        int mask_field, const pe_recv_t *recvs, int flags, pe_exchange_t **x, char *err) {
  *x = NULL;
  if (ht->nodes == 1) return 0;
  const int nodes = ht->nodes;
  pe_send_t *sends = calloc((size_t)nodes, sizeof *sends);
  pe_segment_t *segs = calloc((size_t)nodes, sizeof *segs);
  pe_field_t *wire = malloc((size_t)nodes * (size_t)nfields * sizeof *wire);
  if (sends == NULL || segs == NULL || wire == NULL) {
    free(sends);
    free(segs);
    free(wire);
    return ht_fail(ht, PE_ERR_USAGE, err, "out of memory");
  }
  for (int n = 0; n < nodes; ++n) {
    pe_field_t *f = &wire[(int64_t)n * nfields];
    memcpy(f, fields, (size_t)nfields * sizeof *f);
    if (mask_field >= 0)
      f[mask_field] = (pe_field_t){.base = (uint64_t)(uintptr_t)in_rank + (uint64_t)n * (uint64_t)ht->per_node,
                                   .row_stride = ht->world, .elem_stride = 1, .count = ht->per_node,
                                   .mem_type = PE_U8, .wire_type = PE_U8, .kind = PE_GATHER};
    segs[n] = (pe_segment_t){.fields = (uint64_t)(uintptr_t)f,
                             .index = (uint64_t)(uintptr_t)(ht->net_index + ht->net_first[n]),
                             .nrows = ht->net_first[n + 1] - ht->net_first[n], .nfields = nfields};
    sends[n] = (pe_send_t){.segments = (uint64_t)(uintptr_t)&segs[n], .nsegments = segs[n].nrows > 0};
  }
  *x = ht_start(ht, op, nodes, ht->net_peers, sends, pe_fields_wire_bytes(fields, nfields), 0, recvs,
                flags | PE_ARENA, err);
  free(sends);
  free(segs);
  free(wire);
  return *x == NULL ? -1 : 0;
}

pe_ht_t *pe_ht_dispatch(pe_engine_t *e, const char *op, int per_node, const uint8_t *in_rank, int64_t tokens,
                        const pe_field_t *fields, int nfields, int mask_field, int flags, pe_exchange_t **x,
                        char *err) {
  *x = NULL;
  const int world = pe_engine_world(e), rank = pe_engine_rank(e);
  if (per_node <= 0 || world % per_node || tokens < 0 || mask_field < 0 || mask_field >= nfields ||
      fields[mask_field].count != per_node) {
    pe_err(err, "%s: bad HT dispatch (%d ranks, %d per node, %lld tokens, routing field %d of %d)", op, world,
           per_node, (long long)tokens, mask_field, nfields);
    pe_engine_fail(e, PE_ERR_USAGE);
    return NULL;
  }
  pe_ht_t *ht = calloc(1, sizeof *ht);
  if (ht == NULL) {
    pe_err(err, "%s: out of memory", op);
    pe_engine_fail(e, PE_ERR_USAGE);
    return NULL;
  }
  *ht = (pe_ht_t){.e = e, .rank = rank, .world = world, .per_node = per_node, .nodes = world / per_node,
                  .node = rank / per_node, .local = rank % per_node, .tokens = tokens};
  const int nodes = ht->nodes, me = ht->node;
  ht->net_peers = malloc((size_t)nodes * sizeof *ht->net_peers);
  ht->node_peers = malloc((size_t)per_node * sizeof *ht->node_peers);
  ht->net_first = calloc((size_t)nodes + 1, sizeof *ht->net_first);
  ht->hop_first = calloc((size_t)nodes + 1, sizeof *ht->hop_first);
  ht->own_first = calloc((size_t)per_node + 1, sizeof *ht->own_first);
  ht->hop_base = calloc((size_t)nodes, sizeof *ht->hop_base);
  ht->arena_held = calloc((size_t)nodes, sizeof *ht->arena_held);
  ht->pull = calloc((size_t)nodes, sizeof *ht->pull);
  ht->pulled_first = calloc((size_t)nodes, sizeof *ht->pulled_first);
  int64_t *cursor = malloc((size_t)(nodes > per_node ? nodes : per_node) * sizeof *cursor);
  if (!ht->net_peers || !ht->node_peers || !ht->net_first || !ht->hop_first || !ht->own_first || !ht->hop_base ||
      !ht->arena_held || !ht->pull || !ht->pulled_first || !cursor)
    goto oom;
  for (int n = 0; n < nodes; ++n) ht->net_peers[n] = n * per_node + ht->local;
  for (int j = 0; j < per_node; ++j) ht->node_peers[j] = me * per_node + j;
  // Counts, then the lists: tokens by (node, token) for the network, by (local rank, token) for this node.
  for (int64_t t = 0; t < tokens; ++t) {
    const uint8_t *row = &in_rank[t * world];
    for (int n = 0; n < nodes; ++n) {
      if (n == me) {
        for (int j = 0; j < per_node; ++j) ht->own_first[j + 1] += row[me * per_node + j] != 0;
        continue;
      }
      for (int j = 0; j < per_node; ++j)
        if (row[n * per_node + j]) {
          ht->net_first[n + 1]++;
          break;
        }
    }
  }
  for (int n = 0; n < nodes; ++n) ht->net_first[n + 1] += ht->net_first[n];
  for (int j = 0; j < per_node; ++j) ht->own_first[j + 1] += ht->own_first[j];
  ht->net_index = ht_index(ht->net_first[nodes]);
  ht->own_index = ht_index(ht->own_first[per_node]);
  if (!ht->net_index || !ht->own_index) goto oom;
  for (int n = 0; n < nodes; ++n) cursor[n] = ht->net_first[n];
  for (int64_t t = 0; t < tokens; ++t) {
    const uint8_t *row = &in_rank[t * world];
    for (int n = 0; n < nodes; ++n) {
      if (n == me) continue;
      for (int j = 0; j < per_node; ++j)
        if (row[n * per_node + j]) {
          ht->net_index[cursor[n]++] = t;
          break;
        }
    }
  }
  for (int j = 0; j < per_node; ++j) cursor[j] = ht->own_first[j];
  for (int64_t t = 0; t < tokens; ++t) {
    const uint8_t *row = &in_rank[t * world + me * per_node];
    for (int j = 0; j < per_node; ++j)
      if (row[j]) ht->own_index[cursor[j]++] = t;
  }
  free(cursor);
  cursor = NULL;
  ht->hop_row_bytes = pe_fields_wire_bytes(fields, nfields);
  ht->mask_offset = pe_fields_wire_bytes(fields, mask_field);
  if (ht_start_net(ht, op, in_rank, fields, nfields, mask_field, NULL, flags, x, err) != 0) {
    pe_ht_free(ht);
    return NULL;
  }
  return ht;
oom:
  free(cursor);
  pe_err(err, "%s: out of memory", op);
  pe_engine_fail(e, PE_ERR_USAGE);
  pe_ht_free(ht);
  return NULL;
}

int pe_ht_hop_receive(pe_ht_t *ht, pe_exchange_t *x, char *err) {
  const int nodes = ht->nodes;
  int64_t *rows = malloc((size_t)nodes * sizeof *rows);
  pe_recv_t *recvs = calloc((size_t)nodes, sizeof *recvs);
  int32_t no_counts = 0;
  int rc = -1;
  if (rows == NULL || recvs == NULL) {
    ht_fail(ht, PE_ERR_USAGE, err, "out of memory");
    goto done;
  }
  if (pe_exchange_headers(x, 0.0, rows, &no_counts, err) != 0) {
    ht_fail(ht, PE_ERR_USAGE, err, "the headers of the network hop have not all arrived");
    goto done;
  }
  for (int n = 0; n < nodes; ++n) {
    if (ht->mask_offset >= 0) {  // a first dispatch: the rows each node sends are learnt here
      ht->hop_first[n + 1] = ht->hop_first[n] + rows[n];
    } else if (rows[n] != ht->hop_first[n + 1] - ht->hop_first[n]) {  // a cached one: as the first
      pe_err(err, "rank %d sent %lld rows along a cached route of %lld", ht->net_peers[n], (long long)rows[n],
             (long long)(ht->hop_first[n + 1] - ht->hop_first[n]));
      rc = pe_engine_fail(ht->e, PE_ERR_PROTOCOL);
      goto done;
    }
  }
  if (ht_reserve_hop(ht) != 0) {
    ht_fail(ht, PE_ERR_USAGE, err, "out of memory");
    goto done;
  }
  // Rows that landed in the arena stay there (their bytes are skipped on arrival); the others are
  // copied out of the slots into `hop`.
  pe_field_t field, skip = {.elem_stride = 1, .count = (int32_t)ht->hop_row_bytes, .mem_type = PE_U8,
                            .wire_type = PE_U8, .kind = PE_SKIP};
  ht_hop_recvs(ht, &field, recvs);
  for (int n = 0; n < nodes; ++n) {
    const uint8_t *arena = pe_exchange_arena_rows(x, n);
    ht->arena_held[n] = arena != NULL;
    ht->hop_base[n] = arena != NULL ? arena : ht->hop + ht->hop_first[n] * ht->hop_row_bytes;
    if (arena != NULL) recvs[n].fields = (uint64_t)(uintptr_t)&skip;
  }
  rc = pe_exchange_set_recv(x, recvs, err);
  if (rc == 0) rc = pe_exchange_push(x, err);
done:
  free(rows);
  free(recvs);
  return rc;
}

int pe_ht_release_arena(pe_ht_t *ht, char *err) {
  for (int n = 0; n < ht->nodes; ++n)
    if (ht->arena_held[n]) {  // rows the node's ranks pull: once they all have
      if (pe_engine_release_arena(ht->e, ht->net_peers[n], ht->pull[n]) != 0)
        return ht_fail(ht, PE_ERR_USAGE, err, "out of memory");
      ht->arena_held[n] = 0;
    }
  return 0;
}

int pe_ht_cached(pe_ht_t *ht, const char *op, const pe_field_t *fields, int nfields, int flags, pe_exchange_t **x,
                 char *err) {
  *x = NULL;
  if (ht->positions == NULL) {
    pe_err(err, "%s: the handle's dispatch did not complete", op);
    return pe_engine_fail(ht->e, PE_ERR_USAGE);
  }
  ht->hop_row_bytes = pe_fields_wire_bytes(fields, nfields);
  ht->mask_offset = -1;
  // where the rows land is known once the headers arrived (pe_ht_hop_receive)
  return ht_start_net(ht, op, NULL, fields, nfields, -1, NULL, flags, x, err);
}

// The node hop's lists (first dispatch): to local rank j, per node n in order, the rows of node n
// it needs: this rank's tokens for its own node, the landed rows whose routing names j otherwise.
static int ht_build_sends(pe_ht_t *ht) {
  const int per_node = ht->per_node, nodes = ht->nodes, me = ht->node, cells = ht_cells(ht);
  ht->send_first = calloc((size_t)cells + 1, sizeof *ht->send_first);
  int64_t *cursor = malloc((size_t)cells * sizeof *cursor);
  if (ht->send_first == NULL || cursor == NULL) {
    free(cursor);
    return -1;
  }
  int64_t *count = ht->send_first + 1;
  for (int j = 0; j < per_node; ++j) count[j * nodes + me] = ht->own_first[j + 1] - ht->own_first[j];
  for (int n = 0; n < nodes; ++n)
    for (int64_t r = ht->hop_first[n]; r < ht->hop_first[n + 1]; ++r) {
      const uint8_t *mask = ht->hop_base[n] + (r - ht->hop_first[n]) * ht->hop_row_bytes + ht->mask_offset;
      for (int j = 0; j < per_node; ++j) count[j * nodes + n] += mask[j] != 0;
    }
  for (int c = 0; c < cells; ++c) ht->send_first[c + 1] += ht->send_first[c];
  ht->send_index = ht_index(ht->send_first[cells]);
  if (ht->send_index == NULL) {
    free(cursor);
    return -1;
  }
  for (int c = 0; c < cells; ++c) cursor[c] = ht->send_first[c];
  for (int j = 0; j < per_node; ++j)
    memcpy(&ht->send_index[cursor[j * nodes + me]], &ht->own_index[ht->own_first[j]],
           (size_t)(ht->own_first[j + 1] - ht->own_first[j]) * sizeof *ht->send_index);
  for (int n = 0; n < nodes; ++n)
    for (int64_t r = ht->hop_first[n]; r < ht->hop_first[n + 1]; ++r) {
      const uint8_t *mask = ht->hop_base[n] + (r - ht->hop_first[n]) * ht->hop_row_bytes + ht->mask_offset;
      for (int j = 0; j < per_node; ++j)
        if (mask[j]) ht->send_index[cursor[j * nodes + n]++] = r;
    }
  free(cursor);
  return 0;
}

// Node hop header counts, per receiving local rank: for each node n, the rows it gets from n; then
// whether it reads them out of the sender's arena itself (1) or they travel in the message (0);
// then the rows in the sender's arena for n (the bound of that read).
#define NODE_COUNTS(nodes) (3 * (nodes))

// Whether every rank of this node maps this rank's window (then they can read its arenas).
static int ht_node_maps(const pe_ht_t *ht) {
  for (int j = 0; j < ht->per_node; ++j)
    if (!pe_engine_maps(ht->e, ht->node_peers[j])) return 0;
  return 1;
}

pe_exchange_t *pe_ht_forward(pe_ht_t *ht, const char *op, const pe_field_t *fields, int nfields, int flags,
                             char *err) {
  const int per_node = ht->per_node, nodes = ht->nodes, me = ht->node, ncounts = NODE_COUNTS(nodes);
  const int64_t row_bytes = pe_fields_wire_bytes(fields, nfields);
  if ((nodes > 1 && row_bytes > ht->hop_row_bytes) || (ht->send_index == NULL && ht->mask_offset < 0)) {
    pe_err(err, "%s: the node hop does not follow its network hop", op);
    pe_engine_fail(ht->e, PE_ERR_USAGE);
    return NULL;
  }
  const int first = ht->send_index == NULL;
  if (first && ht_build_sends(ht) != 0) {
    ht_fail(ht, PE_ERR_USAGE, err, "out of memory");
    return NULL;
  }
  // Rows that stay in this rank's arena are read by the node's ranks themselves (a cached dispatch:
  // only where the first one did, since that is where they know their rows from).
  const int maps = ht_node_maps(ht);
  int pulls = 0;
  for (int n = 0; n < nodes; ++n) {
    ht->pull[n] = n != me && ht->arena_held[n] && maps && (first || ht->pulled_first[n]);
    if (first) ht->pulled_first[n] = ht->pull[n];
    pulls |= ht->pull[n];
  }
  pe_send_t *sends = calloc((size_t)per_node, sizeof *sends);
  pe_segment_t *segs = calloc((size_t)ht_cells(ht), sizeof *segs);
  int32_t *counts = calloc((size_t)per_node * (size_t)ncounts, sizeof *counts);
  pe_field_t *hop_fields = calloc((size_t)nodes, sizeof *hop_fields);
  uint8_t *readers = calloc((size_t)ht->world, 1);
  pe_exchange_t *x = NULL;
  if (sends == NULL || segs == NULL || counts == NULL || hop_fields == NULL || readers == NULL) {
    ht_fail(ht, PE_ERR_USAGE, err, "out of memory");
    goto done;
  }
  // Forwarded rows are gathered from the landed wire rows (in the arena or `hop`; row r of node n
  // is row r - hop_first[n] there): the node hop's row is a prefix of them.
  for (int n = 0; n < nodes; ++n)
    hop_fields[n] = (pe_field_t){.base = (uint64_t)(uintptr_t)ht->hop_base[n] -
                                         (uint64_t)(ht->hop_first[n] * ht->hop_row_bytes),
                                 .row_stride = ht->hop_row_bytes, .elem_stride = 1, .count = (int32_t)row_bytes,
                                 .mem_type = PE_U8, .wire_type = PE_U8, .kind = PE_GATHER};
  for (int j = 0; j < per_node; ++j) {
    pe_segment_t *seg = &segs[j * nodes];
    int32_t *head = &counts[j * ncounts];
    int nseg = 0;
    for (int n = 0; n < nodes; ++n) {
      const int c = j * nodes + n;
      const int64_t rows = ht->send_first[c + 1] - ht->send_first[c];
      head[n] = (int32_t)rows;
      head[nodes + n] = ht->pull[n];
      head[2 * nodes + n] = ht->pull[n] ? (int32_t)(ht->hop_first[n + 1] - ht->hop_first[n]) : 0;
      if (rows == 0 || ht->pull[n]) continue;
      seg[nseg++] = (pe_segment_t){.fields = (uint64_t)(uintptr_t)(n == me ? fields : &hop_fields[n]),
                                   .index = (uint64_t)(uintptr_t)(ht->send_index + ht->send_first[c]),
                                   .nrows = rows, .nfields = n == me ? nfields : 1};
    }
    sends[j] = (pe_send_t){.segments = (uint64_t)(uintptr_t)seg, .counts = (uint64_t)(uintptr_t)head,
                           .nsegments = nseg};
    readers[ht->node_peers[j]] = (uint8_t)pulls;
  }
  x = ht_start(ht, op, per_node, ht->node_peers, sends, row_bytes, ncounts, NULL, flags, err);
  if (x != NULL) pe_engine_expect_pulls(ht->e, readers);
done:
  free(readers);
  free(hop_fields);
  free(sends);
  free(segs);
  free(counts);
  return x;
}

int64_t pe_ht_node_rows(pe_ht_t *ht, pe_exchange_t *x, char *err) {
  const int per_node = ht->per_node, nodes = ht->nodes, cells = ht_cells(ht), ncounts = NODE_COUNTS(nodes);
  int64_t *rows = malloc((size_t)per_node * sizeof *rows);
  int32_t *head = malloc((size_t)per_node * (size_t)ncounts * sizeof *head);
  int64_t *counts = malloc((size_t)cells * sizeof *counts);
  int64_t *before = ht->recv_first;  // a cached dispatch's route: its counts must not change
  int64_t total = -1;
  free(ht->positions);
  free(ht->msg_positions);
  ht->positions = ht->msg_positions = NULL;
  ht->recv_first = calloc((size_t)cells + 1, sizeof *ht->recv_first);
  if (ht->msg_first == NULL) ht->msg_first = malloc(((size_t)per_node + 1) * sizeof *ht->msg_first);
  if (ht->cell_pulled == NULL) ht->cell_pulled = malloc((size_t)cells);
  if (ht->cell_arena_rows == NULL) ht->cell_arena_rows = malloc((size_t)cells * sizeof *ht->cell_arena_rows);
  if (!rows || !head || !counts || !ht->recv_first || !ht->msg_first || !ht->cell_pulled || !ht->cell_arena_rows) {
    ht_fail(ht, PE_ERR_USAGE, err, "out of memory");
    goto done;
  }
  if (pe_exchange_headers(x, 0.0, rows, head, err) != 0) {
    ht_fail(ht, PE_ERR_USAGE, err, "the headers of the node hop have not all arrived");
    goto done;
  }
  ht->msg_first[0] = 0;
  for (int j = 0; j < per_node; ++j) {
    const int32_t *h = &head[j * ncounts];
    const int sender = ht->node_peers[j];
    int64_t carried = 0;
    int bad = 0;
    for (int n = 0; n < nodes; ++n) {
      const int c = j * nodes + n;
      const int pulled = h[nodes + n] != 0;
      // the rows to read out of the sender's arena must fit it, whatever its header says
      bad |= h[n] < 0 || h[2 * nodes + n] < h[n] * pulled || (pulled && n == ht->node) ||
             (uint64_t)h[2 * nodes + n] * (uint64_t)ht->hop_row_bytes > pe_engine_arena_bytes(ht->e);
      counts[c] = h[n];
      ht->cell_pulled[c] = (uint8_t)pulled;
      ht->cell_arena_rows[c] = h[2 * nodes + n];
      if (pulled && pe_engine_peer_arena(ht->e, sender, n * per_node + j) == NULL) {
        pe_err(err, "rank %d asks rank %d to read its arena, which it cannot", sender, ht->rank);
        pe_engine_fail(ht->e, PE_ERR_PROTOCOL);
        goto done;
      }
      if (!pulled) carried += h[n];
    }
    if (bad || carried != rows[j]) {
      pe_err(err, "rank %d sent %lld rows, its per-node counts say %lld", sender, (long long)rows[j],
             (long long)carried);
      pe_engine_fail(ht->e, PE_ERR_PROTOCOL);
      goto done;
    }
    ht->msg_first[j + 1] = ht->msg_first[j] + carried;
  }
  for (int c = 0; c < cells; ++c) ht->recv_first[c + 1] = ht->recv_first[c] + counts[c];
  for (int c = 0; before != NULL && c < cells; ++c)
    if (before[c + 1] - before[c] != counts[c]) {
      pe_err(err, "rank %d forwards %lld rows from node %d along a cached route of %lld",
             ht->node_peers[c / nodes], (long long)counts[c], c % nodes, (long long)(before[c + 1] - before[c]));
      pe_engine_fail(ht->e, PE_ERR_PROTOCOL);
      goto done;
    }
  ht->positions = ht_index(ht->recv_first[cells]);
  ht->msg_positions = ht_index(ht->msg_first[per_node]);
  if (ht->positions == NULL || ht->msg_positions == NULL) {
    ht_fail(ht, PE_ERR_USAGE, err, "out of memory");
    goto done;
  }
  pe_ht_positions(counts, per_node, nodes, ht->positions);
  int64_t at = 0;  // the carried cells' output rows, in message order
  for (int c = 0; c < cells; ++c)
    if (!ht->cell_pulled[c])
      for (int64_t i = ht->recv_first[c]; i < ht->recv_first[c + 1]; ++i) ht->msg_positions[at++] = ht->positions[i];
  total = ht->recv_first[cells];
done:
  free(before);
  free(rows);
  free(head);
  free(counts);
  return total;
}

// Read this rank's rows of cell c (node n's rows, held by local rank j) out of j's arena into
// their output rows: on a first dispatch found by the routing column (and kept for cached ones).
static int ht_pull_cell(pe_ht_t *ht, int c, const pe_field_t *fields, int nfields, char *err) {
  const int j = c / ht->nodes, n = c % ht->nodes, holder = ht->node_peers[j];
  const uint8_t *arena = pe_engine_peer_arena(ht->e, holder, n * ht->per_node + j);
  const int64_t want = ht->recv_first[c + 1] - ht->recv_first[c], stride = ht->hop_row_bytes;
  const int64_t *out = ht->positions + ht->recv_first[c];
  if (ht->mask_offset >= 0) {  // first dispatch: this rank's rows are those whose routing names it
    int64_t *mine = ht->pull_rows + ht->pull_first[c], found = 0;
    for (int64_t i = 0; i < ht->cell_arena_rows[c] && found <= want; ++i) {
      const uint8_t *row = arena + i * stride;
      if (!row[ht->mask_offset + ht->local]) continue;
      if (found < want) {
        mine[found] = i;
        pe_scatter_row(fields, nfields, out[found], 1.0f, 0, row);
      }
      found++;
    }
    if (found != want) {
      pe_err(err, "rank %d's arena holds %lld rows from node %d for rank %d, its header said %lld", holder,
             (long long)found, n, ht->rank, (long long)want);
      return pe_engine_fail(ht->e, PE_ERR_PROTOCOL);
    }
    return 0;
  }
  if (ht->pull_first == NULL || ht->pull_first[c + 1] - ht->pull_first[c] != want) {
    pe_err(err, "rank %d has this rank read rows from node %d that the route's first dispatch did not", holder, n);
    return pe_engine_fail(ht->e, PE_ERR_PROTOCOL);
  }
  const int64_t *mine = ht->pull_rows + ht->pull_first[c];
  for (int64_t k = 0; k < want; ++k) {
    if (mine[k] >= ht->cell_arena_rows[c]) {
      pe_err(err, "rank %d's arena holds %lld rows from node %d, fewer than the route reads", holder,
             (long long)ht->cell_arena_rows[c], n);
      return pe_engine_fail(ht->e, PE_ERR_PROTOCOL);
    }
    pe_scatter_row(fields, nfields, out[k], 1.0f, 0, arena + mine[k] * stride);
  }
  return 0;
}

int pe_ht_node_receive(pe_ht_t *ht, pe_exchange_t *x, const pe_field_t *fields, int nfields, char *err) {
  const int per_node = ht->per_node, nodes = ht->nodes, cells = ht_cells(ht);
  if (ht->positions == NULL) return ht_fail(ht, PE_ERR_USAGE, err, "the node hop's rows are not counted yet");
  pe_recv_t *recvs = calloc((size_t)per_node, sizeof *recvs);
  if (recvs == NULL) return ht_fail(ht, PE_ERR_USAGE, err, "out of memory");
  for (int j = 0; j < per_node; ++j)
    recvs[j] = (pe_recv_t){.fields = (uint64_t)(uintptr_t)fields,
                           .index = (uint64_t)(uintptr_t)(ht->msg_positions + ht->msg_first[j]),
                           .expect_rows = ht->msg_first[j + 1] - ht->msg_first[j], .nfields = nfields};
  int rc = pe_exchange_set_recv(x, recvs, err);
  if (rc == 0) rc = pe_exchange_push(x, err);
  free(recvs);
  if (rc != 0) return rc;
  // The rows the messages do not carry: read out of the node's arenas (every header has arrived,
  // so every arena is complete), then each holder told this rank is done with them.
  if (ht->mask_offset >= 0) {
    free(ht->pull_rows);
    free(ht->pull_first);
    ht->pull_rows = NULL;
    ht->pull_first = calloc((size_t)cells + 1, sizeof *ht->pull_first);
    if (ht->pull_first == NULL) return ht_fail(ht, PE_ERR_USAGE, err, "out of memory");
    for (int c = 0; c < cells; ++c)
      ht->pull_first[c + 1] = ht->pull_first[c] + (ht->cell_pulled[c] ? ht->recv_first[c + 1] - ht->recv_first[c] : 0);
    ht->pull_rows = ht_index(ht->pull_first[cells]);
    if (ht->pull_rows == NULL) return ht_fail(ht, PE_ERR_USAGE, err, "out of memory");
  }
  const int64_t row_bytes = pe_fields_wire_bytes(fields, nfields);
  for (int j = 0; j < per_node; ++j) {
    int pulled = 0;
    int64_t rows = 0;
    for (int n = 0; n < nodes; ++n) {
      const int c = j * nodes + n;
      if (!ht->cell_pulled[c]) continue;
      pulled = 1;
      rows += ht->recv_first[c + 1] - ht->recv_first[c];
      if (ht_pull_cell(ht, c, fields, nfields, err) != 0) return -1;
    }
    if (pulled) {
      pe_stream_fence();
      pe_engine_pull_done(ht->e, ht->node_peers[j], (uint64_t)(rows * row_bytes));
    }
  }
  return 0;
}

// The specs of a combine hop: one segment and one receive per peer, filled by the caller.
typedef struct ht_specs {
  pe_segment_t *segs;
  pe_recv_t *recvs;
} ht_specs_t;

static int ht_specs_alloc(pe_ht_t *ht, ht_specs_t *specs, int npeers, char *err) {
  specs->segs = calloc((size_t)npeers, sizeof *specs->segs);
  specs->recvs = calloc((size_t)npeers, sizeof *specs->recvs);
  if (specs->segs != NULL && specs->recvs != NULL) return 0;
  free(specs->segs);
  free(specs->recvs);
  return ht_fail(ht, PE_ERR_USAGE, err, "out of memory");
}

// Start the hop (each peer's message: its segment, if it has rows) and release the specs.
static pe_exchange_t *ht_specs_start(pe_ht_t *ht, ht_specs_t *specs, const char *op, int npeers, const int32_t *peers,
                                     int64_t row_bytes, int flags, char *err) {
  pe_send_t *sends = calloc((size_t)npeers, sizeof *sends);
  pe_exchange_t *x = NULL;
  if (sends == NULL) {
    ht_fail(ht, PE_ERR_USAGE, err, "out of memory");
  } else {
    for (int i = 0; i < npeers; ++i)
      sends[i] = (pe_send_t){.segments = (uint64_t)(uintptr_t)&specs->segs[i], .nsegments = specs->segs[i].nrows > 0};
    x = ht_start(ht, op, npeers, peers, sends, row_bytes, 0, specs->recvs, flags, err);
  }
  free(sends);
  free(specs->segs);
  free(specs->recvs);
  return x;
}

// A combine's accumulator rows (the network-hop rows' partial sums first, then this rank's
// tokens): of each node-hop row sent and of each token sent over the network (made once).
static int ht_targets(pe_ht_t *ht) {
  const int nodes = ht->nodes, me = ht->node, cells = ht_cells(ht);
  const int64_t num_hop = ht->hop_first[nodes], sent = ht->net_first[nodes];
  if (ht->node_targets != NULL) return 0;
  ht->node_targets = ht_index(ht->send_first[cells]);
  ht->net_targets = ht_index(sent);
  if (ht->node_targets == NULL || ht->net_targets == NULL) return -1;
  for (int c = 0; c < cells; ++c)
    for (int64_t i = ht->send_first[c]; i < ht->send_first[c + 1]; ++i)
      ht->node_targets[i] = ht->send_index[i] + (c % nodes == me ? num_hop : 0);
  for (int64_t i = 0; i < sent; ++i) ht->net_targets[i] = ht->net_index[i] + num_hop;
  return 0;
}

// A combine with finals: each accumulator row counts down the copies it sums (one per node-hop
// row sent for it, one per node a token went to), from the route's counts.
static int ht_final(pe_ht_t *ht, const pe_field_t *fields, int nfields) {
  const int64_t rows = ht->hop_first[ht->nodes] + ht->tokens;
  if (ht->contributions == NULL) {
    ht->contributions = calloc((size_t)(rows > 0 ? rows : 1), sizeof *ht->contributions);
    ht->remaining = malloc((size_t)(rows > 0 ? rows : 1) * sizeof *ht->remaining);
    if (ht->contributions == NULL || ht->remaining == NULL) return -1;
    for (int64_t i = 0; i < ht->send_first[ht_cells(ht)]; ++i) ht->contributions[ht->node_targets[i]]++;
    for (int64_t i = 0; i < ht->net_first[ht->nodes]; ++i) ht->contributions[ht->net_targets[i]]++;
  }
  memcpy(ht->remaining, ht->contributions, (size_t)rows * sizeof *ht->remaining);
  ht->final = (pe_final_t){.remaining = (uint64_t)(uintptr_t)ht->remaining,
                           .fields = (uint64_t)(uintptr_t)fields, .nfields = nfields};
  return 0;
}

pe_exchange_t *pe_ht_combine_node(pe_ht_t *ht, const char *op, const pe_field_t *send_fields, int nsend,
                                  const pe_field_t *acc_fields, int nacc, uint8_t *touched,
                                  const pe_field_t *final_fields, int nfinal, int flags, char *err) {
  const int per_node = ht->per_node, nodes = ht->nodes;
  if (ht->positions == NULL || ht->send_index == NULL) {
    pe_err(err, "%s: the dispatch's rows have not been received", op);
    pe_engine_fail(ht->e, PE_ERR_USAGE);
    return NULL;
  }
  if (ht->hop_first[nodes] + ht->tokens == 0) final_fields = NULL;  // no rows to sum
  if (ht_targets(ht) != 0 || (final_fields != NULL && ht_final(ht, final_fields, nfinal) != 0)) {
    ht_fail(ht, PE_ERR_USAGE, err, "out of memory");
    return NULL;
  }
  ht_specs_t specs;
  if (ht_specs_alloc(ht, &specs, per_node, err) != 0) return NULL;
  for (int j = 0; j < per_node; ++j) {
    const int64_t back = ht->recv_first[j * nodes], back_end = ht->recv_first[(j + 1) * nodes];
    specs.segs[j] = (pe_segment_t){.fields = (uint64_t)(uintptr_t)send_fields,
                                   .index = (uint64_t)(uintptr_t)(ht->positions + back), .nrows = back_end - back,
                                   .nfields = nsend};
    const int64_t sent = ht->send_first[j * nodes], sent_end = ht->send_first[(j + 1) * nodes];
    specs.recvs[j] = (pe_recv_t){.fields = (uint64_t)(uintptr_t)acc_fields,
                                 .index = (uint64_t)(uintptr_t)(ht->node_targets + sent),
                                 .touched = (uint64_t)(uintptr_t)touched, .expect_rows = sent_end - sent,
                                 .nfields = nacc, .final = final_fields != NULL ? (uint64_t)(uintptr_t)&ht->final : 0};
  }
  return ht_specs_start(ht, &specs, op, per_node, ht->node_peers, pe_fields_wire_bytes(send_fields, nsend), flags,
                        err);
}

pe_exchange_t *pe_ht_combine_net(pe_ht_t *ht, const char *op, const pe_field_t *send_fields, int nsend,
                                 const pe_field_t *acc_fields, int nacc, uint8_t *touched,
                                 const pe_field_t *final_fields, int nfinal, int flags, char *err) {
  const int nodes = ht->nodes;
  err[0] = '\0';
  if (nodes == 1) return NULL;
  if (ht->hop_first[nodes] + ht->tokens == 0) final_fields = NULL;  // as in the node hop
  if (ht->net_targets == NULL || (final_fields != NULL && ht->remaining == NULL)) {
    pe_err(err, "%s: the combine's network hop before its node hop", op);
    pe_engine_fail(ht->e, PE_ERR_USAGE);
    return NULL;
  }
  ht->final.fields = (uint64_t)(uintptr_t)final_fields;
  ht->final.nfields = nfinal;
  ht_specs_t specs;
  if (ht_specs_alloc(ht, &specs, nodes, err) != 0) return NULL;
  for (int n = 0; n < nodes; ++n) {  // partial sums back to each node's rows; this rank's tokens' sums in
    specs.segs[n] = (pe_segment_t){.fields = (uint64_t)(uintptr_t)send_fields, .first = ht->hop_first[n],
                                   .nrows = ht->hop_first[n + 1] - ht->hop_first[n], .nfields = nsend};
    specs.recvs[n] = (pe_recv_t){.fields = (uint64_t)(uintptr_t)acc_fields,
                                 .index = (uint64_t)(uintptr_t)(ht->net_targets + ht->net_first[n]),
                                 .touched = (uint64_t)(uintptr_t)touched,
                                 .expect_rows = ht->net_first[n + 1] - ht->net_first[n], .nfields = nacc,
                                 .final = final_fields != NULL ? (uint64_t)(uintptr_t)&ht->final : 0};
  }
  return ht_specs_start(ht, &specs, op, nodes, ht->net_peers, pe_fields_wire_bytes(send_fields, nsend), flags, err);
}

void pe_ht_sizes(const pe_ht_t *ht, int64_t *sizes) {
  const int nodes = ht->nodes;
  int64_t node_sent = 0, node_received = 0;
  for (int j = 0; j < ht->per_node; ++j) {
    if (j == ht->local) continue;
    if (ht->send_first != NULL) node_sent += ht->send_first[(j + 1) * nodes] - ht->send_first[j * nodes];
    if (ht->recv_first != NULL) node_received += ht->recv_first[(j + 1) * nodes] - ht->recv_first[j * nodes];
  }
  sizes[PE_HT_NET_SENT] = ht->net_first[nodes];
  sizes[PE_HT_HOP_ROWS] = ht->hop_first[nodes];
  sizes[PE_HT_NODE_SENT] = node_sent;
  sizes[PE_HT_NODE_RECEIVED] = node_received;
}
