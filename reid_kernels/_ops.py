"""Autograd and fake (meta) registrations of the compiled operators (torch.ops.reid_kernels.*).

Schemas are in csrc/ops.cpp; kernels in csrc/<op>/<op>_{cpu.cpp,cuda.cu}.
"""
import torch
from torch.utils._python_dispatch import _disable_current_modes

from ._extension import extension_available


# ---- CMAlign ----
# person_mask(feat (N, C, L)) -> (N, L), no gradient (LbA detaches the mask);
# soft_warp_fwd(query (N, C, Lq), key (N, C, Lk), value (N, Cv, Lk), t) -> (out (N, Cv, Lq),
# lse (N, Lq) float32, probs); its backward is the soft_warp_bwd operator (lse and probs get
# no gradient).  probs is the CPU probability cache: (N, Lq, Lk) in the accumulation dtype
# (float64 for float64, else float32) when it fits in soft_warp_prob_cache_bytes(), else an
# empty (0,) tensor of that dtype -- always empty on CUDA (csrc/ops.cpp).
# The fake kernels give torch.compile and the meta device shapes and dtypes.
# Double backward is refused: the backward operators have no derivative of their own.


@torch.compiler.assume_constant_result
def soft_warp_prob_cache_bytes() -> int:
    """The CPU probability-cache cap in bytes, read from the C++ kernel (the rule's one source).

    256 MiB, or ``REID_KERNELS_SOFT_WARP_CACHE_BYTES`` when that environment variable is set
    (read at every call, so a test can force the uncached path on small maps).
    """
    with _disable_current_modes():  # a plain C++ call, also while fake tensors trace
        return int(torch.ops.reid_kernels._soft_warp_prob_cache_bytes())


def _soft_warp_probs_shape(query, key) -> tuple:
    """Shape of soft_warp_fwd's probability cache (the CPU kernel's rule, with its cap)."""
    n, _, lq = query.shape
    lk = key.shape[2]
    elem = 8 if query.dtype == torch.float64 else 4
    if query.device.type == "cpu" and n * lq * lk * elem <= soft_warp_prob_cache_bytes():
        return (n, lq, lk)
    return (0,)


def _refuse_double_backward(op_name: str):
    """An autograd formula for a backward operator that says why there is no second derivative."""

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise NotImplementedError(
            f"{op_name}: double backward (differentiating a gradient taken with create_graph=True) is not "
            f"supported by the fused kernels; use reid_kernels.reference.{op_name} for higher-order gradients"
        )

    return backward, setup_context


def _register_cmalign() -> None:
    @torch.library.register_fake("reid_kernels::person_mask")
    def _person_mask_fake(feat):
        return feat.new_empty((feat.shape[0], feat.shape[2]))

    def _person_mask_setup(ctx, inputs, output):
        ctx.mark_non_differentiable(output)  # the mask is detached (LbA code)

    def _person_mask_backward(ctx, grad_mask):
        return None

    torch.library.register_autograd(
        "reid_kernels::person_mask", _person_mask_backward, setup_context=_person_mask_setup
    )

    @torch.library.register_fake("reid_kernels::soft_warp_fwd")
    def _soft_warp_fwd_fake(query, key, value, temperature):
        n, _, lq = query.shape
        out = query.new_empty((n, value.shape[1], lq))
        lse = query.new_empty((n, lq), dtype=torch.float32)
        acc = torch.float64 if query.dtype == torch.float64 else torch.float32
        probs = query.new_empty(_soft_warp_probs_shape(query, key), dtype=acc)
        return out, lse, probs

    @torch.library.register_fake("reid_kernels::soft_warp_bwd")
    def _soft_warp_bwd_fake(grad_out, query, key, value, out, probs, temperature):
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)

    # The CPU-only fused partner warps of reid_kernels.cmalign (csrc/cmalign/cmalign_cpu_ops.cpp);
    # reid_kernels.cmalign gives them an autograd.Function, so they need no autograd formula here.
    @torch.library.register_fake("reid_kernels::cmalign_pairs_fwd")
    def _cmalign_pairs_fwd_fake(x, mask, pos_idx, neg_idx, temperature, eps):
        n, _, lq = x.shape
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return (x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty((n, lq)),
                x.new_empty((2, n, lq, lq), dtype=acc), x.new_empty((2, n, lq), dtype=acc))

    @torch.library.register_fake("reid_kernels::cmalign_pairs_bwd")
    def _cmalign_pairs_bwd_fake(grad_pos, grad_neg, grad_dist, x, mask, pos_idx, neg_idx, probs, recon_pos,
                                recon_neg, dist, temperature, eps):
        return torch.empty_like(x)

    backward, setup = _refuse_double_backward("soft_warp")
    torch.library.register_autograd("reid_kernels::soft_warp_bwd", backward, setup_context=setup)

    def _soft_warp_setup(ctx, inputs, output):
        query, key, value, temperature = inputs
        out, lse, probs = output
        ctx.save_for_backward(query, key, value, out, probs)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(lse, probs)

    def _soft_warp_backward(ctx, grad_out, grad_lse, grad_probs):
        # lse and probs are non-differentiable, so grad_lse and grad_probs carry nothing.
        query, key, value, out, probs = ctx.saved_tensors
        if grad_out is None:
            return None, None, None, None
        grad_query, grad_key, grad_value = torch.ops.reid_kernels.soft_warp_bwd(
            grad_out.contiguous(), query, key, value, out, probs, ctx.temperature
        )
        needs = ctx.needs_input_grad
        return (
            grad_query if needs[0] else None,
            grad_key if needs[1] else None,
            grad_value if needs[2] else None,
            None,
        )

    torch.library.register_autograd(
        "reid_kernels::soft_warp_fwd", _soft_warp_backward, setup_context=_soft_warp_setup
    )


if extension_available():
    _register_cmalign()


# ---- Dense triplet ----
# masked_dense_triplet_fwd/bwd (LbA eqs. 10-11).  The weight (LbA's detached
# co-attention) and the margin receive no gradient.

if extension_available():

    @torch.library.register_fake("reid_kernels::masked_dense_triplet_fwd")
    def _masked_dense_triplet_fwd_fake(anchor, positive, negative, weight, margin):
        return anchor.new_empty((anchor.shape[0], anchor.shape[2]))

    @torch.library.register_fake("reid_kernels::masked_dense_triplet_bwd")
    def _masked_dense_triplet_bwd_fake(grad_loss, anchor, positive, negative, weight, margin):
        return torch.empty_like(anchor), torch.empty_like(positive), torch.empty_like(negative)

    _backward, _setup = _refuse_double_backward("masked_dense_triplet")
    torch.library.register_autograd("reid_kernels::masked_dense_triplet_bwd", _backward, setup_context=_setup)

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
if extension_available():

    @torch.library.register_fake("reid_kernels::memory_update_")
    def _memory_update_fake(memory, features, labels, momentum, update_mode, normalize):
        return None
