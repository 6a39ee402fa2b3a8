// Emulated-CUDA harness of masked_dense_triplet_fwd / _bwd
// (csrc/dense_triplet/masked_dense_triplet_kernels.cuh), driven by
// tests/test_emu_dense_triplet.py.  Input: "cases" and, per case i, "c<i>/anchor",
// "c<i>/positive", "c<i>/negative" (N, C, L), "c<i>/weight" and "c<i>/grad" (N, L), all of one
// dtype, and "c<i>/margin".  Output: "c<i>/loss" (N, L) and "c<i>/grad_anchor",
// "c<i>/grad_positive", "c<i>/grad_negative" (N, C, L); outputs start as NaN, so an element
// a kernel never writes shows.
#include <string>
#include <vector>

#include "dense_triplet/masked_dense_triplet_kernels.cuh"
#include "tensor_io.h"

namespace {

using reid_emu::io::Archive;
using reid_emu::io::Array;
using reid_emu::io::DType;

template <typename scalar_t>
Array& nan_output(Archive& out, const std::string& name, const std::vector<int64_t>& shape) {
  Array& a = out.add(name, reid_emu::io::dtype_of<scalar_t>(), shape);
  scalar_t* p = a.data<scalar_t>();
  for (int64_t i = 0; i < a.numel(); ++i) p[i] = scalar_t(std::numeric_limits<float>::quiet_NaN());
  return a;
}

template <typename scalar_t>
void run_case(const Archive& in, Archive& out, const std::string& prefix) {
  const Array& anchor = in.get(prefix + "anchor");
  const Array& positive = in.get(prefix + "positive");
  const Array& negative = in.get(prefix + "negative");
  const Array& weight = in.get(prefix + "weight");
  const Array& grad = in.get(prefix + "grad");
  const int64_t n = anchor.shape[0], c = anchor.shape[1], l = anchor.shape[2];
  const double margin = in.get(prefix + "margin").scalar();
  scalar_t* loss = nan_output<scalar_t>(out, prefix + "loss", {n, l}).template data<scalar_t>();
  reid_kernels::dense_triplet::launch_masked_dense_triplet_fwd<scalar_t>(
      anchor.data<scalar_t>(), positive.data<scalar_t>(), negative.data<scalar_t>(), weight.data<scalar_t>(), loss, n,
      c, l, margin, nullptr);
  // (an Array& does not survive a later add(); its data pointer does)
  nan_output<scalar_t>(out, prefix + "grad_anchor", {n, c, l});
  nan_output<scalar_t>(out, prefix + "grad_positive", {n, c, l});
  nan_output<scalar_t>(out, prefix + "grad_negative", {n, c, l});
  reid_kernels::dense_triplet::launch_masked_dense_triplet_bwd<scalar_t>(
      grad.data<scalar_t>(), anchor.data<scalar_t>(), positive.data<scalar_t>(), negative.data<scalar_t>(),
      weight.data<scalar_t>(), out.get(prefix + "grad_anchor").data<scalar_t>(),
      out.get(prefix + "grad_positive").data<scalar_t>(), out.get(prefix + "grad_negative").data<scalar_t>(), n, c, l,
      margin, nullptr);
}

}  // namespace

int main(int argc, char** argv) {
  return reid_emu::io::harness_main(argc, argv, [](const Archive& in, Archive& out) {
    const int cases = static_cast<int>(in.get("cases").scalar());
    for (int i = 0; i < cases; ++i) {
      const std::string prefix = "c" + std::to_string(i) + "/";
      dispatch_floating(in.get(prefix + "anchor").dtype, "anchor: expected a floating-point map",
                        [&]<typename T>() { run_case<T>(in, out, prefix); });
    }
  });
}
