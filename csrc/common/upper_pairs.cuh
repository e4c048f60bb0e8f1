// The upper-triangle entries (i, j), i <= j, of a d x d symmetric result, dealt round-robin to the threads of a block:
// shared by the CUDA kernels that reduce one symmetric (or Hermitian) matrix per block (jtj, mlp_metric, lse_kahler_metric).
#pragma once

namespace pygeo {

// Fills pair_i / pair_j with this thread's pairs (flat index p = threadIdx.x, + blockDim.x, ...), at most
// max_pairs of them, and returns how many.
__device__ inline int upper_pairs_of_thread(int d, int* pair_i, int* pair_j, int max_pairs) {
  const int n_pairs = d * (d + 1) / 2;
  int n_mine = 0;
  for (int p = threadIdx.x; p < n_pairs && n_mine < max_pairs; p += blockDim.x) {
    int i = 0, remaining = p;
    while (remaining >= d - i) {
      remaining -= d - i;
      ++i;
    }
    pair_i[n_mine] = i;
    pair_j[n_mine] = i + remaining;
    ++n_mine;
  }
  return n_mine;
}

}  // namespace pygeo
