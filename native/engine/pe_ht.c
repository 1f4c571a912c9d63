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
  uint8_t *hop;            // those rows, as they were on the wire
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
                   ht->hop_first, ht->hop, ht->send_index, ht->send_first, ht->recv_first, ht->positions,
                   ht->node_targets, ht->net_targets, ht->contributions, ht->remaining};
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
  *x = ht_start(ht, op, nodes, ht->net_peers, sends, pe_fields_wire_bytes(fields, nfields), 0, recvs, flags, err);
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
  int64_t *cursor = malloc((size_t)(nodes > per_node ? nodes : per_node) * sizeof *cursor);
  if (!ht->net_peers || !ht->node_peers || !ht->net_first || !ht->hop_first || !ht->own_first || !cursor) goto oom;
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
  for (int n = 0; n < nodes; ++n) ht->hop_first[n + 1] = ht->hop_first[n] + rows[n];
  if (ht_reserve_hop(ht) != 0) {
    ht_fail(ht, PE_ERR_USAGE, err, "out of memory");
    goto done;
  }
  pe_field_t field;
  ht_hop_recvs(ht, &field, recvs);
  rc = pe_exchange_set_recv(x, recvs, err);
  if (rc == 0) rc = pe_exchange_push(x, err);
done:
  free(rows);
  free(recvs);
  return rc;
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
  if (ht->nodes == 1) return 0;
  pe_recv_t *recvs = calloc((size_t)ht->nodes, sizeof *recvs);
  if (recvs == NULL || ht_reserve_hop(ht) != 0) {
    free(recvs);
    return ht_fail(ht, PE_ERR_USAGE, err, "out of memory");
  }
  pe_field_t field;
  ht_hop_recvs(ht, &field, recvs);
  const int rc = ht_start_net(ht, op, NULL, fields, nfields, -1, recvs, flags, x, err);
  free(recvs);
  return rc;
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
      const uint8_t *mask = ht->hop + r * ht->hop_row_bytes + ht->mask_offset;
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
      const uint8_t *mask = ht->hop + r * ht->hop_row_bytes + ht->mask_offset;
      for (int j = 0; j < per_node; ++j)
        if (mask[j]) ht->send_index[cursor[j * nodes + n]++] = r;
    }
  free(cursor);
  return 0;
}

// The node hop's receive side: the rows from local rank j, by (source node, source order), into
// their output rows.
static void ht_node_recvs(const pe_ht_t *ht, const pe_field_t *fields, int nfields, pe_recv_t *recvs) {
  for (int j = 0; j < ht->per_node; ++j) {
    const int64_t first = ht->recv_first[j * ht->nodes], end = ht->recv_first[(j + 1) * ht->nodes];
    recvs[j] = (pe_recv_t){.fields = (uint64_t)(uintptr_t)fields,
                           .index = (uint64_t)(uintptr_t)(ht->positions + first), .expect_rows = end - first,
                           .nfields = nfields};
  }
}

pe_exchange_t *pe_ht_forward(pe_ht_t *ht, const char *op, const pe_field_t *fields, int nfields,
                             const pe_field_t *out_fields, int nout, int flags, char *err) {
  const int per_node = ht->per_node, nodes = ht->nodes, me = ht->node;
  const int64_t row_bytes = pe_fields_wire_bytes(fields, nfields);
  if ((nodes > 1 && row_bytes > ht->hop_row_bytes) || (ht->send_index == NULL && ht->mask_offset < 0) ||
      (out_fields != NULL && ht->positions == NULL)) {
    pe_err(err, "%s: the node hop does not follow its network hop", op);
    pe_engine_fail(ht->e, PE_ERR_USAGE);
    return NULL;
  }
  if (ht->send_index == NULL && ht_build_sends(ht) != 0) {
    ht_fail(ht, PE_ERR_USAGE, err, "out of memory");
    return NULL;
  }
  pe_send_t *sends = calloc((size_t)per_node, sizeof *sends);
  pe_segment_t *segs = calloc((size_t)ht_cells(ht), sizeof *segs);
  int32_t *counts = calloc((size_t)ht_cells(ht), sizeof *counts);
  pe_recv_t *recvs = out_fields != NULL ? calloc((size_t)per_node, sizeof *recvs) : NULL;
  pe_exchange_t *x = NULL;
  if (sends == NULL || segs == NULL || counts == NULL || (out_fields != NULL && recvs == NULL)) {
    ht_fail(ht, PE_ERR_USAGE, err, "out of memory");
    goto done;
  }
  // Forwarded rows are gathered from the landed wire rows: the node hop's row is a prefix of them.
  const pe_field_t hop_field = {.base = (uint64_t)(uintptr_t)ht->hop, .row_stride = ht->hop_row_bytes,
                                .elem_stride = 1, .count = (int32_t)row_bytes, .mem_type = PE_U8,
                                .wire_type = PE_U8, .kind = PE_GATHER};
  for (int j = 0; j < per_node; ++j) {
    pe_segment_t *seg = &segs[j * nodes];
    int nseg = 0;
    for (int n = 0; n < nodes; ++n) {
      const int c = j * nodes + n;
      const int64_t rows = ht->send_first[c + 1] - ht->send_first[c];
      counts[c] = (int32_t)rows;
      if (rows == 0) continue;
      seg[nseg++] = (pe_segment_t){.fields = (uint64_t)(uintptr_t)(n == me ? fields : &hop_field),
                                   .index = (uint64_t)(uintptr_t)(ht->send_index + ht->send_first[c]),
                                   .nrows = rows, .nfields = n == me ? nfields : 1};
    }
    sends[j] = (pe_send_t){.segments = (uint64_t)(uintptr_t)seg, .counts = (uint64_t)(uintptr_t)&counts[j * nodes],
                           .nsegments = nseg};
  }
  if (recvs != NULL) ht_node_recvs(ht, out_fields, nout, recvs);
  x = ht_start(ht, op, per_node, ht->node_peers, sends, row_bytes, nodes, recvs, flags, err);
done:
  free(sends);
  free(segs);
  free(counts);
  free(recvs);
  return x;
}

int64_t pe_ht_node_rows(pe_ht_t *ht, pe_exchange_t *x, char *err) {
  const int per_node = ht->per_node, nodes = ht->nodes, cells = ht_cells(ht);
  int64_t *rows = malloc((size_t)per_node * sizeof *rows);
  int32_t *head = malloc((size_t)cells * sizeof *head);
  int64_t *counts = malloc((size_t)cells * sizeof *counts);
  int64_t total = -1;
  free(ht->recv_first);
  free(ht->positions);
  ht->positions = NULL;
  ht->recv_first = calloc((size_t)cells + 1, sizeof *ht->recv_first);
  if (!rows || !head || !counts || !ht->recv_first) {
    ht_fail(ht, PE_ERR_USAGE, err, "out of memory");
    goto done;
  }
  if (pe_exchange_headers(x, 0.0, rows, head, err) != 0) {
    ht_fail(ht, PE_ERR_USAGE, err, "the headers of the node hop have not all arrived");
    goto done;
  }
  for (int j = 0; j < per_node; ++j) {
    int64_t sum = 0;
    int negative = 0;
    for (int n = 0; n < nodes; ++n) {
      const int32_t c = head[j * nodes + n];
      negative |= c < 0;
      counts[j * nodes + n] = c;
      sum += c;
    }
    if (negative || sum != rows[j]) {
      pe_err(err, "rank %d sent %lld rows, its per-node counts say %lld", ht->node_peers[j], (long long)rows[j],
             (long long)sum);
      pe_engine_fail(ht->e, PE_ERR_PROTOCOL);
      goto done;
    }
  }
  for (int c = 0; c < cells; ++c) ht->recv_first[c + 1] = ht->recv_first[c] + counts[c];
  ht->positions = ht_index(ht->recv_first[cells]);
  if (ht->positions == NULL) {
    ht_fail(ht, PE_ERR_USAGE, err, "out of memory");
    goto done;
  }
  pe_ht_positions(counts, per_node, nodes, ht->positions);
  total = ht->recv_first[cells];
done:
  free(rows);
  free(head);
  free(counts);
  return total;
}

int pe_ht_node_receive(pe_ht_t *ht, pe_exchange_t *x, const pe_field_t *fields, int nfields, char *err) {
  if (ht->positions == NULL) return ht_fail(ht, PE_ERR_USAGE, err, "the node hop's rows are not counted yet");
  pe_recv_t *recvs = calloc((size_t)ht->per_node, sizeof *recvs);
  if (recvs == NULL) return ht_fail(ht, PE_ERR_USAGE, err, "out of memory");
  ht_node_recvs(ht, fields, nfields, recvs);
  int rc = pe_exchange_set_recv(x, recvs, err);
  if (rc == 0) rc = pe_exchange_push(x, err);
  free(recvs);
  return rc;
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
