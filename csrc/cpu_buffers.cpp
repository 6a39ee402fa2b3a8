// See cpu_buffers.h.
#include "cpu_buffers.h"

#include <cstdlib>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace reid_kernels {

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
#ifdef __linux__
  constexpr size_t kHugePage = size_t(2) << 20;
  const size_t bytes =
      static_cast<size_t>(c10::multiply_integers(sizes)) * c10::elementSize(options.dtype().toScalarType());
  if (bytes >= 2 * kHugePage) {
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* data = nullptr;
    if (posix_memalign(&data, kHugePage, rounded) == 0) {
      madvise(data, rounded, MADV_HUGEPAGE);
      return at::from_blob(data, sizes, [](void* p) { std::free(p); }, options);
    }
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace reid_kernels
