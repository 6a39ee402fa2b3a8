"""reid_kernels.masked_dense_triplet against its plain-PyTorch reference (LbA eqs. 10-11).

The reference runs in float64 on the same inputs.  Tolerances: float32 1e-5 relative and
1e-6 + 1e-7 * C absolute on the loss (a distance over C channels is O(sqrt(C)), its float32
sum of C squares carries O(sqrt(C)) roundings -- CUDA accumulates in float32 -- and the hinge
subtracts two of them), 1e-5 / 1e-6 on the gradients; float64 1e-10; float16/bfloat16 (CUDA)
one rounding of the half type.
"""
import pytest
import torch

import reid_kernels
from reid_kernels import reference

TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
SHAPES = [(1, 1, 1, 1), (2, 3, 4, 5), (4, 64, 18, 9), (2, 2048, 3, 3), (8, 16, 1, 1), (3, 5, 7, 11)]


def make_maps(shape, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    maps = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    weight = torch.rand((shape[0], *shape[2:]), generator=gen, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (*maps, weight)]


def grads_of(fn, maps, weight, margin, reduction, grad_seed=1):
    leaves = [m.detach().clone().requires_grad_(True) for m in maps]
    out = fn(*leaves, weight, margin, reduction)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    out.backward(upstream.to(device=out.device, dtype=out.dtype))
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(device, shape, reduction, dtype):
    a, p, n, w = make_maps(shape, device, dtype)
    margin = 0.3 if shape[1] > 4 else 1.0  # keep a mix of active and inactive hinges
    out, grads = grads_of(reid_kernels.masked_dense_triplet, (a, p, n), w, margin, reduction)
    ref, ref_grads = grads_of(reference.masked_dense_triplet, [t.double() for t in (a, p, n)], w.double(), margin,
                              reduction)
    loss_tol = dict(TOLERANCE[dtype])
    loss_tol["atol"] += 1e-7 * shape[1] if dtype == torch.float32 else 0.0
    torch.testing.assert_close(out, ref.to(dtype), **loss_tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r.to(dtype), **TOLERANCE[dtype])


def test_three_dim_maps(device):
    a, p, n, w = make_maps((3, 6, 10), device)
    out = reid_kernels.masked_dense_triplet(a, p, n, w, 0.3, "none")
    torch.testing.assert_close(out, reference.masked_dense_triplet(a, p, n, w, 0.3, "none"), **TOLERANCE[torch.float32])
    assert out.shape == (3, 10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(device, dtype):
    """CUDA: the half kernels (float32 accumulation); CPU: computed in float32, returned in the half dtype."""
    a, p, n, w = make_maps((4, 256, 18, 9), device, dtype)
    out, grads = grads_of(reid_kernels.masked_dense_triplet, (a, p, n), w, 0.3, "none")
    upcast = [t.float() for t in (a, p, n)]
    ref, ref_grads = grads_of(reference.masked_dense_triplet, upcast, w.float(), 0.3, "none")
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, **TOLERANCE[dtype])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r, **TOLERANCE[dtype])


def test_zero_distances_have_zero_gradient(device):
    """Where anchor == positive (or == negative) the distance is 0: its term gets gradient 0, as vector_norm."""
    a, p, n, w = make_maps((2, 8, 3, 4), device, torch.float64)
    p[:, :, 0, :] = a[:, :, 0, :]  # d+ = 0 on the first row of positions
    n[:, :, 1, :] = a[:, :, 1, :]  # d- = 0 on the second row
    out, grads = grads_of(reid_kernels.masked_dense_triplet, (a, p, n), w, 0.3, "sum")
    ref, ref_grads = grads_of(reference.masked_dense_triplet, (a, p, n), w, 0.3, "sum")
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float64])
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, **TOLERANCE[torch.float64])


def test_hinge_exactly_zero_passes_gradient_like_clamp(device):
    a, p, _, w = make_maps((2, 5, 2, 2), device, torch.float64)
    out, grads = grads_of(reid_kernels.masked_dense_triplet, (a, p, p.clone()), w, 0.0, "sum")
    ref, ref_grads = grads_of(reference.masked_dense_triplet, (a, p, p.clone()), w, 0.0, "sum")
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **TOLERANCE[torch.float64])
    assert grads[1].abs().sum() > 0  # the hinge is 0 everywhere, yet active


def test_weight_gets_no_gradient(device):
    a, p, n, w = make_maps((2, 4, 3, 3), device)
    w.requires_grad_(True)
    a.requires_grad_(True)
    reid_kernels.masked_dense_triplet(a, p, n, w).backward()
    assert w.grad is None and a.grad is not None


def test_non_contiguous_inputs(device):
    a, p, n, w = make_maps((2, 6, 5, 4), device)
    cl = [t.to(memory_format=torch.channels_last) for t in (a, p, n)]
    out = reid_kernels.masked_dense_triplet(*cl, w.transpose(1, 2).contiguous().transpose(1, 2), 0.3, "none")
    torch.testing.assert_close(out, reference.masked_dense_triplet(a, p, n, w, 0.3, "none"), **TOLERANCE[torch.float32])


def test_bit_identical_run_to_run(device):
    a, p, n, w = make_maps((4, 300, 18, 9), device)
    first, first_grads = grads_of(reid_kernels.masked_dense_triplet, (a, p, n), w, 0.3, "none")
    for _ in range(2):
        again, again_grads = grads_of(reid_kernels.masked_dense_triplet, (a, p, n), w, 0.3, "none")
        assert torch.equal(first, again)
        assert all(torch.equal(x, y) for x, y in zip(first_grads, again_grads))


def test_gradcheck(device):
    a, p, n, w = make_maps((2, 3, 3, 2), device, torch.float64)
    inputs = [t.clone().requires_grad_(True) for t in (a, p, n)]
    assert torch.autograd.gradcheck(
        lambda x, y, z: reid_kernels.masked_dense_triplet(x, y, z, w, 0.5, "none"), inputs, eps=1e-6, atol=1e-7
    )


def test_opcheck(device):
    a, p, n, w = make_maps((2, 4, 6), device)
    a.requires_grad_(True)
    p.requires_grad_(True)
    n.requires_grad_(True)
    torch.library.opcheck(torch.ops.reid_kernels.masked_dense_triplet_fwd.default, (a, p, n, w, 0.3))
    grad = torch.randn(2, 6, device=device)
    torch.library.opcheck(torch.ops.reid_kernels.masked_dense_triplet_bwd.default,
                          (grad, a.detach(), p.detach(), n.detach(), w, 0.3))


def _good():
    a, p, n, w = make_maps((2, 3, 4, 5), "cpu")
    return dict(anchor=a, positive=p, negative=n, weight=w)


@pytest.mark.parametrize(
    "mutate, kwargs, error, match",
    [
        (lambda d: d.update(positive=d["positive"][:, :2]), {}, ValueError, r"positive: expected shape \(2, 3, 4, 5\)"),
        (lambda d: d.update(negative=d["negative"].double()), {}, TypeError, "negative: expected dtype torch.float32"),
        (lambda d: d.update(weight=d["weight"][:, :3]), {}, ValueError, r"weight: expected shape \(2, 4, 5\)"),
        (lambda d: d.update(weight=d["weight"][0]), {}, ValueError, "weight: expected a 3-D"),
        (lambda d: d.update(anchor=d["anchor"][0, 0]), {}, ValueError, "anchor: expected an"),
        (lambda d: d.update(anchor=d["anchor"].int()), {}, TypeError, "anchor: expected a floating"),
        (lambda d: [d.update({k: v.to(torch.float8_e4m3fn)}) for k, v in list(d.items())], {}, TypeError,
         "anchor: expected dtype in"),
        (lambda d: None, dict(margin=float("nan")), ValueError, "margin: expected a finite"),
        (lambda d: None, dict(reduction="avg"), ValueError, "reduction: expected 'mean', 'sum' or 'none'"),
        (lambda d: d.update(weight="w"), {}, TypeError, "weight: expected a torch.Tensor"),
    ],
)
def test_bad_input(mutate, kwargs, error, match):
    args = _good()
    mutate(args)
    with pytest.raises(error, match=match):
        reid_kernels.masked_dense_triplet(**args, **kwargs)


def test_bad_input_reaching_the_op_directly():
    a, p, n, w = make_maps((2, 3, 4), "cpu")
    op = torch.ops.reid_kernels.masked_dense_triplet_fwd
    with pytest.raises(RuntimeError, match="positive: expected a contiguous"):
        op(a, p.transpose(1, 2).contiguous().transpose(1, 2), n, w, 0.3)
    with pytest.raises(RuntimeError, match=r"weight: expected shape \(2, 4\)"):
        op(a, p, n, w[:, :2].contiguous(), 0.3)
    with pytest.raises(RuntimeError, match="float16/bfloat16 are CUDA-only"):
        op(a.half(), p.half(), n.half(), w.half(), 0.3)


# ---- LbA code conventions: eps and weighting -------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_eps_matches_pairwise_distance_convention(device, reduction):
    """eps = 1e-6 as LbA's TripletMarginLoss: ||a - p + eps||, the reference's and pairwise_distance's."""
    a, p, n, w = make_maps((2, 16, 4, 3), device, torch.float64, seed=5)
    fn = lambda *t: reid_kernels.masked_dense_triplet(*t, eps=1e-6)  # noqa: E731
    ref = lambda *t: reference.masked_dense_triplet(*t, eps=1e-6)  # noqa: E731
    out, grads = grads_of(fn, (a, p, n), w, 0.3, reduction)
    want, want_grads = grads_of(ref, (a, p, n), w, 0.3, reduction)
    torch.testing.assert_close(out, want, **TOLERANCE[torch.float64])
    for g, r in zip(grads, want_grads):
        torch.testing.assert_close(g, r, **TOLERANCE[torch.float64])
    # The reference's distance is torch's pairwise_distance (what TripletMarginLoss calls).
    d_pos = torch.nn.functional.pairwise_distance(a.movedim(1, -1), p.movedim(1, -1), eps=1e-6)
    per_position = w * (d_pos - torch.nn.functional.pairwise_distance(a.movedim(1, -1), n.movedim(1, -1), eps=1e-6)
                        + 0.3).clamp(min=0)
    torch.testing.assert_close(reid_kernels.masked_dense_triplet(a, p, n, w, 0.3, "none", eps=1e-6), per_position,
                               **TOLERANCE[torch.float64])
    # And it is not a no-op: where anchor == positive, d+ is sqrt(C) * eps = 4e-6 instead of 0.
    with_eps = reid_kernels.masked_dense_triplet(a, a.clone(), n, w, 5.0, "none", eps=1e-6)
    without = reid_kernels.masked_dense_triplet(a, a.clone(), n, w, 5.0, "none")
    assert (with_eps - without).abs().max() > 1e-7


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_lba_code_weighting(device, reduction):
    """weighting="lba-code": the released code's (N, N, H, W) broadcast, mean_p(mean_i A_i * mean_j l_j)."""
    a, p, n, w = make_maps((4, 8, 3, 5), device, torch.float64, seed=6)
    fn = lambda *t: reid_kernels.masked_dense_triplet(*t, weighting="lba-code")  # noqa: E731
    ref = lambda *t: reference.masked_dense_triplet(*t, weighting="lba-code")  # noqa: E731
    out, grads = grads_of(fn, (a, p, n), w, 0.5, reduction)
    want, want_grads = grads_of(ref, (a, p, n), w, 0.5, reduction)
    torch.testing.assert_close(out, want, **TOLERANCE[torch.float64])
    for g, r in zip(grads, want_grads):
        torch.testing.assert_close(g, r, **TOLERANCE[torch.float64])
    if reduction == "mean":  # by hand: per position, mean co-attention times mean hinge
        hinge = reference.masked_dense_triplet(a, p, n, torch.ones_like(w), 0.5, "none")
        by_hand = (w.mean(0) * hinge.mean(0)).mean()
        torch.testing.assert_close(out, by_hand, **TOLERANCE[torch.float64])
        paper = reid_kernels.masked_dense_triplet(a, p, n, w, 0.5)
        assert (paper - out).abs() > 1e-3  # the two weightings differ on these maps


def test_weighting_and_eps_are_checked():
    args = _good()
    with pytest.raises(ValueError, match="weighting: expected 'paper' or 'lba-code', got 'code'"):
        reid_kernels.masked_dense_triplet(**args, weighting="code")
    with pytest.raises(TypeError, match="weighting: expected 'paper' or 'lba-code', got int"):
        reid_kernels.masked_dense_triplet(**args, weighting=1)
    with pytest.raises(ValueError, match="eps: expected a finite value >= 0, got -1e-06"):
        reid_kernels.masked_dense_triplet(**args, eps=-1e-6)
    with pytest.raises(ValueError, match="eps: expected a finite"):
        reid_kernels.masked_dense_triplet(**args, eps=float("inf"))


# ---- NaN: the reference's behaviour --------------------------------------------------------------


def test_nan_weight_propagates_like_the_reference(device):
    """A NaN weight: NaN loss there; an inactive hinge passes gradient 0 (clamp's backward), an active one NaN."""
    a, p, n, w = make_maps((2, 6, 4, 4), device, torch.float64, seed=7)
    w[0, 1, 2] = float("nan")  # an active hinge at margin 2 below
    w[1, 0, 0] = float("nan")
    for margin in (2.0, -10.0):  # all hinges active / all inactive
        out, grads = grads_of(reid_kernels.masked_dense_triplet, (a, p, n), w, margin, "none")
        want, want_grads = grads_of(reference.masked_dense_triplet, (a, p, n), w, margin, "none")
        torch.testing.assert_close(out, want, equal_nan=True, **TOLERANCE[torch.float64])
        for g, r in zip(grads, want_grads):
            torch.testing.assert_close(g, r, equal_nan=True, **TOLERANCE[torch.float64])
        if margin < 0:
            assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_nan_in_the_maps_propagates_like_the_reference(device):
    a, p, n, w = make_maps((2, 6, 3, 3), device, torch.float64, seed=8)
    p[1, 2, 1, 1] = float("nan")
    out, grads = grads_of(reid_kernels.masked_dense_triplet, (a, p, n), w, 0.3, "none")
    want, want_grads = grads_of(reference.masked_dense_triplet, (a, p, n), w, 0.3, "none")
    torch.testing.assert_close(out, want, equal_nan=True, **TOLERANCE[torch.float64])
    for g, r in zip(grads, want_grads):
        torch.testing.assert_close(g, r, equal_nan=True, **TOLERANCE[torch.float64])
