// Scalar (RTN/GPTQ) 4- and 2-bit kernel: unpack each int32 word into 8 lanes with variable
// shifts, convert to float and multiply-add with x. Per group and column,
//   sum_i s*(q_i - z)*x_i = s*(sum_i q_i*x_i) - s*z*(sum_i x_i),
// so the zero point costs one multiply-add per group with precomputed group sums of x.
// Threads share out tiles of output rows; columns go 4 at a time, sharing one unpack of the weights.

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>

#include "kernels.h"
#include "simd.h"

namespace nibble {
namespace {

constexpr int64_t kMinWordsPerThread = 30000;  // words unpacked, about 30 µs

struct Scalar {
  const float* x;  // [batch, in]
  int64_t in;
  const int32_t* packed;
  int64_t words_per_row, out;
  const float *scales, *zeros;
  int64_t group_size;
  const float* bias;
  float* y;           // [batch, out]
  const float* xsum;  // [batch, groups]: sums of x per group
};

// The `lanes_per_word / 8` vectors of 8 integer values packed in one word.
template <int BITS>
inline void unpack(int32_t word, v8f* q) {
  constexpr int per_word = 32 / BITS;
  const v8i w = {word, word, word, word, word, word, word, word};
  const v8i mask = {(1 << BITS) - 1, (1 << BITS) - 1, (1 << BITS) - 1, (1 << BITS) - 1,
                    (1 << BITS) - 1, (1 << BITS) - 1, (1 << BITS) - 1, (1 << BITS) - 1};
  for (int h = 0; h < per_word / 8; ++h) {
    v8i shift;
    for (int l = 0; l < 8; ++l) shift[l] = (h * 8 + l) * BITS;
    q[h] = __builtin_convertvector((w >> shift) & mask, v8f);
  }
}

// dot[c][u] += (values of word w) · x[c][first..]: the word's values against their inputs.
template <int BITS, int NC>
inline void word_dot(int32_t w, const float* const* x, int64_t first, v8f* dot) {
  constexpr int vecs = 32 / BITS / 8;
  v8f q[vecs];
  unpack<BITS>(w, q);
  for (int h = 0; h < vecs; ++h)
    for (int c = 0; c < NC; ++c) dot[c] += q[h] * load8(x[c] + first + h * 8);
}

// Rows [r0, r1), columns [c0, c0 + NC). Words go 4 at a time into 4 accumulators per column, so
// that 4 multiply-add chains run side by side.
template <int BITS, int NC>
void rows(const Scalar& p, int64_t c0, int64_t r0, int64_t r1) {
  constexpr int per_word = 32 / BITS;
  const int64_t groups = p.in / p.group_size, words_per_group = p.group_size / per_word;
  const float* x[NC];
  for (int c = 0; c < NC; ++c) x[c] = p.x + (c0 + c) * p.in;
  for (int64_t o = r0; o < r1; ++o) {
    const int32_t* w = p.packed + o * p.words_per_row;
    v8f total[NC];
    float offset[NC];
    for (int c = 0; c < NC; ++c) total[c] = splat8(0.f), offset[c] = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      v8f dot[4][NC];
      for (int u = 0; u < 4; ++u)
        for (int c = 0; c < NC; ++c) dot[u][c] = splat8(0.f);
      int64_t k = g * words_per_group;
      const int64_t end = k + words_per_group;
      for (; k + 3 < end; k += 4)
        for (int u = 0; u < 4; ++u) word_dot<BITS, NC>(w[k + u], x, (k + u) * per_word, dot[u]);
      for (; k < end; ++k) word_dot<BITS, NC>(w[k], x, k * per_word, dot[0]);
      const float s = p.scales[o * groups + g];
      const float sz = s * (p.zeros ? p.zeros[o * groups + g] : float(1 << (BITS - 1)));
      for (int c = 0; c < NC; ++c) {
        total[c] += splat8(s) * ((dot[0][c] + dot[1][c]) + (dot[2][c] + dot[3][c]));
        offset[c] += sz * p.xsum[(c0 + c) * groups + g];
      }
    }
    const float shift = p.bias ? p.bias[o] : 0.f;
    for (int c = 0; c < NC; ++c) p.y[(c0 + c) * p.out + o] = hsum8(total[c]) - offset[c] + shift;
  }
}

template <int BITS>
void run_columns(const Scalar& p, int64_t c0, int nc, int64_t r0, int64_t r1) {
  switch (nc) {
    case 1: return rows<BITS, 1>(p, c0, r0, r1);
    case 2: return rows<BITS, 2>(p, c0, r0, r1);
    case 3: return rows<BITS, 3>(p, c0, r0, r1);
    default: return rows<BITS, 4>(p, c0, r0, r1);
  }
}

}  // namespace

void scalar_linear(const float* x, int64_t batch, int64_t in, const int32_t* packed,
                   int64_t words_per_row, int64_t out, const float* scales, const float* zeros,
                   int bits, int64_t group_size, const float* bias, float* y) {
  const int64_t groups = in / group_size;
  float* xsum = scratch(size_t(batch * groups), 1);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.f;
      for (int64_t i = 0; i < group_size; ++i) s += x[b * in + g * group_size + i];
      xsum[b * groups + g] = s;
    }
  const Scalar p{x, in, packed, words_per_row, out, scales, zeros, group_size, bias, y, xsum};
  // Tiles of rows are handed out through an atomic counter: a thread the OS delays takes fewer.
  const int64_t words = out * (in * bits / 32) * std::min<int64_t>(batch, 4);
  const int threads = threads_for(words, kMinWordsPerThread, at::get_num_threads());
  const int64_t tile = std::max<int64_t>(16, out / (8 * threads));
  std::atomic<int64_t> next_row{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t r0; (r0 = next_row.fetch_add(tile)) < out;) {
      const int64_t r1 = std::min(out, r0 + tile);
      for (int64_t c0 = 0; c0 < batch; c0 += 4) {
        const int nc = int(std::min<int64_t>(4, batch - c0));
        if (bits == 4)
          run_columns<4>(p, c0, nc, r0, r1);
        else
          run_columns<2>(p, c0, nc, r0, r1);
      }
    }
  });
}

}  // namespace nibble
