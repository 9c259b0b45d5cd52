// AQLM Kx8 kernel: lookup tables of <x_group, codeword>, summed by code.
//
// For a block of kBlockGroups input groups the kernel builds K = kBlockGroups*M tables of 256
// entries (table k = group k/M, codebook k%M), then walks the output rows of the block: each row
// holds K code bytes (blocked layout, contiguous per row), and its partial output is the sum of
// the K entries they pick. A batch of L columns (L = 4 or 8) is served by one lookup: the tables
// then hold an L-float vector per codeword.
//
// Threads share out the code blocks (each builds only the tables of its blocks and keeps private
// partial outputs, added up at the end); when there are too few blocks they split the output rows
// instead and every thread builds every table.

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>

#include "aqlm_lut.h"
#include "kernels.h"
#include "simd.h"

namespace nibble {
namespace {

constexpr int64_t kMinLookupsPerThread = 100000;  // about 30 µs of lookups

using Aqlm = AqlmArgs;

// ---- tables -------------------------------------------------------------------------------------

// L columns: entry (k, c) is the vector over columns of <x_j[col], codebook_m[c]>.
template <int M, int L, int G>
void build_tables_vec(const Aqlm& p, int cols, int64_t block, float* tables, float* xcols) {
  using V = typename VecOf<L>::type;
  const int g = G > 0 ? G : p.group_size;
  const int64_t in = p.num_groups * g;
  for (int jj = 0; jj < kBlockGroups; ++jj) {
    const int64_t j = block * kBlockGroups + jj;
    V* xv = reinterpret_cast<V*>(xcols);  // x_j transposed: g vectors of L columns
    for (int i = 0; i < g; ++i) {
      V v = splat<V>(0.f);
      if (j < p.num_groups)
        for (int b = 0; b < cols; ++b) v[b] = p.x[b * in + j * g + i];
      xv[i] = v;
    }
    for (int m = 0; m < M; ++m) {
      V* t = reinterpret_cast<V*>(tables) + (jj * M + m) * kCodewords;
      const float* book = p.codebooks + int64_t(m) * kCodewords * g;
      for (int c = 0; c < kCodewords; ++c) {
        V acc = splat<V>(0.f);
#pragma GCC unroll 8
        for (int i = 0; i < g; ++i) acc += book[c * g + i] * xv[i];
        t[c] = acc;
      }
    }
  }
}

// ---- lookups ------------------------------------------------------------------------------------

// L columns: as lookup_1 with vector entries. Rows are walked S tables at a time so that those
// tables (S * 256 * L floats = 32 KiB) stay in L1.
template <int M, int L>
void lookup_vec(const float* tables, const uint8_t* codes, int64_t r0, int64_t r1, float* acc) {
  using V = typename VecOf<L>::type;
  constexpr int K = kBlockGroups * M, S = 32 / L;
  V* a = reinterpret_cast<V*>(acc);
  for (int s = 0; s < K; s += S) {
    const V* t = reinterpret_cast<const V*>(tables) + s * kCodewords;
    const uint8_t* c = codes + r0 * K + s;
    for (int64_t o = r0; o < r1; ++o, c += K) {
      V a0 = a[o], a1 = splat<V>(0.f);
#pragma GCC unroll 8
      for (int i = 0; i < S; i += 2) {
        a0 += t[i * kCodewords + c[i]];
        a1 += t[(i + 1) * kCodewords + c[i + 1]];
      }
      a[o] = a0 + a1;
    }
  }
}

// ---- driver -------------------------------------------------------------------------------------

// y[b, o] = scales[o] * (sum of the partial outputs of all slots) + bias[o], for rows [o0, o1).
template <int L>
void finish_rows(const Aqlm& p, int cols, const float* acc, int slots, int64_t o0, int64_t o1) {
  const int64_t per_slot = p.out * L;
  for (int64_t o = o0; o < o1; ++o) {
    const float shift = p.bias ? p.bias[o] : 0.f;
    for (int b = 0; b < cols; ++b) {
      float sum = 0.f;
      for (int s = 0; s < slots; ++s) sum += acc[s * per_slot + o * L + b];
      p.y[b * p.out + o] = p.scales[o] * sum + shift;
    }
  }
}

// Columns [0, cols) of p.x (cols <= L) into rows of p.y; L == 1 is the scalar path; G as in
// build_tables_1.
// Blocks are handed out through an atomic counter, so a thread that the OS delays (the machine
// may be shared) takes fewer of them; the last thread to finish adds up the slots.
template <int M, int L, int G>
void run_chunk(const Aqlm& p, int cols) {
  constexpr int K = kBlockGroups * M;
  const int64_t lookups = p.out * p.num_blocks * K;
  const int threads = threads_for(lookups, kMinLookupsPerThread, at::get_num_threads());
  const bool by_blocks = p.num_blocks >= 4 * threads;
  const int slots = by_blocks ? threads : 1;
  const int64_t per_slot = p.out * L;
  float* acc = scratch(size_t(slots) * per_slot, 1);
  std::atomic<int64_t> next_block{0};
  std::atomic<int> finished{0};

  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    float* tables = scratch(size_t(K) * kCodewords * L + 64 * p.group_size);
    float* xcols = tables + K * kCodewords * L;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = by_blocks ? 0 : p.out * t / threads;
      const int64_t r1 = by_blocks ? p.out : p.out * (t + 1) / threads;
      float* a = acc + (by_blocks ? t : 0) * per_slot;
      std::fill(a + r0 * L, a + r1 * L, 0.f);
      for (int64_t i = 0;; ++i) {
        const int64_t block = by_blocks ? next_block.fetch_add(1) : i;
        if (block >= p.num_blocks) break;
        const uint8_t* codes = static_cast<const uint8_t*>(p.codes) + block * p.out * K;
        if constexpr (L == 1) {
          build_tables_1<M, G>(p, block, tables);
          lookup_1<M>(tables, codes, r0, r1, a);
        } else {
          build_tables_vec<M, L, G>(p, cols, block, tables, xcols);
          lookup_vec<M, L>(tables, codes, r0, r1, a);
        }
      }
      if (finished.fetch_add(1, std::memory_order_acq_rel) == threads - 1)
        finish_rows<L>(p, cols, acc, slots, 0, p.out);
    }
  });
}

template <int M, int G>
void run_columns(const Aqlm& p, int cols) {
  if (cols == 1)
    run_chunk<M, 1, G>(p, cols);
  else if (cols <= 4)
    run_chunk<M, 4, G>(p, cols);
  else
    run_chunk<M, 8, G>(p, cols);
}

template <int M>
void run(Aqlm p) {
  const int64_t in = p.num_groups * p.group_size;
  for (int64_t b0 = 0; b0 < p.batch; b0 += 8) {
    const int cols = int(std::min<int64_t>(8, p.batch - b0));
    Aqlm chunk = p;
    chunk.x = p.x + b0 * in;
    chunk.y = p.y + b0 * p.out;
    if (p.group_size == 8)
      run_columns<M, 8>(chunk, cols);
    else
      run_columns<M, 0>(chunk, cols);
  }
}

}  // namespace

void aqlm_lut_linear(const AqlmArgs& p) {
  switch (p.num_codebooks) {
    case 1: return run<1>(p);
    case 2: return run<2>(p);
    case 3: return run<3>(p);
    case 4: return run<4>(p);
  }
}

}  // namespace nibble
