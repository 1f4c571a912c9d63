// Index maps of a high-throughput dispatch on the CPU (see pe_ht.h).
#include "pe_ht.h"

#include <string.h>

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
