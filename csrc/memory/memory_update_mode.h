// The update modes and the normalisation guard of memory_update_, without ATen: shared by
// the operator's checks (memory_update.h), the CPU kernel and the device code
// (memory_update_kernels.cuh, which the CUDA emulator compiles without ATen).
#pragma once

namespace reid_kernels {
namespace memory {

enum class UpdateMode : int { kSequential = 0, kMean = 1, kHard = 2 };

// Same guard as torch.nn.functional.normalize: x / max(||x||_2, eps).
constexpr double kNormalizeEps = 1e-12;

}  // namespace memory
}  // namespace reid_kernels
