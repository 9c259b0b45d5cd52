// AQLM kernel that decodes each group's codeword sum (8 floats, one vector) and multiply-adds it
// with x. It serves codebooks wider than 8 bits (1x16: 65536 codewords, no tables possible) and
// layers with few output rows, where the lookup tables (256 codewords per group and codebook)
// cost more than they save.

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>

#include "aqlm_lut.h"

namespace nibble {
namespace {

constexpr int64_t kMinWorkPerThread = 100000;  // codeword loads, about 30 µs

// Rows [r0, r1) and columns [c0, c0 + NC) of y. Two accumulators per column (even and odd
// groups) keep two multiply-add chains in flight.
template <int M, int NC, class Code>
void decode_rows(const AqlmArgs& p, int64_t c0, int64_t r0, int64_t r1) {
  constexpr int K = kBlockGroups * M;
  const int64_t book_size = p.codebook_size;
  const int64_t in = p.num_groups * kDecodeGroup;
  const float* x[NC];
  for (int c = 0; c < NC; ++c) x[c] = p.x + (c0 + c) * in;
  for (int64_t o = r0; o < r1; ++o) {
    v8f even[NC], odd[NC];
    for (int c = 0; c < NC; ++c) even[c] = odd[c] = splat8(0.f);
    const Code* code = static_cast<const Code*>(p.codes) + o * K;
    for (int64_t j0 = 0; j0 < p.num_groups; j0 += kBlockGroups, code += p.out * K) {
      const int groups = int(std::min<int64_t>(kBlockGroups, p.num_groups - j0));
      int jj = 0;
      for (; jj + 1 < groups; jj += 2) {
        const v8f w0 = codeword_sum<M>(p.codebooks, book_size, code + jj * M);
        const v8f w1 = codeword_sum<M>(p.codebooks, book_size, code + (jj + 1) * M);
        for (int c = 0; c < NC; ++c) {
          even[c] += w0 * load8(x[c] + (j0 + jj) * kDecodeGroup);
          odd[c] += w1 * load8(x[c] + (j0 + jj + 1) * kDecodeGroup);
        }
      }
      if (jj < groups) {
        const v8f w = codeword_sum<M>(p.codebooks, book_size, code + jj * M);
        for (int c = 0; c < NC; ++c) even[c] += w * load8(x[c] + (j0 + jj) * kDecodeGroup);
      }
    }
    const float shift = p.bias ? p.bias[o] : 0.f;
    for (int c = 0; c < NC; ++c) p.y[(c0 + c) * p.out + o] = p.scales[o] * hsum8(even[c] + odd[c]) + shift;
  }
}

template <int M, class Code>
void decode_columns(const AqlmArgs& p, int64_t c0, int nc, int64_t r0, int64_t r1) {
  switch (nc) {
    case 1: return decode_rows<M, 1, Code>(p, c0, r0, r1);
    case 2: return decode_rows<M, 2, Code>(p, c0, r0, r1);
    case 3: return decode_rows<M, 3, Code>(p, c0, r0, r1);
    default: return decode_rows<M, 4, Code>(p, c0, r0, r1);
  }
}

template <int M>
void run_decode(const AqlmArgs& p) {
  const int64_t work = p.out * p.num_groups * M * std::min<int64_t>(p.batch, 4);
  const int threads = threads_for(work, kMinWorkPerThread, at::get_num_threads());
  const int64_t tile = std::max<int64_t>(8, p.out / (8 * threads));
  std::atomic<int64_t> next_row{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t r0; (r0 = next_row.fetch_add(tile)) < p.out;) {
      const int64_t r1 = std::min(p.out, r0 + tile);
      for (int64_t c0 = 0; c0 < p.batch; c0 += 4)
        if (p.codebook_size > 256)
          decode_columns<M, uint16_t>(p, c0, int(std::min<int64_t>(4, p.batch - c0)), r0, r1);
        else
          decode_columns<M, uint8_t>(p, c0, int(std::min<int64_t>(4, p.batch - c0)), r0, r1);
    }
  });
}

}  // namespace

void aqlm_decode_linear(const AqlmArgs& p) {
  switch (p.num_codebooks) {
    case 1: return run_decode<1>(p);
    case 2: return run_decode<2>(p);
    case 3: return run_decode<3>(p);
    case 4: return run_decode<4>(p);
  }
}

}  // namespace nibble
