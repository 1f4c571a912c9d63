// Routing of a low-latency dispatch on the CPU (see pe_ll.c).
#pragma once

#include <stdint.h>

#include "pe_engine.h"

// The selections of `topk_idx` ([tokens, topk], -1 for none) an LL dispatch sends, ordered by
// (destination rank, local expert, token): their token and k into `token` / `k` (tokens * topk
// entries at most), the count per expert into `counts` ([num_experts], i.e. [ranks, local
// experts]). Experts of ranks with `masked[rank]` set are skipped. Returns the number of
// selections, or -1 when out of memory.
int64_t pe_ll_route(const int64_t *topk_idx, int64_t tokens, int topk, int num_experts, int num_ranks,
                    const uint8_t *masked, int64_t *token, int64_t *k, int32_t *counts);

// Where the rows an LL dispatch receives land: `counts` ([ranks, local] rows from each source per
// local expert, arriving grouped by source, then expert) to the flat expert-major row of each
// (`positions`: e * slots + first slot of that source within expert e + j), `layout_range`
// ([local, ranks]: begin << 32 | count) and the rows per expert (`expert_count`).
void pe_ll_place(const int64_t *counts, int num_ranks, int local, int64_t slots, int64_t *positions,
                 int64_t *layout_range, int32_t *expert_count);

// ---------------------------------------------------------------------------- on the engine
// A low-latency dispatch as one engine exchange, and its combine, with the index lists built here
// instead of by the caller: the routing of the dispatch, and where its rows landed, are kept for
// the combine.

typedef struct pe_ll pe_ll_t;

#define PE_LL_SHAPE 4  // num_max_dispatch_tokens_per_rank, hidden, num_experts, use_fp8

// Start an LL dispatch among the ranks of `e` but the masked ones (masked[rank], may be NULL; this
// rank always takes part): route `topk_idx` (see pe_ll_route), and send each rank one message
// holding, for each token that selected experts of that rank (token order), source row `token` of
// `fields` (PE_GATHER / PE_ROW_INDEX fields) followed by the token's top-k list of that rank's local
// experts (int32, -1 elsewhere), which the receiver fans out (pe_fanout_t). Its header carries
// `shape` and the selections per local expert. The rows leave before this returns as far as
// credits allow. NULL on error.
pe_ll_t *pe_ll_dispatch(pe_engine_t *e, const char *op, const int64_t *topk_idx, int64_t tokens, int topk,
                        int num_experts, const uint8_t *masked, const int32_t *shape, const pe_field_t *fields,
                        int nfields, int flags, char *err);
// The dispatch's exchange, for the caller to wait on and free (pe_ll_dispatch_recv needs it until then).
pe_exchange_t *pe_ll_exchange(pe_ll_t *ll);
// Selections sent to each rank ([world]).
void pe_ll_send_counts(const pe_ll_t *ll, int64_t *per_rank);
// Rows on the wire to each rank ([world]): its distinct tokens, each with its list of experts.
void pe_ll_wire_rows(const pe_ll_t *ll, int64_t *per_rank);
// Once every header arrived: check that each peer called with this rank's shape (else -2, with the
// peer in `bad_rank` and the difference in `err`), lay the rows out expert-major (`slots` rows per
// local expert; rows of ranks with ignore[rank] set count as none), write `layout_range`
// ([local, world]: begin << 32 | count) and `expert_count` ([local]), and say where the rows go:
// `fields` (PE_SCATTER fields over the [local * slots] output rows). 0, or -1 on error.
int pe_ll_dispatch_recv(pe_ll_t *ll, const pe_field_t *fields, int nfields, int64_t slots, const uint8_t *ignore,
                        int64_t *layout_range, int32_t *expert_count, int32_t *bad_rank, char *err);
// Start the combine of a received dispatch: each source gets back its rows, taken by `send_fields`
// from the output rows where they landed; the rows from each expert rank are reduced into token
// rows of `acc_fields` (PE_REDUCE), weighted by topk_weights[token, k] (float32 [tokens, topk],
// copied into `weights`, one per selection), `touched` as in pe_recv_t. Masked ranks are left out.
// With `final` (its `remaining`: int32 [tokens], written here; its fields over the result rows),
// a token's last row writes its sum straight into the result (see pe_final_t).
pe_exchange_t *pe_ll_combine(pe_engine_t *e, pe_ll_t *ll, const char *op, const pe_field_t *send_fields, int nsend,
                             const float *topk_weights, float *weights, const pe_field_t *acc_fields, int nacc,
                             uint8_t *touched, const uint8_t *masked, pe_final_t *final, int flags, char *err);
// The combine with the sums on the expert side (two exchanges instead of one, about 3.6 rows per
// token back instead of 8 with top-8 of 256 experts on 4 ranks; partial sums rounded to the wire
// type, as in DeepEP's internode HT combine):
// 1. pe_ll_combine_weights: each rank sends every rank it dispatched to the weights of its
//    selections there (topk_weights[token, k], float32 [tokens, topk]), with their tokens.
// 2. Once that exchange completed, pe_ll_combine_sums: each rank sends each source, for each token
//    it received from it, the weighted sum of the token's rows in `send_fields` (float32 sums, cast
//    to the wire type); the sums from each rank reduce (weight 1) into `acc_fields` as in
//    pe_ll_combine (`touched`, `final` likewise; a token's countdown is the ranks it went to).
//    Sources in `ignore` (dropped from the first exchange; may be NULL) are sent nothing.
pe_exchange_t *pe_ll_combine_weights(pe_engine_t *e, pe_ll_t *ll, const char *op, const float *topk_weights,
                                     const uint8_t *masked, int flags, char *err);
pe_exchange_t *pe_ll_combine_sums(pe_engine_t *e, pe_ll_t *ll, const char *op, const pe_field_t *send_fields,
                                  int nsend, const pe_field_t *acc_fields, int nacc, uint8_t *touched,
                                  const uint8_t *masked, const uint8_t *ignore, pe_final_t *final, int flags,
                                  char *err);
void pe_ll_free(pe_ll_t *ll);
