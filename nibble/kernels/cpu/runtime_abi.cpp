// C entry points of nibble's CPU kernels for the C++ decode step (nibble/runtime): per call,
// `prepare` runs as `parts` concurrent calls (each `part` fills its share of the workspace), then
// `compute` runs on several threads at once, each on its own range of output rows. Built by
// nibble.runtime.native, without torch.
//
// AQLM Kx8 (nb_aqlm_*): `prepare` builds every lookup table of each input row; `ctx` is an
// AqlmArgs (kernels.h) whose x, batch and y fields are unused.
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

int64_t table_floats(const AqlmArgs& p) { return p.num_blocks * kBlockGroups * p.num_codebooks * kCodewords; }

// Part `part` of `parts` builds the tables of its share of the code blocks, for every row.
template <int M, int G>
void prepare_rows(const AqlmArgs& p, const float* x, int64_t x_stride, int64_t rows, float* workspace,
                  int64_t part, int64_t parts) {
  constexpr int K = kBlockGroups * M;
  const int64_t per_row = table_floats(p);
  const int64_t first = p.num_blocks * part / parts, last = p.num_blocks * (part + 1) / parts;
  for (int64_t r = 0; r < rows; ++r) {
    AqlmArgs row = p;
    row.x = x + r * x_stride;
    for (int64_t block = first; block < last; ++block)
      build_tables_1<M, G>(row, block, workspace + r * per_row + block * K * kCodewords);
  }
}

template <int M>
void compute_rows(const AqlmArgs& p, const float* workspace, float* y, int64_t y_stride, int64_t rows,
                  int64_t begin, int64_t end) {
  constexpr int K = kBlockGroups * M;
  const int64_t per_row = table_floats(p);
  thread_local std::vector<float> acc;
  const auto* codes = static_cast<const uint8_t*>(p.codes);
  for (int64_t r = 0; r < rows; ++r) {
    acc.assign(end - begin, 0.f);
    const float* tables = workspace + r * per_row;
    for (int64_t block = 0; block < p.num_blocks; ++block)
      lookup_1<M>(tables + block * K * kCodewords, codes + (block * p.out + begin) * K, 0, end - begin,
                  acc.data());
    float* yr = y + r * y_stride;
    for (int64_t o = begin; o < end; ++o) yr[o] = p.scales[o] * acc[o - begin] + (p.bias ? p.bias[o] : 0.f);
  }
}

template <int M>
void prepare_dispatch(const AqlmArgs& p, const float* x, int64_t x_stride, int64_t rows, float* workspace,
                      int64_t part, int64_t parts) {
  if (p.group_size == 8)
    prepare_rows<M, 8>(p, x, x_stride, rows, workspace, part, parts);
  else
    prepare_rows<M, 0>(p, x, x_stride, rows, workspace, part, parts);
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

int64_t nb_aqlm_abi_version() { return 1; }

// Floats of workspace one input row needs: K tables of 256 entries per block of 8 groups.
int64_t nb_aqlm_workspace_per_row(const void* ctx) {
  return nibble::table_floats(*static_cast<const nibble::AqlmArgs*>(ctx));
}

void nb_aqlm_prepare(void* ctx, const float* x, int64_t x_stride, int64_t rows, float* workspace, int64_t part,
                     int64_t parts) {
  const auto& p = *static_cast<const nibble::AqlmArgs*>(ctx);
  switch (p.num_codebooks) {
    case 1: return nibble::prepare_dispatch<1>(p, x, x_stride, rows, workspace, part, parts);
    case 2: return nibble::prepare_dispatch<2>(p, x, x_stride, rows, workspace, part, parts);
    case 3: return nibble::prepare_dispatch<3>(p, x, x_stride, rows, workspace, part, parts);
    case 4: return nibble::prepare_dispatch<4>(p, x, x_stride, rows, workspace, part, parts);
  }
}

void nb_aqlm_compute(void* ctx, const float* /*x*/, int64_t /*x_stride*/, const float* workspace, float* y,
                     int64_t y_stride, int64_t rows, int64_t begin, int64_t end) {
  const auto& p = *static_cast<const nibble::AqlmArgs*>(ctx);
  switch (p.num_codebooks) {
    case 1: return nibble::compute_rows<1>(p, workspace, y, y_stride, rows, begin, end);
    case 2: return nibble::compute_rows<2>(p, workspace, y, y_stride, rows, begin, end);
    case 3: return nibble::compute_rows<3>(p, workspace, y, y_stride, rows, begin, end);
    case 4: return nibble::compute_rows<4>(p, workspace, y, y_stride, rows, begin, end);
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
