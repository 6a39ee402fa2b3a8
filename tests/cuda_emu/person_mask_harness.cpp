// Emulated-CUDA harness of person_mask (csrc/cmalign/person_mask_kernels.cuh), driven by
// tests/test_emu_person_mask.py.  It calls the launch function person_mask_cuda.cu calls.
// Input: "cases" and, per case i, "c<i>/feat" (N, C, L) in one floating dtype, N, L > 0.
// Output: "c<i>/mask" (N, L) in feat's dtype and "c<i>/norms" (N, L), eq. 5's g in the
// accumulation dtype.
#include <algorithm>
#include <vector>
#include <stdexcept>
#include <string>

#include "cmalign/person_mask_kernels.cuh"
#include "tensor_io.h"

namespace {

using reid_emu::io::Archive;
using reid_emu::io::Array;
using reid_emu::io::DType;

// person_mask_cuda.cu's launch check, with the emulator's error state.
void check_launch() {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) throw std::runtime_error(std::string("kernel launch: ") + cudaGetErrorString(error));
}

// An output array whose every byte is 0xFF (NaN): an element no thread writes shows.
template <typename T>
T* add_output(Archive& out, const std::string& name, std::vector<int64_t> shape) {
  Array& a = out.add(name, reid_emu::io::dtype_of<T>(), std::move(shape));
  std::fill(a.bytes.begin(), a.bytes.end(), static_cast<unsigned char>(0xff));
  return a.data<T>();
}

template <typename scalar_t>
void run_case(const Archive& in, Archive& out, const std::string& p) {
  using acc_t = reid_kernels::device::acc_type_t<scalar_t>;
  const Array& feat = in.get(p + "feat");
  const int64_t N = feat.shape[0], C = feat.shape[1], L = feat.shape[2];
  if (N == 0 || L == 0) throw std::runtime_error("empty maps are the .cu's host code, not a launch");
  acc_t* norms = add_output<acc_t>(out, p + "norms", {N, L});
  scalar_t* mask = add_output<scalar_t>(out, p + "mask", {N, L});
  reid_kernels::cmalign_cuda::launch_person_mask(feat.data<scalar_t>(), N, C, L, norms, mask, nullptr, check_launch);
}

}  // namespace

int main(int argc, char** argv) {
  return reid_emu::io::harness_main(argc, argv, [](const Archive& in, Archive& out) {
    const int cases = static_cast<int>(in.get("cases").scalar());
    out.arrays.reserve(static_cast<size_t>(2 * cases));  // add_output's pointers stay valid
    for (int i = 0; i < cases; ++i) {
      const std::string p = "c" + std::to_string(i) + "/";
      dispatch_floating(in.get(p + "feat").dtype, "person_mask: expected a floating-point feature map",
                        [&]<typename T>() { run_case<T>(in, out, p); });
    }
  });
}
