// Portable SIMD vectors (GCC/Clang vector extensions): AVX2 or AVX-512 code under -march=native,
// plain SSE elsewhere. Plus an aligned, grow-only scratch buffer per thread.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace nibble {

typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v8i __attribute__((vector_size(32)));

template <int L> struct VecOf;
template <> struct VecOf<4> { using type = v4f; };
template <> struct VecOf<8> { using type = v8f; };

inline v8f load8(const float* p) { v8f v; std::memcpy(&v, p, sizeof v); return v; }
inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }
inline v8f splat8(float s) { return v8f{s, s, s, s, s, s, s, s}; }
inline float hsum8(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// The horizontal sums of four vectors, in order, as one vector (fewer shuffles than four hsum8).
inline v4f hsum8x4(v8f a, v8f b, v8f c, v8f d) {
#if defined(__AVX__)
  const __m256 ab = _mm256_hadd_ps(__m256(a), __m256(b));  // a01 a23 b01 b23 | a45 a67 b45 b67
  const __m256 cd = _mm256_hadd_ps(__m256(c), __m256(d));
  const __m256 abcd = _mm256_hadd_ps(ab, cd);  // a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7
  return v4f(_mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
#else
  return v4f{hsum8(a), hsum8(b), hsum8(c), hsum8(d)};
#endif
}

template <class V> inline V splat(float s) {
  V v;
  for (unsigned i = 0; i < sizeof(V) / sizeof(float); ++i) v[i] = s;
  return v;
}

// Threads worth using for `work` units when one thread should get at least `min_work` of them
// (at most torch's thread count). Waking a second thread costs microseconds on an idle machine
// and up to a scheduler time slice on a busy one, so small calls stay on the calling thread.
inline int threads_for(int64_t work, int64_t min_work, int max_threads) {
  const int64_t wanted = work / std::max<int64_t>(1, min_work);
  return int(std::max<int64_t>(1, std::min<int64_t>(max_threads, wanted)));
}

// `n` floats of this thread's scratch buffer, 64-byte aligned; `slot` picks one of a few buffers.
inline float* scratch(size_t n, int slot = 0) {
  thread_local std::vector<float> buffers[2];
  std::vector<float>& buf = buffers[slot];
  if (buf.size() < n + 16) buf.resize(n + 16);
  auto address = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<float*>((address + 63) & ~uintptr_t(63));
}

}  // namespace nibble
