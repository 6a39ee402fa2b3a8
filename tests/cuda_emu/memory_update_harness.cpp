// Emulated-CUDA harness of memory_update_ (csrc/memory/memory_update_kernels.cuh), driven by
// tests/test_emu_memory_update.py.  Input: "cases" and, per case i, "c<i>/memory" (rows, dim)
// in the bank's dtype, "c<i>/features" (batch, dim) in its accumulation dtype,
// "c<i>/sorted_labels" and "c<i>/order" (the stable sort of the labels, int64),
// "c<i>/momentum" (the weight of the old row), "c<i>/mode", "c<i>/normalize".
// Output: "c<i>/memory", the updated bank.
#include <string>
#include <vector>

#include "memory/memory_update_kernels.cuh"
#include "tensor_io.h"

namespace {

using reid_emu::io::Archive;
using reid_emu::io::Array;
using reid_emu::io::DType;

template <typename scalar_t>
void run_case(const Archive& in, Archive& out, const std::string& prefix) {
  using acc_t = reid_kernels::device::acc_type_t<scalar_t>;
  Array memory = in.get(prefix + "memory");
  memory.name = prefix + "memory";
  const Array& features = in.get(prefix + "features");
  const Array& sorted_labels = in.get(prefix + "sorted_labels");
  const Array& order = in.get(prefix + "order");
  const int64_t rows = memory.shape[0], dim = memory.shape[1], batch = features.shape[0];
  std::vector<acc_t> global_rows;
  if (reid_kernels::memory::memory_update_needs_global_rows<acc_t>(dim)) {
    global_rows.assign(static_cast<size_t>(batch * dim), std::numeric_limits<acc_t>::quiet_NaN());
  }
  const auto mode = static_cast<reid_kernels::memory::UpdateMode>(static_cast<int>(in.get(prefix + "mode").scalar()));
  reid_kernels::memory::launch_memory_update<scalar_t, acc_t>(
      memory.data<scalar_t>(), features.data<acc_t>(), sorted_labels.data<int64_t>(), order.data<int64_t>(), batch,
      rows, dim, in.get(prefix + "momentum").scalar(), mode, in.get(prefix + "normalize").scalar() != 0,
      global_rows.empty() ? nullptr : global_rows.data(), nullptr);
  out.arrays.push_back(std::move(memory));
}

}  // namespace

int main(int argc, char** argv) {
  return reid_emu::io::harness_main(argc, argv, [](const Archive& in, Archive& out) {
    const int cases = static_cast<int>(in.get("cases").scalar());
    for (int i = 0; i < cases; ++i) {
      const std::string prefix = "c" + std::to_string(i) + "/";
      dispatch_floating(in.get(prefix + "memory").dtype, "memory: expected a floating-point bank",
                        [&]<typename T>() { run_case<T>(in, out, prefix); });
    }
  });
}
