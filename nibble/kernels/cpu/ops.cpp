// torch ops wrapping the raw kernels: torch.ops.nibble_cpu.aqlm_lut_linear and
// torch.ops.nibble_cpu.scalar_linear (argument checks here, layouts prepared in Python).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "aqlm_lut.h"
#include "kernels.h"

namespace {

void check(const at::Tensor& t, at::ScalarType dtype, int64_t dim, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// float32, contiguous: the tensor itself when it already is.
at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

std::optional<at::Tensor> optional_float(const std::optional<at::Tensor>& t, int64_t numel, const char* name) {
  if (!t.has_value()) return std::nullopt;
  TORCH_CHECK(t->numel() == numel, name, " has ", t->numel(), " entries, expected ", numel);
  return as_float(*t);
}

const float* data_or_null(const std::optional<at::Tensor>& t) { return t ? t->data_ptr<float>() : nullptr; }

// x [..., in] of any float dtype as float32 [rows, in].
at::Tensor rows_of(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "x must be on the CPU");
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dimension");
  return as_float(x.reshape({-1, x.size(-1)}));
}

// y [rows, out] float32 back to x's leading dimensions and dtype.
at::Tensor shaped_like(const at::Tensor& y, const at::Tensor& x) {
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = y.size(1);
  return y.view(sizes).to(x.scalar_type());
}

// x [..., in] any float dtype; codes [blocks, out, 8*M] (blocked) u8 for 256 codewords, int16
// bit patterns for more; codebooks [M, C, g] f32; codebooks_t [M, g, 256] f32 (8-bit only, else
// empty); scales [out] and bias [out] any float dtype. y [..., out] like x.
// method: 0 picks, 1 forces lookup tables, 2 forces decoding (tests).
at::Tensor aqlm_lut_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebooks,
                           const at::Tensor& codebooks_t, const at::Tensor& scales,
                           const std::optional<at::Tensor>& bias, int64_t num_groups, int64_t method) {
  const at::Tensor x2 = rows_of(x);
  const bool wide = codes.scalar_type() == at::kShort;
  check(codes, wide ? at::kShort : at::kByte, 3, "codes");
  check(codebooks, at::kFloat, 3, "codebooks");
  const int64_t M = codebooks.size(0), C = codebooks.size(1), g = codebooks.size(2), out = codes.size(1);
  TORCH_CHECK(M >= 1 && M <= 4, "the CPU kernels take 1 to 4 codebooks, got ", M);
  TORCH_CHECK(wide ? C <= 65536 : C == 256, "codebooks of ", C, " codewords do not match ", codes.scalar_type(),
              " codes");
  TORCH_CHECK(codes.size(2) == nibble::kBlockGroups * M, "codes are not in the blocked layout");
  TORCH_CHECK(codes.size(0) * nibble::kBlockGroups >= num_groups, "too few code blocks");
  TORCH_CHECK(x2.size(1) == num_groups * g, "x has ", x2.size(1), " features, expected ", num_groups * g);
  TORCH_CHECK(scales.numel() == out, "scales have ", scales.numel(), " entries, expected ", out);
  TORCH_CHECK(method >= 0 && method <= 2, "method is 0 (automatic), 1 (lookup tables) or 2 (decoding)");
  const at::Tensor s = as_float(scales);
  const auto b = optional_float(bias, out, "bias");
  at::Tensor y = at::empty({x2.size(0), out}, x2.options());
  const bool have_t = codebooks_t.numel() > 0;
  if (have_t) check(codebooks_t, at::kFloat, 3, "codebooks_t");
  const nibble::AqlmArgs args{x2.data_ptr<float>(), x2.size(0), num_groups, int(g), int(M),
                              codes.data_ptr(), codes.size(0), out, int(C), codebooks.data_ptr<float>(),
                              have_t ? codebooks_t.data_ptr<float>() : nullptr, s.data_ptr<float>(),
                              data_or_null(b), y.data_ptr<float>()};
  const bool lut = method == 1 || (method == 0 && !nibble::aqlm_decode_preferred(args));
  TORCH_CHECK(!lut || (!wide && have_t), "lookup tables take codebooks of 256 codewords and their transpose");
  TORCH_CHECK(lut || g == 8, "decoding takes input groups of 8");
  if (lut)
    nibble::aqlm_lut_linear(args);
  else
    nibble::aqlm_decode_linear(args);
  return shaped_like(y, x);
}

// x [..., in] any float dtype; packed [out, words] i32; scales, zeros [out, in/group_size] (zeros
// absent: the midpoint 2^(bits-1)); bias [out]. y [..., out] like x.
at::Tensor scalar_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                         const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                         const std::optional<at::Tensor>& bias) {
  const at::Tensor x2 = rows_of(x);
  check(packed, at::kInt, 2, "packed");
  const int64_t in = x2.size(1), out = packed.size(0);
  TORCH_CHECK(bits == 2 || bits == 4, "the scalar kernel takes 2 or 4 bits, got ", bits);
  TORCH_CHECK(group_size > 0 && in % group_size == 0 && group_size % (32 / bits) == 0,
              "group size ", group_size, " does not fit ", in, " features of ", bits, " bits");
  TORCH_CHECK(packed.size(1) * 32 >= in * bits, "packed rows are too short");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == out && scales.size(1) == in / group_size,
              "scales have a wrong shape");
  const at::Tensor s = as_float(scales);
  const auto z = optional_float(zeros, scales.numel(), "zeros");
  const auto b = optional_float(bias, out, "bias");
  at::Tensor y = at::empty({x2.size(0), out}, x2.options());
  nibble::scalar_linear(x2.data_ptr<float>(), x2.size(0), in, packed.data_ptr<int32_t>(), packed.size(1),
                        out, s.data_ptr<float>(), data_or_null(z), int(bits), group_size,
                        data_or_null(b), y.data_ptr<float>());
  return shaped_like(y, x);
}

}  // namespace

TORCH_LIBRARY(nibble_cpu, m) {
  m.def("aqlm_lut_linear(Tensor x, Tensor codes, Tensor codebooks, Tensor codebooks_t, Tensor scales, "
        "Tensor? bias, int num_groups, int method=0) -> Tensor", &aqlm_lut_linear);
  m.def("scalar_linear(Tensor x, Tensor packed, Tensor scales, Tensor? zeros, int bits, int group_size, "
        "Tensor? bias) -> Tensor", &scalar_linear);
}
