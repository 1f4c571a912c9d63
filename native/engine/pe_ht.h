// Index maps of a high-throughput dispatch on the CPU: which rows go where, each in one pass
// instead of a handful of small tensor operations per call.
#pragma once

#include <stdint.h>

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
