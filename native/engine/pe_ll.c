// Routing of a low-latency dispatch on the CPU: which (token, k) selections go to which rank, and
// where the rows a rank receives land in its expert-major output. Counting sorts, one pass each,
// instead of a handful of sorts and gathers per call.
#include "pe_ll.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pe_common.h"
#include "pe_rows.h"

// Whether expert `e` is a selection an LL dispatch sends: a valid id, on a rank that is not masked.
static inline int ll_selected(int64_t e, int num_experts, int local, const uint8_t *masked) {
  return e >= 0 && e < num_experts && !(masked && masked[e / local]);
}

// The selections per expert ([num_experts]) an LL dispatch sends.
static void ll_count(const int64_t *topk_idx, int64_t tokens, int topk, int num_experts, int local,
                     const uint8_t *masked, int32_t *counts) {
  memset(counts, 0, (size_t)num_experts * sizeof *counts);
  for (int64_t i = 0; i < tokens * topk; ++i) {
    const int64_t e = topk_idx[i];
    if (ll_selected(e, num_experts, local, masked)) counts[e]++;
  }
}

int64_t pe_ll_route(const int64_t *topk_idx, int64_t tokens, int topk, int num_experts, int num_ranks,
                    const uint8_t *masked, int64_t *token, int64_t *k, int32_t *counts) {
  const int local = num_experts / num_ranks;
  int64_t *cursor = calloc((size_t)num_experts + 1, sizeof *cursor);
  if (cursor == NULL) return -1;
  ll_count(topk_idx, tokens, topk, num_experts, local, masked, counts);
  int64_t total = 0;
  for (int e = 0; e < num_experts; ++e) {  // experts in order: (rank, local expert) order
    cursor[e] = total;
    total += counts[e];
  }
  for (int64_t t = 0; t < tokens; ++t) {  // tokens in order: each expert's selections in token order
    for (int j = 0; j < topk; ++j) {
      const int64_t e = topk_idx[t * topk + j];
      if (!ll_selected(e, num_experts, local, masked)) continue;
      const int64_t at = cursor[e]++;
      token[at] = t;
      k[at] = j;
    }
  }
  free(cursor);
  return total;
}

void pe_ll_place(const int64_t *counts, int num_ranks, int local, int64_t slots, int64_t *positions,
                 int64_t *layout_range, int32_t *expert_count) {
  // begin of (source s, expert e) = rows of expert e from sources before s
  for (int e = 0; e < local; ++e) {
    int64_t begin = 0;
    for (int s = 0; s < num_ranks; ++s) {
      const int64_t n = counts[(int64_t)s * local + e];
      layout_range[(int64_t)e * num_ranks + s] = (begin << 32) | n;
      begin += n;
    }
    expert_count[e] = (int32_t)begin;
  }
  int64_t at = 0;  // rows arrive grouped by source, then expert, in token order
  for (int s = 0; s < num_ranks; ++s) {
    for (int e = 0; e < local; ++e) {
      const int64_t range = layout_range[(int64_t)e * num_ranks + s];
      const int64_t first = (int64_t)e * slots + (range >> 32), n = range & 0xffffffff;
      for (int64_t j = 0; j < n; ++j) positions[at++] = first + j;
    }
  }
}

// ---------------------------------------------------------------------------- on the engine
static const char *const SHAPE_NAMES[PE_LL_SHAPE] = {"num_max_dispatch_tokens_per_rank", "hidden", "num_experts",
                                                     "use_fp8"};

struct pe_ll {
  pe_engine_t *e;
  int rank, world, local, topk;
  int64_t tokens;
  int32_t shape[PE_LL_SHAPE];
  int npeers;
  int32_t *peers;        // the exchange's ranks (unmasked ones, this rank included)
  pe_exchange_t *x;      // the dispatch's exchange
  int64_t *token, *k;    // selections sent, by (rank, token, k)
  int64_t *rank_first;   // [world + 1]: selections of rank r are [rank_first[r], rank_first[r + 1])
  int32_t *counts;       // [world * local]: selections per expert, then the header counts
  int64_t *positions;    // rows received, by (source, token, k): their output row (recorded as they land)
  int64_t *source_first; // [world + 1]
  // The wire: each token once per rank it selected experts of, with the list of those experts.
  int64_t *wire_token;   // tokens sent, by (rank, token)
  int64_t *wire_first;   // [world + 1]
  int32_t *lists;        // [world, tokens, topk]: the rank's local expert of each selection, or -1
  pe_fanout_t *fanout;   // receive side: per peer, where its rows go (cursor / end per local expert)
  int64_t *cursor, *end;
  // A combine that sums on the expert side: the weights of this rank's selections (by rank, token,
  // k) and those of the rows it received (by source, token, k), each with its token.
  float *weights_sent;       // per selection sent: its weight
  float *weights_received;   // per row received: its weight (0 when its source dropped out)
  int64_t *tokens_received;  // per row received: its source's token
  int64_t *group_end;        // per received wire row: end of its selections among the source's rows
};

void pe_ll_free(pe_ll_t *ll) {
  if (ll == NULL) return;
  free(ll->peers);
  free(ll->token);
  free(ll->k);
  free(ll->rank_first);
  free(ll->counts);
  free(ll->positions);
  free(ll->source_first);
  free(ll->wire_token);
  free(ll->wire_first);
  free(ll->lists);
  free(ll->fanout);
  free(ll->cursor);
  free(ll->end);
  free(ll->weights_sent);
  free(ll->weights_received);
  free(ll->tokens_received);
  free(ll->group_end);
  free(ll);
}

pe_exchange_t *pe_ll_exchange(pe_ll_t *ll) { return ll->x; }

void pe_ll_send_counts(const pe_ll_t *ll, int64_t *per_rank) {
  for (int r = 0; r < ll->world; ++r) per_rank[r] = ll->rank_first[r + 1] - ll->rank_first[r];
}

void pe_ll_wire_rows(const pe_ll_t *ll, int64_t *per_rank) {
  for (int r = 0; r < ll->world; ++r) per_rank[r] = ll->wire_first[r + 1] - ll->wire_first[r];
}

// An exchange's ranks into `peers` ([world]): every rank but the masked ones, this one always.
// Returns how many.
static int ll_peers(int rank, int world, const uint8_t *masked, int32_t *peers) {
  int n = 0;
  for (int r = 0; r < world; ++r)
    if (r == rank || masked == NULL || !masked[r]) peers[n++] = r;
  return n;
}

pe_ll_t *pe_ll_dispatch(pe_engine_t *e, const char *op, const int64_t *topk_idx, int64_t tokens, int topk,
                        int num_experts, const uint8_t *masked, const int32_t *shape, const pe_field_t *fields,
                        int nfields, int flags, char *err) {
  const int world = pe_engine_world(e);
  if (num_experts <= 0 || num_experts % world || tokens < 0 || topk <= 0) {
    pe_err(err, "%s: bad LL shape (%d experts on %d ranks, %lld tokens, top-%d)", op, num_experts, world,
           (long long)tokens, topk);
    return NULL;
  }
  pe_ll_t *ll = calloc(1, sizeof *ll);
  if (ll == NULL) goto oom;
  ll->e = e;
  ll->rank = pe_engine_rank(e);
  ll->world = world;
  ll->local = num_experts / world;
  ll->topk = topk;
  ll->tokens = tokens;
  memcpy(ll->shape, shape, sizeof ll->shape);
  const size_t sel = (size_t)(tokens * topk > 0 ? tokens * topk : 1);
  ll->token = malloc(sel * sizeof *ll->token);
  ll->k = malloc(sel * sizeof *ll->k);
  ll->rank_first = calloc((size_t)world + 1, sizeof *ll->rank_first);
  ll->counts = malloc((size_t)num_experts * sizeof *ll->counts);
  ll->peers = malloc((size_t)world * sizeof *ll->peers);
  if (!ll->token || !ll->k || !ll->rank_first || !ll->counts || !ll->peers) goto oom;
  ll->npeers = ll_peers(ll->rank, world, masked, ll->peers);
  ll_count(topk_idx, tokens, topk, num_experts, ll->local, masked, ll->counts);
  for (int r = 0; r < world; ++r) {
    int64_t n = 0;
    for (int j = 0; j < ll->local; ++j) n += ll->counts[r * ll->local + j];
    ll->rank_first[r + 1] = ll->rank_first[r] + n;
  }
  // One pass over the selections: each rank's selections by (token, k), the order its rows come
  // back in the combine (a token's rows from one rank arrive together and are summed as one run);
  // and the wire: a token goes once to each rank it selected experts of, followed by the list of
  // them. Only the lists of the (rank, token) pairs on the wire are written: the work is per
  // selection, whatever the number of ranks.
  ll->wire_token = malloc(sel * sizeof *ll->wire_token);
  ll->wire_first = calloc((size_t)world + 1, sizeof *ll->wire_first);
  ll->lists = malloc((size_t)world * sel * sizeof *ll->lists);
  int64_t *seen = malloc(3 * (size_t)world * sizeof *seen);  // per rank: the last token listed
  int64_t *cursor = seen + world;                             // per rank: its next wire row
  int64_t *next = cursor + world;                             // per rank: its next selection
  if (!ll->wire_token || !ll->wire_first || !ll->lists || !seen) {
    free(seen);
    goto oom;
  }
  for (int r = 0; r < world; ++r) {
    seen[r] = -1;
    next[r] = ll->rank_first[r];
  }
  for (int64_t t = 0; t < tokens; ++t) {
    for (int j = 0; j < topk; ++j) {
      const int64_t ex = topk_idx[t * topk + j];
      if (!ll_selected(ex, num_experts, ll->local, masked)) continue;
      const int64_t r = ex / ll->local, at = next[r]++;
      ll->token[at] = t;
      ll->k[at] = j;
      int32_t *list = &ll->lists[(r * tokens + t) * topk];
      if (seen[r] != t) {  // the token's first selection on rank r: one more row, a fresh list
        seen[r] = t;
        ll->wire_first[r + 1]++;
        memset(list, 0xff, (size_t)topk * sizeof *list);  // -1: not this rank's
      }
      list[j] = (int32_t)(ex % ll->local);
    }
  }
  for (int r = 0; r < world; ++r) {
    ll->wire_first[r + 1] += ll->wire_first[r];
    cursor[r] = ll->wire_first[r];
  }
  for (int64_t t = 0; t < tokens; ++t) {  // tokens in order: each rank's rows in token order
    for (int j = 0; j < topk; ++j) {
      const int64_t ex = topk_idx[t * topk + j];
      if (!ll_selected(ex, num_experts, ll->local, masked)) continue;
      const int64_t r = ex / ll->local;
      if (cursor[r] == ll->wire_first[r] || ll->wire_token[cursor[r] - 1] != t) ll->wire_token[cursor[r]++] = t;
    }
  }
  free(seen);
  // One segment per peer, its fields followed by the list; header counts: the shape, then the
  // rows per local expert.
  const int ncounts = PE_LL_SHAPE + ll->local;
  const int64_t row_bytes = pe_fields_wire_bytes(fields, nfields) + 4 * (int64_t)topk;  // then the list
  pe_send_t *sends = calloc((size_t)ll->npeers, sizeof *sends);
  pe_segment_t *segs = calloc((size_t)ll->npeers, sizeof *segs);
  pe_field_t *wire_fields = malloc((size_t)ll->npeers * (size_t)(nfields + 1) * sizeof *wire_fields);
  int32_t *head = malloc((size_t)ll->npeers * (size_t)ncounts * sizeof *head);
  if (sends == NULL || segs == NULL || head == NULL || wire_fields == NULL) {
    free(sends);
    free(segs);
    free(head);
    free(wire_fields);
    goto oom;
  }
  for (int i = 0; i < ll->npeers; ++i) {
    const int r = ll->peers[i];
    int32_t *h = &head[(int64_t)i * ncounts];
    memcpy(h, ll->shape, sizeof ll->shape);
    memcpy(h + PE_LL_SHAPE, &ll->counts[r * ll->local], (size_t)ll->local * sizeof *h);
    pe_field_t *f = &wire_fields[(int64_t)i * (nfields + 1)];
    memcpy(f, fields, (size_t)nfields * sizeof *f);
    f[nfields] = (pe_field_t){.base = (uint64_t)(uintptr_t)&ll->lists[(int64_t)r * tokens * topk],
                              .row_stride = 4 * (int64_t)topk, .elem_stride = 4, .count = topk, .mem_type = PE_I32,
                              .wire_type = PE_I32, .kind = PE_GATHER};
    segs[i] = (pe_segment_t){.fields = (uint64_t)(uintptr_t)f,
                             .index = (uint64_t)(uintptr_t)(ll->wire_token + ll->wire_first[r]),
                             .nrows = ll->wire_first[r + 1] - ll->wire_first[r], .nfields = nfields + 1};
    sends[i] = (pe_send_t){.segments = (uint64_t)(uintptr_t)&segs[i], .counts = (uint64_t)(uintptr_t)h,
                           .nsegments = segs[i].nrows > 0};
  }
  ll->x = pe_exchange_start(e, op, ll->npeers, ll->peers, sends, row_bytes, ncounts, NULL, flags, err);
  free(sends);
  free(segs);
  free(head);
  free(wire_fields);
  if (ll->x == NULL || pe_exchange_push(ll->x, err) != 0) {
    if (ll->x != NULL) pe_exchange_free(ll->x);
    pe_ll_free(ll);
    return NULL;
  }
  return ll;
oom:
  pe_err(err, "%s: out of memory", op);
  pe_engine_fail(e, PE_ERR_USAGE);
  pe_ll_free(ll);
  return NULL;
}

int pe_ll_dispatch_recv(pe_ll_t *ll, const pe_field_t *fields, int nfields, int64_t slots, const uint8_t *ignore,
                        int64_t *layout_range, int32_t *expert_count, int32_t *bad_rank, char *err) {
  const int ncounts = PE_LL_SHAPE + ll->local, world = ll->world;
  int64_t *rows = malloc((size_t)ll->npeers * sizeof *rows);
  int32_t *head = malloc((size_t)ll->npeers * (size_t)ncounts * sizeof *head);
  int64_t *counts = calloc((size_t)world * (size_t)ll->local, sizeof *counts);
  pe_recv_t *recvs = calloc((size_t)ll->npeers, sizeof *recvs);
  ll->source_first = calloc((size_t)world + 1, sizeof *ll->source_first);
  int rc = -1;
  *bad_rank = -1;
  if (!rows || !head || !counts || !recvs || !ll->source_first) {
    pe_err(err, "out of memory");
    pe_engine_fail(ll->e, PE_ERR_USAGE);
    goto done;
  }
  if (pe_exchange_headers(ll->x, 0.0, rows, head, err) != 0) {
    if (!err[0]) pe_err(err, "the headers of the LL dispatch have not all arrived");
    pe_engine_fail(ll->e, PE_ERR_USAGE);
    goto done;
  }
  for (int i = 0; i < ll->npeers; ++i) {
    const int r = ll->peers[i];
    const int32_t *h = &head[(int64_t)i * ncounts];
    if (ignore != NULL && ignore[r]) continue;
    if (memcmp(h, ll->shape, sizeof ll->shape) != 0) {
      int at = snprintf(err, PE_ERR_LEN, "rank %d called with ", r);
      const char *sep = "";
      for (int j = 0; j < PE_LL_SHAPE && at < PE_ERR_LEN; ++j) {
        if (h[j] == ll->shape[j]) continue;
        at += snprintf(err + at, (size_t)(PE_ERR_LEN - at), "%s%s=%d (rank %d: %d)", sep, SHAPE_NAMES[j], h[j],
                       ll->rank, ll->shape[j]);
        sep = ", ";
      }
      if (at < PE_ERR_LEN) snprintf(err + at, (size_t)(PE_ERR_LEN - at), ": every rank must pass the same values");
      *bad_rank = r;
      rc = -2;
      goto done;
    }
    for (int j = 0; j < ll->local; ++j) counts[(int64_t)r * ll->local + j] = h[PE_LL_SHAPE + j];
  }
  for (int r = 0; r < world; ++r) {
    int64_t n = 0;
    for (int j = 0; j < ll->local; ++j) n += counts[(int64_t)r * ll->local + j];
    ll->source_first[r + 1] = ll->source_first[r] + n;
  }
  const int64_t total = ll->source_first[world];
  ll->positions = malloc((size_t)(total > 0 ? total : 1) * sizeof *ll->positions);
  if (ll->positions == NULL) {
    pe_err(err, "out of memory");
    pe_engine_fail(ll->e, PE_ERR_USAGE);
    goto done;
  }
  pe_ll_place(counts, world, ll->local, slots, ll->positions, layout_range, expert_count);
  // Each peer's rows fan out to its experts' blocks: cursor and end of (expert, source) per peer.
  const size_t cells = (size_t)ll->npeers * (size_t)ll->local;
  ll->fanout = calloc((size_t)ll->npeers, sizeof *ll->fanout);
  ll->cursor = malloc(cells * sizeof *ll->cursor);
  ll->end = malloc(cells * sizeof *ll->end);
  pe_field_t *wire_fields = malloc((size_t)(nfields + 1) * sizeof *wire_fields);
  if (!ll->fanout || !ll->cursor || !ll->end || !wire_fields) {
    free(wire_fields);
    pe_err(err, "out of memory");
    pe_engine_fail(ll->e, PE_ERR_USAGE);
    goto done;
  }
  memcpy(wire_fields, fields, (size_t)nfields * sizeof *wire_fields);
  wire_fields[nfields] = (pe_field_t){.count = 4 * ll->topk, .mem_type = PE_U8, .wire_type = PE_U8, .kind = PE_SKIP};
  const int32_t list_offset = (int32_t)pe_fields_wire_bytes(fields, nfields);
  for (int i = 0; i < ll->npeers; ++i) {
    const int r = ll->peers[i];
    int64_t *cursor = &ll->cursor[(int64_t)i * ll->local], *end = &ll->end[(int64_t)i * ll->local];
    for (int j = 0; j < ll->local; ++j) {
      const int64_t range = layout_range[(int64_t)j * world + r];
      cursor[j] = (int64_t)j * slots + (range >> 32);
      end[j] = cursor[j] + (range & 0xffffffff);
    }
    // The placement by (expert, token) fills `positions` first (every entry a valid row, should a
    // peer drop out midway); the fan-out then records each row's place as it lands, in the order
    // the source listed them: (token, k), the order of its selections in the combine.
    ll->fanout[i] = (pe_fanout_t){.list_offset = list_offset, .list_count = ll->topk, .nkeys = ll->local,
                                  .cursor = (uint64_t)(uintptr_t)cursor, .end = (uint64_t)(uintptr_t)end,
                                  .record = (uint64_t)(uintptr_t)(ll->positions + ll->source_first[r])};
    recvs[i] = (pe_recv_t){.fields = (uint64_t)(uintptr_t)wire_fields, .expect_rows = -1,
                           .fanout = (uint64_t)(uintptr_t)&ll->fanout[i], .nfields = nfields + 1};
    if (ignore != NULL && ignore[r]) recvs[i].expect_rows = 0;  // masked or dropped: no rows
  }
  rc = pe_exchange_set_recv(ll->x, recvs, err);
  free(wire_fields);
  if (rc == 0) rc = pe_exchange_push(ll->x, err);
done:
  free(rows);
  free(head);
  free(counts);
  free(recvs);
  return rc;
}

// ---------------------------------------------------------------------------- combines
// A combine runs among today's unmasked ranks, one message to each: its spec arrays.
typedef struct combine_specs {
  int32_t *peers;
  int npeers;
  pe_send_t *sends;
  pe_segment_t *segs;
  pe_recv_t *recvs;
} combine_specs_t;

static void combine_specs_free(combine_specs_t *c) {
  free(c->peers);
  free(c->sends);
  free(c->segs);
  free(c->recvs);
}

// 0, or -1 (with `err`) when the dispatch has not been received or memory ran out.
static int combine_specs(pe_engine_t *e, const pe_ll_t *ll, const char *op, const uint8_t *masked,
                         combine_specs_t *c, char *err) {
  *c = (combine_specs_t){0};
  if (ll->positions == NULL) {
    pe_err(err, "%s: the dispatch's rows have not been received", op);
    pe_engine_fail(e, PE_ERR_USAGE);
    return -1;
  }
  c->peers = malloc((size_t)ll->world * sizeof *c->peers);
  c->sends = calloc((size_t)ll->world, sizeof *c->sends);
  c->segs = calloc((size_t)ll->world, sizeof *c->segs);
  c->recvs = calloc((size_t)ll->world, sizeof *c->recvs);
  if (!c->peers || !c->sends || !c->segs || !c->recvs) {
    combine_specs_free(c);
    pe_err(err, "%s: out of memory", op);
    pe_engine_fail(e, PE_ERR_USAGE);
    return -1;
  }
  c->npeers = ll_peers(ll->rank, ll->world, masked, c->peers);
  return 0;
}

// Start the combine's exchange from its specs (freed here) and send what credits allow.
static pe_exchange_t *combine_start(pe_engine_t *e, const char *op, combine_specs_t *c, int64_t row_bytes,
                                    int flags, char *err) {
  pe_exchange_t *x = pe_exchange_start(e, op, c->npeers, c->peers, c->sends, row_bytes, 0, c->recvs, flags, err);
  if (x != NULL && pe_exchange_push(x, err) != 0) {
    pe_exchange_free(x);
    x = NULL;
  }
  combine_specs_free(c);
  return x;
}

// Each token's countdown (pe_final_t): the items (tokens) in [first[r], first[r + 1]) of each of
// the combine's ranks r. Returns `final`, or NULL when there is nothing to count down.
static pe_final_t *count_down(const pe_ll_t *ll, const combine_specs_t *c, const int64_t *first,
                              const int64_t *token, pe_final_t *final) {
  if (final == NULL || ll->tokens == 0) return NULL;  // (and no rows to reduce)
  int32_t *remaining = (int32_t *)(uintptr_t)final->remaining;
  memset(remaining, 0, (size_t)ll->tokens * sizeof *remaining);
  for (int i = 0; i < c->npeers; ++i)
    for (int64_t j = first[c->peers[i]]; j < first[c->peers[i] + 1]; ++j) remaining[token[j]]++;
  return final;
}

// Per selection sent (by rank, token, k): topk_weights[token, k].
static void selection_weights(const pe_ll_t *ll, const float *topk_weights, float *weights) {
  for (int64_t i = 0; i < ll->rank_first[ll->world]; ++i) weights[i] = topk_weights[ll->token[i] * ll->topk + ll->k[i]];
}

pe_exchange_t *pe_ll_combine(pe_engine_t *e, pe_ll_t *ll, const char *op, const pe_field_t *send_fields, int nsend,
                             const float *topk_weights, float *weights, const pe_field_t *acc_fields, int nacc,
                             uint8_t *touched, const uint8_t *masked, pe_final_t *final, int flags, char *err) {
  combine_specs_t c;
  if (combine_specs(e, ll, op, masked, &c, err) != 0) return NULL;
  selection_weights(ll, topk_weights, weights);
  final = count_down(ll, &c, ll->rank_first, ll->token, final);  // a token's selections
  for (int i = 0; i < c.npeers; ++i) {
    const int r = c.peers[i];
    c.segs[i] = (pe_segment_t){.fields = (uint64_t)(uintptr_t)send_fields,
                               .index = (uint64_t)(uintptr_t)(ll->positions + ll->source_first[r]),
                               .nrows = ll->source_first[r + 1] - ll->source_first[r], .nfields = nsend};
    c.sends[i] = (pe_send_t){.segments = (uint64_t)(uintptr_t)&c.segs[i], .nsegments = c.segs[i].nrows > 0};
    const int64_t first = ll->rank_first[r];
    c.recvs[i] = (pe_recv_t){.fields = (uint64_t)(uintptr_t)acc_fields,
                             .index = (uint64_t)(uintptr_t)(ll->token + first),
                             .weights = (uint64_t)(uintptr_t)(weights + first), .touched = (uint64_t)(uintptr_t)touched,
                             .expect_rows = ll->rank_first[r + 1] - first, .nfields = nacc,
                             .final = (uint64_t)(uintptr_t)final};
  }
  return combine_start(e, op, &c, pe_fields_wire_bytes(send_fields, nsend), flags, err);
}

// ---------------------------------------------------------------------------- expert-side sums
// The combine in two exchanges: the weights go to the experts, then one partial sum per (token,
// expert rank) comes back instead of one row per selection.

pe_exchange_t *pe_ll_combine_weights(pe_engine_t *e, pe_ll_t *ll, const char *op, const float *topk_weights,
                                     const uint8_t *masked, int flags, char *err) {
  combine_specs_t c;
  if (combine_specs(e, ll, op, masked, &c, err) != 0) return NULL;
  const size_t nsel = (size_t)ll->rank_first[ll->world], nrecv = (size_t)ll->source_first[ll->world];
  free(ll->weights_sent);
  free(ll->weights_received);
  free(ll->tokens_received);
  ll->weights_sent = malloc((nsel ? nsel : 1) * sizeof *ll->weights_sent);
  // zeros: a source that drops out sends none, and its rows then sum to nothing
  ll->weights_received = calloc(nrecv ? nrecv : 1, sizeof *ll->weights_received);
  ll->tokens_received = calloc(nrecv ? nrecv : 1, sizeof *ll->tokens_received);
  if (!ll->weights_sent || !ll->weights_received || !ll->tokens_received) {
    combine_specs_free(&c);
    pe_err(err, "%s: out of memory", op);
    pe_engine_fail(e, PE_ERR_USAGE);
    return NULL;
  }
  selection_weights(ll, topk_weights, ll->weights_sent);
  // A row per selection: its weight, then its token (the selection's own array).
  const pe_field_t send_fields[2] = {
      {.base = (uint64_t)(uintptr_t)ll->weights_sent, .row_stride = 4, .elem_stride = 4, .count = 1,
       .mem_type = PE_F32, .wire_type = PE_F32, .kind = PE_GATHER},
      {.base = (uint64_t)(uintptr_t)ll->token, .row_stride = 8, .elem_stride = 8, .count = 1, .mem_type = PE_I64,
       .wire_type = PE_I64, .kind = PE_GATHER}};
  const pe_field_t recv_fields[2] = {
      {.base = (uint64_t)(uintptr_t)ll->weights_received, .row_stride = 4, .elem_stride = 4, .count = 1,
       .mem_type = PE_F32, .wire_type = PE_F32, .kind = PE_SCATTER},
      {.base = (uint64_t)(uintptr_t)ll->tokens_received, .row_stride = 8, .elem_stride = 8, .count = 1,
       .mem_type = PE_I64, .wire_type = PE_I64, .kind = PE_SCATTER}};
  for (int i = 0; i < c.npeers; ++i) {
    const int r = c.peers[i];
    c.segs[i] = (pe_segment_t){.fields = (uint64_t)(uintptr_t)send_fields, .first = ll->rank_first[r],
                               .nrows = ll->rank_first[r + 1] - ll->rank_first[r], .nfields = 2};
    c.sends[i] = (pe_send_t){.segments = (uint64_t)(uintptr_t)&c.segs[i], .nsegments = c.segs[i].nrows > 0};
    c.recvs[i] = (pe_recv_t){.fields = (uint64_t)(uintptr_t)recv_fields, .first = ll->source_first[r],
                             .expect_rows = ll->source_first[r + 1] - ll->source_first[r], .nfields = 2};
  }
  return combine_start(e, op, &c, pe_fields_wire_bytes(send_fields, 2), flags, err);
}

pe_exchange_t *pe_ll_combine_sums(pe_engine_t *e, pe_ll_t *ll, const char *op, const pe_field_t *send_fields,
                                  int nsend, const pe_field_t *acc_fields, int nacc, uint8_t *touched,
                                  const uint8_t *masked, const uint8_t *ignore, pe_final_t *final, int flags,
                                  char *err) {
  if (ll->weights_received == NULL) {
    pe_err(err, "%s: the combine's weights have not been exchanged", op);
    pe_engine_fail(e, PE_ERR_USAGE);
    return NULL;
  }
  combine_specs_t c;
  if (combine_specs(e, ll, op, masked, &c, err) != 0) return NULL;
  const size_t nrecv = (size_t)ll->source_first[ll->world];
  free(ll->group_end);
  ll->group_end = malloc((nrecv ? nrecv : 1) * sizeof *ll->group_end);
  if (ll->group_end == NULL) {
    combine_specs_free(&c);
    pe_err(err, "%s: out of memory", op);
    pe_engine_fail(e, PE_ERR_USAGE);
    return NULL;
  }
  final = count_down(ll, &c, ll->wire_first, ll->wire_token, final);  // the ranks a token went to
  for (int i = 0; i < c.npeers; ++i) {
    const int r = c.peers[i];
    // r's selections on this rank arrive by (token, k): a token's run of them is one partial sum
    const int64_t first = ll->source_first[r], n = ll->source_first[r + 1] - first;
    const int64_t *token = ll->tokens_received + first;
    int64_t groups = 0;
    for (int64_t j = 1; j <= n; ++j)
      if (j == n || token[j] != token[j - 1]) ll->group_end[first + groups++] = j;
    if (ignore != NULL && ignore[r]) groups = 0;  // its weights never came: nothing to send it
    c.segs[i] = (pe_segment_t){.fields = (uint64_t)(uintptr_t)send_fields,
                               .index = (uint64_t)(uintptr_t)(ll->positions + first), .nrows = groups,
                               .nfields = nsend, .group_end = (uint64_t)(uintptr_t)(ll->group_end + first),
                               .weights = (uint64_t)(uintptr_t)(ll->weights_received + first)};
    c.sends[i] = (pe_send_t){.segments = (uint64_t)(uintptr_t)&c.segs[i], .nsegments = groups > 0};
    const int64_t wire = ll->wire_first[r];
    c.recvs[i] = (pe_recv_t){.fields = (uint64_t)(uintptr_t)acc_fields,
                             .index = (uint64_t)(uintptr_t)(ll->wire_token + wire),
                             .touched = (uint64_t)(uintptr_t)touched, .expect_rows = ll->wire_first[r + 1] - wire,
                             .nfields = nacc, .final = (uint64_t)(uintptr_t)final};
  }
  // one partial sum per (token, rank), a few per token: summed once all are in (when they fit)
  return combine_start(e, op, &c, pe_fields_wire_bytes(send_fields, nsend), flags | PE_SUM_AT_END, err);
}
