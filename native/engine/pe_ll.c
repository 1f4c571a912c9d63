// Routing of a low-latency dispatch on the CPU: which (token, k) selections go to which rank, and
// where the rows a rank receives land in its expert-major output. Counting sorts, one pass each,
// instead of a handful of sorts and gathers per call.
#include "pe_ll.h"

#include <stdlib.h>
#include <string.h>

int64_t pe_ll_route(const int64_t *topk_idx, int64_t tokens, int topk, int num_experts, int num_ranks,
                    const uint8_t *masked, int64_t *token, int64_t *k, int32_t *counts) {
  const int local = num_experts / num_ranks;
  int64_t *cursor = calloc((size_t)num_experts + 1, sizeof *cursor);
  if (cursor == NULL) return -1;
  memset(counts, 0, (size_t)num_experts * sizeof *counts);
  for (int64_t i = 0; i < tokens * topk; ++i) {
    const int64_t e = topk_idx[i];
    if (e >= 0 && e < num_experts && !(masked && masked[e / local])) counts[e]++;
  }
  int64_t total = 0;
  for (int e = 0; e < num_experts; ++e) {  // experts in order: (rank, local expert) order
    cursor[e] = total;
    total += counts[e];
  }
  for (int64_t t = 0; t < tokens; ++t) {  // tokens in order: each expert's selections in token order
    for (int j = 0; j < topk; ++j) {
      const int64_t e = topk_idx[t * topk + j];
      if (e < 0 || e >= num_experts || (masked && masked[e / local])) continue;
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
