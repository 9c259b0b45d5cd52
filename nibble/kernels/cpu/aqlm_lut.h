// The cores of the AQLM kernels shared by the torch ops (aqlm_lut.cpp, aqlm_decode.cpp) and the C
// entry points of the decode runtime (runtime_abi.cpp): one column of the Kx8 lookup-table kernel,
// the codeword sum of the decoding kernel, and the rule that picks between them. No torch
// headers, no threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels.h"
#include "simd.h"

namespace nibble {

constexpr int kCodewords = 256;
constexpr int kDecodeGroup = 8;  // input group size of the decoding kernels: one 8-float vector

// Decoding beats lookup tables for codebooks wider than 8 bits (no tables possible) and when few
// rows would share the tables: measured on Zen 3 with 2 codebooks, the two break even near 600
// rows in the torch op and ~850 in the decode runtime's entry points.
inline bool aqlm_decode_preferred(const AqlmArgs& p) {
  return p.group_size == kDecodeGroup && (p.codebook_size > kCodewords || p.out < 320 * p.num_codebooks);
}

// The sum of the M codewords of one group: 8 floats.
template <int M, class Code>
inline v8f codeword_sum(const float* books, int64_t book_size, const Code* code) {
  v8f w = load8(books + int64_t(code[0]) * kDecodeGroup);
#pragma GCC unroll 4
  for (int m = 1; m < M; ++m) w += load8(books + (m * book_size + code[m]) * kDecodeGroup);
  return w;
}

// One column: table k holds <x_j, codebook_m[c]> for c in 0..255, vectorised over c.
// G > 0 fixes the group size at compile time (the common g = 8), G == 0 reads it from p.
template <int M, int G>
inline void build_tables_1(const AqlmArgs& p, int64_t block, float* tables) {
  const int g = G > 0 ? G : p.group_size;
  for (int k = 0; k < kBlockGroups * M; ++k) {
    const int64_t j = block * kBlockGroups + k / M;
    float* t = tables + k * kCodewords;
    if (j >= p.num_groups) {
      std::fill(t, t + kCodewords, 0.f);
      continue;
    }
    const float* xj = p.x + j * g;
    const float* book = p.codebooks_t + int64_t(k % M) * g * kCodewords;
    // four independent accumulators (32 codewords) per pass: the FMA chains overlap
    for (int c = 0; c < kCodewords; c += 32) {
      v8f a0 = splat8(0.f), a1 = a0, a2 = a0, a3 = a0;
#pragma GCC unroll 8
      for (int i = 0; i < g; ++i) {
        const v8f xi = splat8(xj[i]);
        const float* row = book + i * kCodewords + c;
        a0 += xi * load8(row);
        a1 += xi * load8(row + 8);
        a2 += xi * load8(row + 16);
        a3 += xi * load8(row + 24);
      }
      store8(t + c, a0);
      store8(t + c + 8, a1);
      store8(t + c + 16, a2);
      store8(t + c + 24, a3);
    }
  }
}

// One column: acc[o] += sum_k tables[k][code[o][k]] for rows [r0, r1) of one block. The code
// bytes are read 8 at a time as one 64-bit word and cut out with shifts: one load per 8 lookups
// instead of one per lookup leaves the load ports to the table reads (~10% faster on Zen 3 than
// loading every byte, and faster than AVX2 gathers, which cost more per lookup on this CPU).
template <int M>
inline void lookup_1(const float* tables, const uint8_t* codes, int64_t r0, int64_t r1, float* acc) {
  constexpr int K = kBlockGroups * M;  // code bytes per row and block: a multiple of 8
  const uint8_t* c = codes + r0 * K;
  for (int64_t o = r0; o < r1; ++o, c += K) {
    float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma GCC unroll 4
    for (int k = 0; k < K; k += 8) {
      uint64_t word;
      std::memcpy(&word, c + k, 8);
      const float* t = tables + k * kCodewords;
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) s[i % 4] += t[i * kCodewords + ((word >> (8 * i)) & 0xff)];
    }
    acc[o] += (s[0] + s[1]) + (s[2] + s[3]);
  }
}

}  // namespace nibble
