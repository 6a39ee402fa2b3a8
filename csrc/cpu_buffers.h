// Large CPU buffers for the kernels' outputs and scratch volumes.
#pragma once

#include <ATen/ATen.h>

namespace reid_kernels {

// An uninitialised tensor for a large output or buffer ((N, C, L) feature maps are tens of MB).
// The first touch of fresh memory costs more than the arithmetic on it when it sits on 4 KiB
// pages (measured: filling a fresh 42 MB buffer takes 40 ms, a reused one 5 ms, one thread; three
// fresh 85 MB gradients cost a masked dense triplet backward 46 of its 118 ms).  On Linux,
// allocations of 4 MiB and more are 2 MiB-aligned and advised for transparent huge pages (one
// fault per 2 MiB; measured 8 ms for the same fill).  The advice is only advice: where huge pages
// are off the memory is ordinary pages, and the bytes used are the same but for the rounding to
// 2 MiB.  Smaller tensors come from at::empty.
at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options);

inline at::Tensor empty_large_like(const at::Tensor& t) { return empty_large(t.sizes(), t.options()); }

}  // namespace reid_kernels
