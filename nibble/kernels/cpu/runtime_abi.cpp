// C entry points of nibble's CPU kernels for the C++ decode step (nibble/runtime). Two shapes of
// call (see nibble.runtime.linears.CKernel): split by inputs (`split`: each of `parts` concurrent
// calls adds up its share of the input features for every output; the runtime sums the parts), or
// split by outputs (`prepare` as `parts` concurrent calls filling a shared workspace, then
// `compute` on disjoint ranges of output rows). Built by nibble.runtime.native, without torch.
//
// AQLM Kx8 (nb_aqlm_*): split by inputs, a part being a range of (code block, output row) pairs;
// `ctx` is an AqlmArgs (kernels.h) whose x, batch and y fields are unused.
// Scalar 8-bit (nb_scalar8_*): bytes q[o, i] with a scale and a zero point per group of inputs;
// `prepare` sums x over each group, so that a group costs one integer-weight dot product.

#include <cstring>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "aqlm_lut.h"

namespace nibble {
namespace {

// Part `part` of `parts` of one AQLM layer for every input row: its share of the (code block,
// output row) pairs, taken in the blocked layout's order ([block][out][K]) so that a part's codes
// are one contiguous stream and the parts are equal to within one row, whatever the number of
// blocks. A block's tables are built just before its lookups, so they are still in L1 for every
// output row of the part; a block that two parts share is built by both. The bias goes in part 0.
template <int M, int G>
void split_rows(const AqlmArgs& p, const float* x, int64_t x_stride, int64_t rows, float* y, int64_t y_stride,
                int64_t part, int64_t parts) {
  constexpr int K = kBlockGroups * M;
  const int64_t total = p.num_blocks * p.out;
  const int64_t begin = total * part / parts, end = total * (part + 1) / parts;
  float* tables = scratch(size_t(rows) * K * kCodewords);
  const auto* codes = static_cast<const uint8_t*>(p.codes);
  for (int64_t r = 0; r < rows; ++r) std::fill(y + r * y_stride, y + r * y_stride + p.out, 0.f);
  for (int64_t block = begin / p.out; block * p.out < end; ++block) {
    const int64_t r0 = std::max(begin - block * p.out, int64_t(0));
    const int64_t r1 = std::min(end - block * p.out, p.out);
    for (int64_t r = 0; r < rows; ++r) {
      AqlmArgs row = p;
      row.x = x + r * x_stride;
      build_tables_1<M, G>(row, block, tables + r * K * kCodewords);
    }
    for (int64_t r = 0; r < rows; ++r)
      lookup_1<M>(tables + r * K * kCodewords, codes + block * p.out * K, r0, r1, y + r * y_stride);
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = y + r * y_stride;
    for (int64_t o = 0; o < p.out; ++o) yr[o] = p.scales[o] * yr[o] + (part == 0 && p.bias ? p.bias[o] : 0.f);
  }
}

template <int M>
void split_dispatch(const AqlmArgs& p, const float* x, int64_t x_stride, int64_t rows, float* y, int64_t y_stride,
                    int64_t part, int64_t parts) {
  if (p.group_size == 8)
    split_rows<M, 8>(p, x, x_stride, rows, y, y_stride, part, parts);
  else
    split_rows<M, 0>(p, x, x_stride, rows, y, y_stride, part, parts);
}

// 8 bytes widened to 8 floats (one vpmovzxbd + vcvtdq2ps on AVX2; gcc scalarises the generic form).
inline v8f load8_u8(const uint8_t* p) {
#if defined(__AVX2__)
  const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  v8f v;
  std::memcpy(&v, &f, sizeof v);
  return v;
#else
  typedef uint8_t v8u8 __attribute__((vector_size(8)));
  v8u8 q;
  std::memcpy(&q, p, sizeof q);
  return __builtin_convertvector(q, v8f);
#endif
}

// sum_i q[i] * x[i] over n inputs, n a multiple of 8.
inline float dot_u8(const uint8_t* q, const float* x, int64_t n) {
  v8f a0 = splat8(0.f), a1 = splat8(0.f);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    a0 += load8_u8(q + i) * load8(x + i);
    a1 += load8_u8(q + i + 8) * load8(x + i + 8);
  }
  if (i < n) a0 += load8_u8(q + i) * load8(x + i);
  return hsum8(a0 + a1);
}

}  // namespace

struct Scalar8Args {
  const uint8_t* q;   // [out, row_bytes]: q[o, i] at q + o * row_bytes + i
  int64_t row_bytes, in, out, group_size;  // group_size a multiple of 8 dividing in
  const float* scales;  // [out, in / group_size]
  const float* zeros;   // [out, in / group_size], in units of q
  const float* bias;    // [out] or null
};

}  // namespace nibble

extern "C" {

// At most this many parts (any number up to the layer's output rows works; each costs a buffer).
int64_t nb_aqlm_max_parts(const void* ctx) {
  return std::min<int64_t>(16, static_cast<const nibble::AqlmArgs*>(ctx)->out);
}

void nb_aqlm_split(void* ctx, const float* x, int64_t x_stride, int64_t rows, float* y, int64_t y_stride,
                   int64_t part, int64_t parts) {
  const auto& p = *static_cast<const nibble::AqlmArgs*>(ctx);
  switch (p.num_codebooks) {
    case 1: return nibble::split_dispatch<1>(p, x, x_stride, rows, y, y_stride, part, parts);
    case 2: return nibble::split_dispatch<2>(p, x, x_stride, rows, y, y_stride, part, parts);
    case 3: return nibble::split_dispatch<3>(p, x, x_stride, rows, y, y_stride, part, parts);
    case 4: return nibble::split_dispatch<4>(p, x, x_stride, rows, y, y_stride, part, parts);
  }
}

// Floats of workspace one input row needs: the sum of x over each group.
int64_t nb_scalar8_workspace_per_row(const void* ctx) {
  const auto& p = *static_cast<const nibble::Scalar8Args*>(ctx);
  return p.in / p.group_size;
}

void nb_scalar8_prepare(void* ctx, const float* x, int64_t x_stride, int64_t rows, float* workspace, int64_t part,
                        int64_t parts) {
  const auto& p = *static_cast<const nibble::Scalar8Args*>(ctx);
  const int64_t groups = p.in / p.group_size;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = groups * part / parts; g < groups * (part + 1) / parts; ++g) {
      const float* xg = x + r * x_stride + g * p.group_size;
      float total = 0.f;
      for (int64_t i = 0; i < p.group_size; ++i) total += xg[i];
      workspace[r * groups + g] = total;
    }
}

void nb_scalar8_compute(void* ctx, const float* x, int64_t x_stride, const float* workspace, float* y,
                        int64_t y_stride, int64_t rows, int64_t begin, int64_t end) {
  const auto& p = *static_cast<const nibble::Scalar8Args*>(ctx);
  const int64_t groups = p.in / p.group_size;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * x_stride;
    const float* sums = workspace + r * groups;
    for (int64_t o = begin; o < end; ++o) {
      const uint8_t* q = p.q + o * p.row_bytes;
      float total = p.bias ? p.bias[o] : 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t at = g * p.group_size;
        const float dot = nibble::dot_u8(q + at, xr + at, p.group_size);
        total += p.scales[o * groups + g] * (dot - p.zeros[o * groups + g] * sums[g]);
      }
      y[r * y_stride + o] = total;
    }
  }
}

}  // extern "C"
