// Routing layout: counts per rank, node and expert, and which ranks each token goes to.
// Same results as native/cpu.py dispatch_layout (integers: bit-exact).
#include "portep_port.h"

// One thread per token (grid-stride). Counts go to shared-memory histograms first, then one global
// atomic per bin per block. The caller zeroes the four outputs and gives
// (num_experts + num_ranks + num_nodes) * 4 bytes of dynamic shared memory.
extern "C" __global__ void portep_dispatch_layout(const portep_i64* __restrict__ topk_idx, int num_tokens,
                                                  int num_topk, int num_experts, int num_ranks, int ranks_per_node,
                                                  int* __restrict__ tokens_per_rank, int* __restrict__ tokens_per_node,
                                                  int* __restrict__ tokens_per_expert,
                                                  portep_u8* __restrict__ is_token_in_rank) {
  extern __shared__ int histogram[];
  const int num_nodes = num_ranks / ranks_per_node;
  const int bins = num_experts + num_ranks + num_nodes;
  int* per_expert = histogram;
  int* per_rank = histogram + num_experts;
  int* per_node = per_rank + num_ranks;
  for (int i = threadIdx.x; i < bins; i += blockDim.x) histogram[i] = 0;
  __syncthreads();

  const portep_i64 experts_per_rank = num_experts / num_ranks;
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < num_tokens; t += gridDim.x * blockDim.x) {
    const portep_i64* row = topk_idx + (portep_i64)t * num_topk;
    portep_u8* in_rank = is_token_in_rank + (portep_i64)t * num_ranks;
    for (int k = 0; k < num_topk; ++k) {
      const portep_i64 expert = row[k];
      if (expert < 0) continue;
      atomicAdd(&per_expert[expert], 1);
      const int rank = (int)(expert / experts_per_rank);
      bool rank_seen = false, node_seen = false;  // an earlier selection of this token already counted it
      for (int j = 0; j < k; ++j) {
        if (row[j] < 0) continue;
        const int other = (int)(row[j] / experts_per_rank);
        rank_seen |= other == rank;
        node_seen |= other / ranks_per_node == rank / ranks_per_node;
      }
      if (!rank_seen) {
        atomicAdd(&per_rank[rank], 1);
        in_rank[rank] = 1;
      }
      if (!node_seen) atomicAdd(&per_node[rank / ranks_per_node], 1);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < bins; i += blockDim.x) {
    const int count = histogram[i];
    if (count == 0) continue;
    if (i < num_experts) {
      atomicAdd(&tokens_per_expert[i], count);
    } else if (i < num_experts + num_ranks) {
      atomicAdd(&tokens_per_rank[i - num_experts], count);
    } else {
      atomicAdd(&tokens_per_node[i - num_experts - num_ranks], count);
    }
  }
}
