// C entry points of nibble's CPU kernels for the C++ decode step (nibble/runtime). Two shapes of
// call (see nibble.runtime.linears.CKernel): split by inputs (`split`: each of `parts` concurrent
// calls adds up its share of the input features for every output; the runtime sums the parts), or
// split by outputs (`prepare` as `parts` concurrent calls filling a shared workspace, then
// `compute` on disjoint ranges of output rows). Built by nibble.runtime.native, without torch.
//
// AQLM Kx8 (nb_aqlm_*): split by inputs, a part being a range of (code block, output row) pairs;
// `ctx` is an AqlmArgs (kernels.h) whose x, batch and y fields are unused.
// Scalar 8- and 4-bit (nb_scalar_*): codes q[o, i] (bytes, or two per byte with even i in the low
// nibble: the packing of nibble.formats.packing) with a scale and a zero point per group of
// inputs; `prepare` sums x over each group and rounds x to 14-bit integers (one scale per input
// row), so that a group costs one integer dot product (x's rounding error is at most
// max|x| / 16382 per input, far below the weights' own error).

#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "aqlm_lut.h"

namespace nibble {
namespace {

// Rows [r0, r1) of one block of 8-wide groups, by decoding: each group's weights are the sum of its
// M codewords, multiplied with x's group (held in registers for the whole block). Rows go four at
// a time, their horizontal sums taken together.
template <int M>
inline void decode_block_8(const AqlmArgs& p, const float* x, int64_t block, const uint8_t* codes, int64_t r0,
                           int64_t r1, float* acc) {
  constexpr int K = kBlockGroups * M;
  v8f xs[kBlockGroups];
  for (int j = 0; j < kBlockGroups; ++j) {
    const int64_t group = block * kBlockGroups + j;
    xs[j] = group < p.num_groups ? load8(x + group * kDecodeGroup) : splat8(0.f);
  }
  const auto row = [&](int64_t o) {
    const uint8_t* c = codes + o * K;
    v8f even = splat8(0.f), odd = splat8(0.f);
#pragma GCC unroll 8
    for (int j = 0; j < kBlockGroups; ++j) {
      const v8f w = codeword_sum<M>(p.codebooks, kCodewords, c + j * M);
      if (j % 2) odd += w * xs[j]; else even += w * xs[j];
    }
    return even + odd;
  };
  int64_t o = r0;
  for (; o + 4 <= r1; o += 4) {
    const v8f a = row(o), b = row(o + 1), c = row(o + 2), d = row(o + 3);
    v4f sums;
    std::memcpy(&sums, acc + o, sizeof sums);
    sums += hsum8x4(a, b, c, d);
    std::memcpy(acc + o, &sums, sizeof sums);
  }
  for (; o < r1; ++o) acc[o] += hsum8(row(o));
}

// Part `part` of `parts` of one AQLM layer for every input row: its share of the (code block,
// output row) pairs, taken in the blocked layout's order ([block][out][K]) so that a part's codes
// are one contiguous stream and the parts are equal to within one row, whatever the number of
// blocks. A block's tables are built just before its lookups, so they are still in L1 for every
// output row of the part; a block that two parts share is built by both. Small layers decode their
// weights instead (aqlm_decode_preferred). The bias goes in part 0.
template <int M, int G>
void split_rows(const AqlmArgs& p, const float* x, int64_t x_stride, int64_t rows, float* y, int64_t y_stride,
                int64_t part, int64_t parts) {
  constexpr int K = kBlockGroups * M;
  const int64_t total = p.num_blocks * p.out;
  const int64_t begin = total * part / parts, end = total * (part + 1) / parts;
  const bool decode = aqlm_decode_preferred(p);
  float* tables = decode ? nullptr : scratch(size_t(rows) * K * kCodewords);
  const auto* codes = static_cast<const uint8_t*>(p.codes);
  for (int64_t r = 0; r < rows; ++r) std::fill(y + r * y_stride, y + r * y_stride + p.out, 0.f);
  for (int64_t block = begin / p.out; block * p.out < end; ++block) {
    const int64_t r0 = std::max(begin - block * p.out, int64_t(0));
    const int64_t r1 = std::min(end - block * p.out, p.out);
    if (decode) {
      for (int64_t r = 0; r < rows; ++r)
        decode_block_8<M>(p, x + r * x_stride, block, codes + block * p.out * K, r0, r1, y + r * y_stride);
      continue;
    }
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

// x as 14-bit integers: |x_q| <= 8191, so a pair of (at most 8-bit) code x int16 products is at
// most 4.2e6 and an int32 lane can take kMaxSteps of them before it is moved to float.
constexpr int kXBits = 14;
constexpr int64_t kMaxSteps = 256;  // vpmaddwd steps per int32 partial sum

// Inputs per vector step: 16 bytes of codes widened to 16 int16 lanes (8 bits), or 16 bytes of
// nibble pairs, the low and the high nibbles each widened to 16 lanes (4 bits).
template <int BITS>
constexpr int64_t kStep = BITS == 8 ? 16 : 32;

// Code i of a row: byte i (8 bits), or nibble i of the little-endian bit stream (4 bits).
template <int BITS>
inline int32_t code_at(const uint8_t* q, int64_t i) {
  return BITS == 8 ? q[i] : (q[i / 2] >> (4 * (i & 1))) & 0x0f;
}

// Where input i's int16 value goes: in order for 8-bit codes; for 4-bit ones deinterleaved per 32
// inputs (the 16 even ones, then the 16 odd ones), so that the low and the high nibbles of 16
// bytes each meet 16 contiguous x values.
inline int64_t x_slot(int bits, int64_t i) {
  return bits == 8 ? i : (i & ~int64_t(31)) + (i & 1) * 16 + ((i & 31) >> 1);
}

// sum of code * x_q over inputs [from, to), one at a time (tails and non-AVX2 builds).
template <int BITS>
inline int64_t dot_scalar(const uint8_t* q, const int16_t* x, int64_t from, int64_t to) {
  int64_t total = 0;
  for (int64_t i = from; i < to; ++i) total += int64_t(code_at<BITS>(q, i)) * x[x_slot(BITS, i)];
  return total;
}

#if defined(__AVX2__)
// The same over inputs [from, from + n), n a multiple of kStep and at most kMaxSteps steps, as
// eight int32 lanes: one vpmaddwd per 16 codes.
template <int BITS>
inline __m256i dot_lanes(const uint8_t* q, const int16_t* x, int64_t from, int64_t n) {
  __m256i acc = _mm256_setzero_si256();
  for (int64_t i = from; i < from + n; i += kStep<BITS>) {
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
    if constexpr (BITS == 8) {
      const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i)));
      acc = _mm256_add_epi32(acc, _mm256_madd_epi16(w, x0));
    } else {
      const __m128i nibble = _mm_set1_epi8(0x0f);
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i / 2));
      const __m256i even = _mm256_cvtepu8_epi16(_mm_and_si128(bytes, nibble));
      const __m256i odd = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble));
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i + 16));
      acc = _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(even, x0), _mm256_madd_epi16(odd, x1)));
    }
  }
  return acc;
}
#endif

}  // namespace

struct ScalarArgs {
  const uint8_t* q;   // [out, row_bytes]: q[o, i] in byte i (8 bits) or i / 2 (4 bits) of row o
  int64_t row_bytes, in, out, group_size;  // group_size dividing in, a multiple of 8 (8 bits) or 32 (4 bits)
  int64_t bits;  // 8 or 4
  const float* scales;  // [out, in / group_size]
  const float* zeros;   // [out, in / group_size], in units of q
  const float* bias;    // [out] or null
};

// Per input row, after the group sums in the workspace: one scale S (max|x| / 8191) and x / S
// rounded to int16.
struct QuantizedRow {
  float* scale;
  int16_t* values;
};

inline QuantizedRow quantized_row(const ScalarArgs& p, float* workspace_row) {
  float* scale = workspace_row + p.in / p.group_size;
  return {scale, reinterpret_cast<int16_t*>(scale + 1)};
}

// Output rows [begin, end) of every input row, from the workspace that prepare filled.
// Output rows [begin, end) of every input row, from the workspace that prepare filled:
// y[o] = S * sum_g s_g (sum q x_q) - sum_g s_g z_g (sum x) + bias, the integer sums of each group
// scaled into eight float lanes that are added up once per output.
template <int BITS>
void scalar_rows(const ScalarArgs& p, const float* workspace, int64_t per_row, float* y, int64_t y_stride,
                 int64_t rows, int64_t begin, int64_t end) {
  const int64_t groups = p.in / p.group_size;
  for (int64_t r = 0; r < rows; ++r) {
    const float* sums = workspace + r * per_row;
    const QuantizedRow row = quantized_row(p, const_cast<float*>(sums));
    for (int64_t o = begin; o < end; ++o) {
      const uint8_t* q = p.q + o * p.row_bytes;
      const float* scales = p.scales + o * groups;
      const float* zeros = p.zeros + o * groups;
      float integer_part = 0.f, zero_part = 0.f;
#if defined(__AVX2__)
      __m256 lanes = _mm256_setzero_ps();
#endif
      for (int64_t g = 0; g < groups; ++g) {
        zero_part += scales[g] * zeros[g] * sums[g];
        int64_t i = g * p.group_size;
        const int64_t stop = i + p.group_size;
#if defined(__AVX2__)
        while (stop - i >= kStep<BITS>) {
          const int64_t n = std::min((stop - i) / kStep<BITS>, kMaxSteps) * kStep<BITS>;
          const __m256 products = _mm256_cvtepi32_ps(dot_lanes<BITS>(q, row.values, i, n));
          lanes = _mm256_fmadd_ps(products, _mm256_set1_ps(scales[g]), lanes);
          i += n;
        }
#endif
        if (i < stop) integer_part += scales[g] * float(dot_scalar<BITS>(q, row.values, i, stop));
      }
#if defined(__AVX2__)
      integer_part += hsum8(v8f(lanes));
#endif
      y[r * y_stride + o] = *row.scale * integer_part - zero_part + (p.bias ? p.bias[o] : 0.f);
    }
  }
}

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

// Workspace of one input row: the sum of x over each group, x's scale, then x as int16 values.
int64_t nb_scalar_workspace_per_row(const void* ctx) {
  const auto& p = *static_cast<const nibble::ScalarArgs*>(ctx);
  return p.in / p.group_size + 1 + (p.in + 1) / 2;
}

// Each part sums x over its groups and rounds its groups' x to int16 with the row's scale (every
// part finds the same max|x|, so the parts agree).
void nb_scalar_prepare(void* ctx, const float* x, int64_t x_stride, int64_t rows, float* workspace, int64_t part,
                       int64_t parts) {
  const auto& p = *static_cast<const nibble::ScalarArgs*>(ctx);
  const int64_t groups = p.in / p.group_size;
  const int64_t per_row = nb_scalar_workspace_per_row(ctx);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * x_stride;
    float amax = 0.f;
    for (int64_t i = 0; i < p.in; ++i) amax = std::max(amax, std::fabs(xr[i]));
    const nibble::QuantizedRow row = nibble::quantized_row(p, workspace + r * per_row);
    *row.scale = amax > 0.f ? amax / float((1 << (nibble::kXBits - 1)) - 1) : 1.f;
    const float inverse = 1.f / *row.scale;
    for (int64_t g = groups * part / parts; g < groups * (part + 1) / parts; ++g) {
      float total = 0.f;
      for (int64_t i = g * p.group_size; i < (g + 1) * p.group_size; ++i) {
        total += xr[i];
        row.values[nibble::x_slot(int(p.bits), i)] = static_cast<int16_t>(std::lrint(xr[i] * inverse));
      }
      workspace[r * per_row + g] = total;
    }
  }
}

// y = sum_g s_g (S * sum q x_q - z_g sum x): the integer dot products take x as int16 (x_q = x / S).
void nb_scalar_compute(void* ctx, const float* /*x*/, int64_t /*x_stride*/, const float* workspace, float* y,
                       int64_t y_stride, int64_t rows, int64_t begin, int64_t end) {
  const auto& p = *static_cast<const nibble::ScalarArgs*>(ctx);
  if (p.bits == 8)
    nibble::scalar_rows<8>(p, workspace, nb_scalar_workspace_per_row(ctx), y, y_stride, rows, begin, end);
  else
    nibble::scalar_rows<4>(p, workspace, nb_scalar_workspace_per_row(ctx), y, y_stride, rows, begin, end);
}

}  // extern "C"
