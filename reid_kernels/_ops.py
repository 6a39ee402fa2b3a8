"""Autograd and fake (meta) registrations of the compiled operators (torch.ops.reid_kernels.*).

Schemas are in csrc/ops.cpp; kernels in csrc/<op>/<op>_{cpu.cpp,cuda.cu}.
"""
import torch  # noqa: F401


# ---- Dense triplet ----
# masked_dense_triplet_fwd/bwd (LbA eqs. 10-11).  The weight (LbA's detached
# co-attention) and the margin receive no gradient.
from ._extension import extension_available as _extension_available  # noqa: E402

if _extension_available():

    @torch.library.register_fake("reid_kernels::masked_dense_triplet_fwd")
    def _masked_dense_triplet_fwd_fake(anchor, positive, negative, weight, margin):
        return anchor.new_empty((anchor.shape[0], anchor.shape[2]))

    @torch.library.register_fake("reid_kernels::masked_dense_triplet_bwd")
    def _masked_dense_triplet_bwd_fake(grad_loss, anchor, positive, negative, weight, margin):
        return torch.empty_like(anchor), torch.empty_like(positive), torch.empty_like(negative)

    def _masked_dense_triplet_setup_context(ctx, inputs, output):
        anchor, positive, negative, weight, margin = inputs
        ctx.save_for_backward(anchor, positive, negative, weight)
        ctx.margin = margin

    def _masked_dense_triplet_backward(ctx, grad_loss):
        anchor, positive, negative, weight = ctx.saved_tensors
        grad_loss = grad_loss.to(anchor.dtype).contiguous()
        grad_a, grad_p, grad_n = torch.ops.reid_kernels.masked_dense_triplet_bwd(
            grad_loss, anchor, positive, negative, weight, ctx.margin
        )
        return grad_a, grad_p, grad_n, None, None  # no gradient for weight (detached co-attention), margin

    torch.library.register_autograd(
        "reid_kernels::masked_dense_triplet_fwd",
        _masked_dense_triplet_backward,
        setup_context=_masked_dense_triplet_setup_context,
    )


# ---- Memory banks ----
# memory_update_ mutates the bank and returns nothing; no autograd (banks get no gradient).
if _extension_available():

    @torch.library.register_fake("reid_kernels::memory_update_")
    def _memory_update_fake(memory, features, labels, momentum, update_mode, normalize):
        return None
