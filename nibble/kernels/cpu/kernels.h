// Raw-pointer CPU kernels behind the nibble::* torch ops (see ops.cpp). No torch headers here,
// so each kernel file compiles quickly; threads come from at::parallel_for.
#pragma once

#include <cstdint>

namespace nibble {

// Input groups per block of the blocked AQLM code layout and of one lookup-table block.
constexpr int kBlockGroups = 8;

// AQLM: y[b, o] = scales[o] * sum_j sum_m <x[b, j*g:(j+1)*g], codebooks[m, codes(o, j, m)]> + bias[o].
struct AqlmArgs {
  const float* x;  // [batch, num_groups * group_size]
  int64_t batch, num_groups;
  int group_size, num_codebooks;  // num_codebooks (M) in 1..4
  // Blocked layout [num_blocks, out, kBlockGroups * M]: the codes of 8 consecutive groups
  // contiguous per row; groups past num_groups carry any code (their x is taken as zero).
  // uint8 when codebook_size is 256 (smaller codebooks zero-padded to it), else uint16.
  const void* codes;
  int64_t num_blocks, out;
  int codebook_size;         // 256, or up to 65536 (decoding only)
  const float* codebooks;    // [M, codebook_size, group_size]
  const float* codebooks_t;  // [M, group_size, 256] (8-bit codebooks only)
  const float* scales;       // [out]
  const float* bias;         // [out] or null
  float* y;                  // [batch, out]
};

// Lookup tables (aqlm_lut.cpp, 256 codewords) or decoding (aqlm_decode.cpp, groups of 8); which
// one: aqlm_decode_preferred (aqlm_lut.h).
void aqlm_lut_linear(const AqlmArgs& args);
void aqlm_decode_linear(const AqlmArgs& args);

// y[b, o] = sum_i s[o, i/gs] * (q[o, i] - z[o, i/gs]) * x[b, i] + bias[o], q packed as a
// little-endian bitstream of `bits`-bit values (bits 2 or 4) in int32 words along the input.
//   packed [out, words_per_row] int32;  scales, zeros [out, in/gs] float32 (zeros null: the
//   midpoint 2^(bits-1));  bias may be null
void scalar_linear(const float* x, int64_t batch, int64_t in, const int32_t* packed,
                   int64_t words_per_row, int64_t out, const float* scales, const float* zeros,
                   int bits, int64_t group_size, const float* bias, float* y);

}  // namespace nibble
