// Routing of a low-latency dispatch on the CPU (see pe_ll.c).
#pragma once

#include <stdint.h>

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
