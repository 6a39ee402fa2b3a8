"""reid_kernels.losses against plain-Python-loop transcriptions of the papers' equations.

Each ``loop_*`` below transcribes one equation sample by sample (and pair by pair) in float64,
with the paper's default constants hard-coded as its defaults; it returns the loss and its
"kinks" -- every hinge argument and every mining gap (best minus runner-up candidate) -- so
that the inputs used for gradient checks can be kept away from non-differentiable points.
Hinges in the transcriptions are Python ``if x > 0`` tests, sqrt is ``torch.sqrt`` of a sum of
squares and softmax is ``exp / sum exp``: deliberately a different arithmetic from the
vectorised module.
"""
import math

import pytest
import torch

import reid_kernels
from reid_kernels import losses

F64 = dict(rtol=1e-10, atol=1e-12)


# ---- transcriptions -----------------------------------------------------------------------------


def norm(x):
    return torch.sqrt((x * x).sum())


def dot(x, y):
    return (x * y).sum()


def graph_zero(*tensors):
    """A 0 that is connected to the graph of ``tensors`` (so autograd.grad works on it)."""
    return sum(t.sum() * 0.0 for t in tensors)


def gap(values):
    """Distance between the best and the runner-up of a list of floats (no kink if < 2)."""
    ordered = sorted(values)
    return [ordered[1] - ordered[0]] if len(ordered) > 1 else []


def loop_centroid_triplet(f, y, c, margin=0.3, negatives="batch"):
    """MCE (AAAI 2023) eq. 9: mean_i [d(f_i, c_y) - min_{k != y} d(f_i, c_k) + margin]_+."""
    batch, present = f.shape[0], set(y.tolist())
    total, kinks = graph_zero(f, c), []
    for i in range(batch):
        yi = int(y[i])
        candidates = [k for k in range(c.shape[0]) if k != yi and (negatives == "all" or k in present)]
        if not candidates:
            continue  # no negative: contributes 0, still counted in the mean
        dist = {k: norm(f[i] - c[k]) for k in candidates}
        kinks += gap([dist[k].item() for k in candidates])
        nearest = min(candidates, key=lambda k: dist[k].item())
        h = norm(f[i] - c[yi]) - dist[nearest] + margin
        kinks.append(h.item())
        if h > 0:
            total = total + h
    return total / batch, kinks


def loop_center_separation(f, y, rho1=0.01, rho2=0.7):
    """SAAI (ICCV 2023) eq. 5: mean_i [d(f_i, c_y) - rho1]_+ + mean_{j<k} [rho2 - d(c_j, c_k)]_+."""
    batch, ids = f.shape[0], sorted(set(y.tolist()))
    centre = {}
    for k in ids:
        members = [i for i in range(batch) if int(y[i]) == k]
        acc = f[members[0]]
        for i in members[1:]:
            acc = acc + f[i]
        centre[k] = acc / len(members)
    pull, kinks = graph_zero(f), []
    for i in range(batch):
        h = norm(f[i] - centre[int(y[i])]) - rho1
        kinks.append(h.item())
        if h > 0:
            pull = pull + h
    pull = pull / batch
    pairs = [(j, k) for a, j in enumerate(ids) for k in ids[a + 1:]]
    if not pairs:
        return pull, kinks
    push = graph_zero(f)
    for j, k in pairs:
        h = rho2 - norm(centre[j] - centre[k])
        kinks.append(h.item())
        if h > 0:
            push = push + h
    return pull + push / len(pairs), kinks


def loop_part_diversity(s, factor=lambda p: 2.0 / (p * (p - 1)), skip=()):
    """SAAI (ICCV 2023) eq. 4, released code: -2/(p(p-1)) sum_{i<j} sqrt(mean_k (S_ik - S_jk)^2)."""
    batch, p, n = s.shape
    total = graph_zero(s)
    for b in range(batch):
        acc = graph_zero(s)
        for i in range(p):
            for j in range(i + 1, p):
                if (i, j) in skip:
                    continue
                sq = 0.0
                for k in range(n):
                    sq = sq + (s[b, i, k] - s[b, j, k]) ** 2
                acc = acc + torch.sqrt(sq / n)
        total = total - factor(p) * acc
    return total / batch, []


def hic_terms(f, y, num_negatives=50, temperature=0.15):
    """PECA (IEICE 2024) eq. 6 per anchor: None for an anchor without a positive."""
    batch = f.shape[0]
    terms, kinks = [], []
    for i in range(batch):
        positives = [j for j in range(batch) if j != i and int(y[j]) == int(y[i])]
        if not positives:
            terms.append(None)
            continue
        dist = {j: norm(f[i] - f[j]).item() for j in range(batch) if j != i}
        kinks += gap([-dist[j] for j in positives])
        hardest = max(positives, key=dist.get)
        negatives = sorted((k for k in range(batch) if int(y[k]) != int(y[i])), key=dist.get)
        if len(negatives) > num_negatives:
            kinks.append(dist[negatives[num_negatives]] - dist[negatives[num_negatives - 1]])
        numerator = torch.exp(dot(f[i], f[hardest]) / temperature)
        denominator = numerator
        for k in negatives[:num_negatives]:
            denominator = denominator + torch.exp(dot(f[i], f[k]) / temperature)
        terms.append(-torch.log(numerator / denominator))
    return terms, kinks


def loop_hard_instance_contrastive(f, y, num_negatives=50, temperature=0.15):
    terms, kinks = hic_terms(f, y, num_negatives, temperature)
    kept = [t for t in terms if t is not None]
    if not kept:
        return graph_zero(f), kinks
    return sum(kept) / len(kept), kinks


def loop_modality_centroid_contrastive(f, y, m, c, temperature=0.1, half=0.5):
    """PECA (IEICE 2024) eq. 10: -1/2 sum_{P} log(e^{f.p/tau} / sum_{P u U} e^{f.m/tau})."""
    batch, num_ids = f.shape[0], c.shape[1]
    total = graph_zero(f, c)
    for i in range(batch):
        yi, mi = int(y[i]), int(m[i])
        positives = [c[0, yi], c[1, yi]]
        others = [c[mi, k] for k in range(num_ids) if k != yi]
        denominator = 0.0
        for v in positives + others:
            denominator = denominator + torch.exp(dot(f[i], v) / temperature)
        for v in positives:
            total = total - half * torch.log(torch.exp(dot(f[i], v) / temperature) / denominator)
    return total / batch, []


def loop_channel_mix_margin(fv, fi, fg, margin=0.7):
    """PECA (IEICE 2024) eq. 3, hinge reading: mean_i [d(v, g) - m]_+ + [d(ir, g) - m]_+."""
    total, kinks = graph_zero(fv, fi, fg), []
    for i in range(fv.shape[0]):
        for other in (fv, fi):
            h = norm(other[i] - fg[i]) - margin
            kinks.append(h.item())
            if h > 0:
                total = total + h
    return total / fv.shape[0], kinks


def loop_proxy_cycle(a, b, temperature):
    """a -> soft nearest b (cosine softmax) -> back to a; -mean_k log beta_kk."""
    def cos(u, v):
        return dot(u, v) / (norm(u) * norm(v))

    total = graph_zero(a, b)
    for k in range(a.shape[0]):
        weights = [torch.exp(cos(a[k], b[j]) / temperature) for j in range(b.shape[0])]
        z = sum(weights)
        w = sum(weights[j] / z * b[j] for j in range(b.shape[0]))
        back = [torch.exp(cos(w, a[l]) / temperature) for l in range(a.shape[0])]
        total = total - torch.log(back[k] / sum(back))
    return total / a.shape[0], []


# ---- inputs -------------------------------------------------------------------------------------
# make_*(gen, shape) -> (args, kwargs, indices of the differentiable args); float64, CPU.


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def make_centroid_triplet(gen, shape):
    batch, num_ids, dim, in_batch = shape
    c = 0.5 * torch.randn(num_ids, dim, generator=gen, dtype=torch.float64)
    y = torch.randint(0, in_batch, (batch,), generator=gen)
    f = c[y] + 0.4 * torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    return [f, y, c], {}, (0, 2)


def make_center_separation(gen, shape):
    batch, dim, num_ids = shape
    centres = 0.4 * torch.randn(num_ids, dim, generator=gen, dtype=torch.float64)
    y = torch.cat([torch.arange(num_ids), torch.randint(0, num_ids, (batch - num_ids,), generator=gen)])
    f = centres[y] + 0.2 * torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    return [f, y], {}, (0,)


def make_part_diversity(gen, shape):
    return [torch.rand(shape, generator=gen, dtype=torch.float64)], {}, (0,)


def make_hard_instance_contrastive(gen, shape):
    batch, dim, num_ids = shape
    f = _unit(torch.randn(batch, dim, generator=gen, dtype=torch.float64))
    y = torch.randint(0, num_ids, (batch,), generator=gen)
    return [f, y], {}, (0,)


def make_modality_centroid_contrastive(gen, shape):
    batch, dim, num_ids = shape
    f = _unit(torch.randn(batch, dim, generator=gen, dtype=torch.float64))
    c = _unit(torch.randn(2, num_ids, dim, generator=gen, dtype=torch.float64))
    y = torch.randint(0, num_ids, (batch,), generator=gen)
    m = torch.randint(0, 2, (batch,), generator=gen)
    return [f, y, m, c], {}, (0, 3)


def make_channel_mix_margin(gen, shape):
    return [0.3 * torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3)], {}, (0, 1, 2)


def make_proxy_cycle(gen, shape):
    k, m, dim = shape
    a = torch.randn(k, dim, generator=gen, dtype=torch.float64)
    b = torch.randn(m, dim, generator=gen, dtype=torch.float64)
    return [a, b, 0.3], {}, (0, 1)


SPECS = {
    # name: (function, transcription, maker, shapes)
    "centroid_triplet": (losses.centroid_triplet, loop_centroid_triplet, make_centroid_triplet,
                         [(6, 4, 3, 3), (10, 7, 5, 4), (3, 3, 2, 2), (8, 12, 4, 12)]),
    "center_separation": (losses.center_separation, loop_center_separation, make_center_separation,
                          [(6, 3, 2), (9, 4, 4), (5, 2, 5), (4, 3, 1)]),
    "part_diversity": (losses.part_diversity, loop_part_diversity, make_part_diversity,
                       [(2, 2, 5), (3, 4, 6), (1, 3, 1), (2, 5, 3)]),
    "hard_instance_contrastive": (losses.hard_instance_contrastive, loop_hard_instance_contrastive,
                                  make_hard_instance_contrastive, [(8, 4, 3), (10, 5, 4), (6, 3, 2), (9, 4, 6)]),
    "modality_centroid_contrastive": (losses.modality_centroid_contrastive, loop_modality_centroid_contrastive,
                                      make_modality_centroid_contrastive, [(6, 4, 3), (5, 3, 1), (8, 5, 6)]),
    "channel_mix_margin": (losses.channel_mix_margin, loop_channel_mix_margin, make_channel_mix_margin,
                           [(5, 4), (1, 2), (7, 6)]),
    "proxy_cycle": (losses.proxy_cycle, loop_proxy_cycle, make_proxy_cycle, [(4, 4, 3), (3, 5, 4), (6, 2, 5)]),
}
# Per-case keyword arguments (besides the defaults), so non-default constants are exercised too.
CASE_KWARGS = {
    "centroid_triplet": [{}, dict(negatives="all"), dict(margin=0.6, negatives="batch"), dict(margin=0.1)],
    "center_separation": [{}, dict(rho1=0.1, rho2=1.0), dict(rho2=0.4), {}],
    "part_diversity": [{}, {}, {}, {}],
    "hard_instance_contrastive": [{}, dict(num_negatives=2), dict(num_negatives=1, temperature=0.5),
                                  dict(num_negatives=3, temperature=0.07)],
    "modality_centroid_contrastive": [{}, dict(temperature=0.5), dict(temperature=0.05)],
    "channel_mix_margin": [{}, dict(margin=0.3), dict(margin=1.0)],
    "proxy_cycle": [{}, {}, {}],
}
CASES = [(name, i, shape) for name, spec in SPECS.items() for i, shape in enumerate(spec[3])]
SEEDS = [0, 1, 2]


def well_posed(name, index, seed, clearance=1e-3):
    """Inputs (first seed from ``seed`` on) whose hinges and mining gaps all clear ``clearance``
    and whose loss is not 0 (some hinge active)."""
    _, loop, make, shapes = SPECS[name]
    kwargs = CASE_KWARGS[name][index]
    for attempt in range(200):
        args, extra, diff = make(torch.Generator().manual_seed(1000 * seed + attempt), shapes[index])
        extra = {**extra, **kwargs}
        value, kinks = loop(*args, **extra)
        if abs(value.item()) > clearance and all(abs(k) > clearance for k in kinks):
            return args, extra, diff
    raise AssertionError(f"no well-posed input for {name} {shapes[index]}")


def value_and_grads(fn, args, kwargs, diff, device="cpu", dtype=None):
    leaves = []
    for a in args:
        if isinstance(a, torch.Tensor):
            a = a.detach().to(device=device, dtype=dtype if (dtype is not None and a.is_floating_point()) else None)
        leaves.append(a)
    for i in diff:
        leaves[i] = leaves[i].clone().requires_grad_(True)
    out = fn(*leaves, **kwargs)
    value = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad(value, [leaves[i] for i in diff], allow_unused=True)
    grads = [torch.zeros_like(leaves[i]) if g is None else g for i, g in zip(diff, grads)]
    return value.detach().cpu(), [g.cpu() for g in grads]


# ---- 1. equation transcriptions: value, gradient, gradcheck ------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name, index, shape", CASES)
def test_matches_transcription(device, name, index, shape, seed):
    fn, loop, _, _ = SPECS[name]
    args, kwargs, diff = well_posed(name, index, seed)
    out, grads = value_and_grads(fn, args, kwargs, diff, device)
    ref, ref_grads = value_and_grads(loop, args, kwargs, diff)
    assert out.dim() == 0 and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, **F64)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **F64)
    assert any(g.abs().sum() > 0 for g in ref_grads)


@pytest.mark.parametrize("name, index, shape", CASES)
def test_gradcheck(device, name, index, shape):
    fn, _, _, _ = SPECS[name]
    args, kwargs, diff = well_posed(name, index, 7)
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    inputs = [args[i].clone().requires_grad_(True) for i in diff]

    def wrapped(*xs):
        full = list(args)
        for i, x in zip(diff, xs):
            full[i] = x
        return fn(*full, **kwargs)

    assert torch.autograd.gradcheck(wrapped, inputs, eps=1e-6, atol=1e-7)


def test_int32_labels_match_int64():
    args, _, _ = well_posed("centroid_triplet", 1, 0)
    f, y, c = args
    for negatives in ("batch", "all"):
        assert torch.equal(losses.centroid_triplet(f, y.int(), c, negatives=negatives),
                           losses.centroid_triplet(f, y, c, negatives=negatives))
    args, _, _ = well_posed("modality_centroid_contrastive", 0, 0)
    f, y, m, c = args
    assert torch.equal(losses.modality_centroid_contrastive(f, y.int(), m.int(), c),
                       losses.modality_centroid_contrastive(f, y, m, c))
    args, _, _ = well_posed("hard_instance_contrastive", 0, 0)
    assert torch.equal(losses.hard_instance_contrastive(args[0], args[1].int()),
                       losses.hard_instance_contrastive(*args))


def test_exported():
    assert reid_kernels.losses is losses
    assert "losses" in reid_kernels.__all__
    for name in losses.__all__:
        assert callable(getattr(losses, name))


# ---- 2. edge cases ------------------------------------------------------------------------------


def test_centroid_triplet_one_identity(device):
    gen = torch.Generator().manual_seed(3)
    c = torch.randn(4, 3, generator=gen, dtype=torch.float64).to(device)
    f = (c[0] + 0.8 * torch.randn(5, 3, generator=gen, dtype=torch.float64).to(device)).requires_grad_(True)
    y = torch.zeros(5, dtype=torch.int64, device=device)
    batch = losses.centroid_triplet(f, y, c, negatives="batch")
    assert batch.item() == 0.0
    batch.backward()  # still attached to the graph
    assert torch.equal(f.grad, torch.zeros_like(f))
    every = losses.centroid_triplet(f, y, c, negatives="all")
    ref, _ = loop_centroid_triplet(f.detach().cpu(), y.cpu(), c.cpu(), negatives="all")
    assert every.item() > 0.1
    torch.testing.assert_close(every.detach().cpu(), ref, **F64)


def test_centroid_triplet_single_centroid_row():
    f = torch.randn(3, 2, dtype=torch.float64)
    assert losses.centroid_triplet(f, torch.zeros(3, dtype=torch.int64), torch.zeros(1, 2, dtype=torch.float64),
                                   negatives="all").item() == 0.0


def test_centroid_triplet_samples_without_negative_count_in_mean():
    # One identity, "all", with one other centroid row at distance 1 and the own centroid at 0.9:
    # hinge = 0.9 - 1 + 0.3 = 0.2 for the sample; mean over 1 sample.  Then a batch with two
    # identities and "batch": both have negatives; nothing is dropped from the mean.
    c = torch.tensor([[0.0, 0.0], [1.9, 0.0]], dtype=torch.float64)
    f = torch.tensor([[0.9, 0.0]], dtype=torch.float64)
    assert math.isclose(losses.centroid_triplet(f, torch.tensor([0]), c, negatives="all").item(), 0.2, rel_tol=1e-12)
    assert losses.centroid_triplet(f, torch.tensor([0]), c, negatives="batch").item() == 0.0


def test_centroid_triplet_all_versus_batch():
    """The nearest other centroid (row 1) is absent from the batch: only "all" sees it."""
    c = torch.tensor([[0.0, 0.0], [0.5, 0.0], [3.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    f = torch.tensor([[0.2, 0.0], [2.9, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 2])
    # "all": sample 0: d+ = 0.2, nearest negative row 1 at 0.3 -> 0.2 - 0.3 + 0.3 = 0.2;
    #        sample 1: d+ = 0.1, nearest negative row 1 at 2.4 -> 0.
    # "batch": sample 0's only candidate is row 2 at 2.8 -> 0; sample 1: row 0 at 2.9 -> 0.
    assert math.isclose(losses.centroid_triplet(f, y, c, negatives="all").item(), 0.1, rel_tol=1e-12)
    assert losses.centroid_triplet(f, y, c, negatives="batch").item() == 0.0
    assert losses.centroid_triplet(f, y, c).item() == 0.0  # "batch" is the default


def test_centroid_triplet_gradient_into_centroids_only_when_asked():
    args, _, _ = well_posed("centroid_triplet", 0, 0)
    f, y, c = args
    f = f.clone().requires_grad_(True)
    losses.centroid_triplet(f, y, c).backward()
    assert f.grad is not None and c.grad is None


def test_center_separation_one_identity():
    gen = torch.Generator().manual_seed(5)
    f = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    y = torch.full((4,), 7)
    centre = f.mean(0)
    expected = torch.clamp((f - centre).norm(dim=1) - 0.01, min=0).mean()
    torch.testing.assert_close(losses.center_separation(f, y), expected, **F64)
    # rho2 only enters the second term: with one identity it has no effect.
    assert losses.center_separation(f, y, rho2=100.0).item() == losses.center_separation(f, y).item()


def test_center_separation_coinciding_centres_finite_gradient():
    f = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1])  # both centres at the origin: the push hinge is active at distance 0
    out = losses.center_separation(f, y)
    out.backward()
    assert math.isclose(out.item(), (1.0 - 0.01) + 0.7, rel_tol=1e-12)
    assert torch.isfinite(f.grad).all()


def test_hard_instance_fewer_negatives_than_requested():
    args, _, _ = well_posed("hard_instance_contrastive", 2, 0)  # 6 samples, 2 identities
    f, y = args
    most = max(int((y != v).sum()) for v in y.unique())
    everything = losses.hard_instance_contrastive(f, y, num_negatives=50)
    assert torch.equal(everything, losses.hard_instance_contrastive(f, y, num_negatives=most))
    torch.testing.assert_close(everything, loop_hard_instance_contrastive(f, y, num_negatives=50)[0], **F64)
    assert abs(everything.item() - losses.hard_instance_contrastive(f, y, num_negatives=1).item()) > 1e-3


def test_hard_instance_anchor_without_positive_left_out_of_the_mean():
    gen = torch.Generator().manual_seed(11)
    f = _unit(torch.randn(5, 4, generator=gen, dtype=torch.float64))
    y = torch.tensor([0, 0, 1, 1, 2])  # anchor 4 has no positive (but is a negative for the others)
    terms, _ = hic_terms(f, y)
    assert terms[4] is None
    out = losses.hard_instance_contrastive(f, y)
    torch.testing.assert_close(out, sum(terms[:4]) / 4, **F64)
    assert abs(out.item() - (sum(terms[:4]) / 5).item()) > 1e-3


def test_hard_instance_no_positive_at_all_is_zero_and_attached():
    f = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    out = losses.hard_instance_contrastive(f, torch.arange(4))
    assert out.dim() == 0 and out.item() == 0.0
    out.backward()
    assert torch.equal(f.grad, torch.zeros_like(f))


def test_hard_instance_positive_without_negative_is_zero():
    f = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    out = losses.hard_instance_contrastive(f, torch.zeros(4, dtype=torch.int64))
    assert out.item() == 0.0
    out.backward()
    assert torch.isfinite(f.grad).all()


def test_hard_instance_default_num_negatives_is_50():
    gen = torch.Generator().manual_seed(2)
    f = _unit(torch.randn(80, 6, generator=gen, dtype=torch.float64))
    y = torch.arange(4).repeat_interleave(20)  # 60 negatives per anchor: 50 of them are used
    out = losses.hard_instance_contrastive(f, y)
    ref, kinks = loop_hard_instance_contrastive(f, y)
    assert min(abs(k) for k in kinks) > 1e-6
    torch.testing.assert_close(out, ref, **F64)
    for other in (49, 51):
        assert abs(loop_hard_instance_contrastive(f, y, num_negatives=other)[0].item() - ref.item()) > 1e-6


def test_modality_single_identity():
    """No negatives: P = both centroids only (U empty)."""
    f = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    c = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    out = losses.modality_centroid_contrastive(f, torch.tensor([0]), torch.tensor([1]), c, temperature=1.0)
    s0, s1 = 1.0, 0.0
    expected = -0.5 * (s0 + s1 - 2 * math.log(math.exp(s0) + math.exp(s1)))
    assert math.isclose(out.item(), expected, rel_tol=1e-12)


def test_modality_uses_own_modality_negatives():
    f = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    c = torch.zeros(2, 2, 2, dtype=torch.float64)
    c[0, 1] = torch.tensor([5.0, 0.0])  # a visible negative: only a visible sample sees it
    y = torch.tensor([0])
    vis = losses.modality_centroid_contrastive(f, y, torch.tensor([0]), c, temperature=1.0)
    ir = losses.modality_centroid_contrastive(f, y, torch.tensor([1]), c, temperature=1.0)
    assert math.isclose(ir.item(), math.log(3.0), rel_tol=1e-12)  # three logits of 0
    assert math.isclose(vis.item(), math.log(2.0 + math.exp(5.0)), rel_tol=1e-12)


def test_part_diversity_identical_rows_finite_gradient(device):
    gen = torch.Generator().manual_seed(4)
    s = torch.rand(2, 3, 5, generator=gen, dtype=torch.float64)
    s[:, 1] = s[:, 0]
    s = s.to(device).requires_grad_(True)
    out = losses.part_diversity(s)
    out.backward()
    assert torch.isfinite(s.grad).all()
    # Pair (0, 1) contributes value 0 and gradient 0; the rest is the transcription without it.
    leaf = s.detach().cpu().requires_grad_(True)
    ref, _ = loop_part_diversity(leaf, skip={(0, 1)})
    ref.backward()
    torch.testing.assert_close(out.detach().cpu(), ref.detach(), **F64)
    torch.testing.assert_close(s.grad.cpu(), leaf.grad, **F64)


def test_part_diversity_two_identical_rows_zero():
    s = torch.full((1, 2, 4), 0.5, dtype=torch.float64, requires_grad=True)
    out = losses.part_diversity(s)
    out.backward()
    assert out.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


def test_part_diversity_constant_rows_known_value():
    # Rows 0 and 1 of a (1, 2, n) map differ by 1 at every pixel: RMS 1, loss -2/(2*1) * 1 = -1.
    s = torch.stack([torch.zeros(3), torch.ones(3)]).unsqueeze(0).double()
    assert losses.part_diversity(s).item() == -1.0


def test_channel_mix_margin_zero_inside_margin():
    gen = torch.Generator().manual_seed(6)
    fv = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    fi = fv + 0.05 * torch.randn(6, 4, generator=gen, dtype=torch.float64)
    fg = (fv + 0.05 * torch.randn(6, 4, generator=gen, dtype=torch.float64)).requires_grad_(True)
    out = losses.channel_mix_margin(fv, fi, fg)
    out.backward()
    assert out.item() == 0.0 and torch.equal(fg.grad, torch.zeros_like(fg))
    assert losses.channel_mix_margin(fv, fi, fg.detach(), margin=0.0).item() > 0


def test_channel_mix_margin_known_value():
    fv = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    fi = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    fg = torch.zeros(1, 2, dtype=torch.float64)
    assert math.isclose(losses.channel_mix_margin(fv, fi, fg).item(), 0.3 + 1.3, rel_tol=1e-12)


def test_proxy_cycle_identical_proxies_near_zero(device):
    gen = torch.Generator().manual_seed(8)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    a = (q[:4] * torch.tensor([[1.0], [2.0], [0.5], [3.0]], dtype=torch.float64)).to(device)  # orthogonal rows
    same = losses.proxy_cycle(a, a.clone(), 0.01)
    assert 0.0 <= same.item() < 1e-12
    b = torch.randn(5, 6, generator=gen, dtype=torch.float64).to(device)
    assert losses.proxy_cycle(a, b, 0.01).item() > 0.1
    assert losses.proxy_cycle(a, a.clone(), 1.0).item() > same.item()


def test_proxy_cycle_sizes_differ():
    a, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    out = losses.proxy_cycle(a, b, 0.2)
    torch.testing.assert_close(out, loop_proxy_cycle(a, b, 0.2)[0], **F64)
    assert out.dim() == 0


# ---- 3. the papers' constants -------------------------------------------------------------------
# The function is called with its defaults and compared with a transcription whose defaults are
# the paper's constants; the same transcription with one constant off by 1 % must differ by far
# more than the tolerance, so a 1 % error in that constant in the module would fail.

CONSTANTS = [
    ("centroid_triplet", 0, dict(margin=0.3 * 1.01)),
    ("centroid_triplet", 1, dict(margin=0.3 * 1.01)),  # the kwargs of case 1 set negatives="all"
    ("center_separation", 0, dict(rho1=0.01 * 1.01)),
    ("center_separation", 0, dict(rho2=0.7 * 1.01)),
    ("part_diversity", 1, dict(factor=lambda p: 1.01 * 2.0 / (p * (p - 1)))),
    ("hard_instance_contrastive", 0, dict(temperature=0.15 * 1.01)),
    ("modality_centroid_contrastive", 0, dict(temperature=0.1 * 1.01)),
    ("modality_centroid_contrastive", 0, dict(half=0.5 * 1.01)),
    ("channel_mix_margin", 0, dict(margin=0.7 * 1.01)),
    ("proxy_cycle", 0, dict(temperature=0.3 * 1.01)),  # temperature passed as 0.3 to both
]


@pytest.mark.parametrize("name, index, perturbed", CONSTANTS)
def test_paper_constants(name, index, perturbed):
    fn, loop, _, _ = SPECS[name]
    args, kwargs, _ = well_posed(name, index, 0)
    out = fn(*args, **kwargs)
    ref, _ = loop(*args, **kwargs)
    torch.testing.assert_close(out, ref, **F64)
    if name == "proxy_cycle":
        args = args[:2]
    off, _ = loop(*args, **{**kwargs, **perturbed})
    assert abs(off.item() - ref.item()) > 1e-5 * max(1.0, abs(ref.item())), "inputs do not depend on the constant"


def test_default_signatures():
    import inspect

    def defaults(fn):
        return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}

    assert defaults(losses.centroid_triplet) == dict(margin=0.3, negatives="batch")
    assert defaults(losses.center_separation) == dict(rho1=0.01, rho2=0.7)
    assert defaults(losses.hard_instance_contrastive) == dict(num_negatives=50, temperature=0.15)
    assert defaults(losses.modality_centroid_contrastive) == dict(temperature=0.1)
    assert defaults(losses.channel_mix_margin) == dict(margin=0.7)
    assert defaults(losses.proxy_cycle) == {}


# ---- 4. float32 against float64 -----------------------------------------------------------------
# Tolerances are about 10x the largest error measured over these cases with 10 seeds each on the
# CPU (the test runs 3): max abs error of the float32 value / gradient against float64, float64
# inputs rounded to float32.  The contrastive losses carry logits f.f/tau up to about 15
# (tau = 0.07 .. 0.15), hence their larger absolute errors.
FLOAT32_TOLERANCE = {
    "centroid_triplet": 1e-6,  # measured: value 6.5e-8, grad 8.1e-8
    "center_separation": 1e-6,  # measured: value 5.8e-8, grad 8.0e-8
    "part_diversity": 5e-7,  # measured: value 5.2e-8, grad 2.0e-8
    "hard_instance_contrastive": 2e-5,  # measured: value 1.7e-6, grad 2.0e-6
    "modality_centroid_contrastive": 2e-5,  # measured: value 1.0e-6, grad 2.0e-6
    "channel_mix_margin": 2e-6,  # measured: value 1.6e-7, grad 1.3e-7
    "proxy_cycle": 2e-5,  # measured: value 2.7e-7, grad 1.6e-6
}


@pytest.mark.parametrize("name, index, shape", CASES)
def test_float32_matches_float64(device, name, index, shape):
    fn, _, _, _ = SPECS[name]
    tol = FLOAT32_TOLERANCE[name]
    for seed in SEEDS:
        args, kwargs, diff = well_posed(name, index, seed)
        out32, grads32 = value_and_grads(fn, args, kwargs, diff, device, torch.float32)
        out64, grads64 = value_and_grads(fn, args, kwargs, diff, device)
        assert out32.dtype == torch.float32
        torch.testing.assert_close(out32.double(), out64, rtol=0, atol=tol)
        for g32, g64 in zip(grads32, grads64):
            assert g32.dtype == torch.float32
            torch.testing.assert_close(g32.double(), g64, rtol=0, atol=tol)


# ---- 5. bad input -------------------------------------------------------------------------------


def _ct():
    f = torch.randn(4, 3)
    return dict(features=f, labels=torch.tensor([0, 1, 1, 2]), centroids=torch.randn(5, 3))


def _cs():
    return dict(features=torch.randn(4, 3), labels=torch.tensor([0, 1, 1, 2]))


def _pd():
    return dict(similarity=torch.rand(2, 3, 4))


def _hic():
    return dict(features=torch.randn(4, 3), labels=torch.tensor([0, 1, 1, 0]))


def _mcc():
    return dict(features=torch.randn(4, 3), labels=torch.tensor([0, 1, 1, 2]), modalities=torch.tensor([0, 1, 0, 1]),
                centroids=torch.randn(2, 3, 3))


def _cmm():
    return dict(f_visible=torch.randn(4, 3), f_infrared=torch.randn(4, 3), f_generated=torch.randn(4, 3))


def _pc():
    return dict(proxies_a=torch.randn(4, 3), proxies_b=torch.randn(5, 3), temperature=0.1)


def _set(**changes):
    return lambda d: d.update(changes)


BAD = [
    # centroid_triplet
    (losses.centroid_triplet, _ct, _set(features=[[0.0] * 3] * 4), TypeError, "features: expected a torch.Tensor"),
    (losses.centroid_triplet, _ct, _set(features=torch.randn(4)), ValueError, "features: expected a 2-D"),
    (losses.centroid_triplet, _ct, _set(features=torch.ones(4, 3, dtype=torch.int64)), TypeError,
     "features: expected a floating"),
    (losses.centroid_triplet, _ct, _set(features=torch.randn(4, 3).half()), TypeError, "features: expected dtype in"),
    (losses.centroid_triplet, _ct, _set(features=torch.randn(0, 3)), ValueError, "features: expected a non-empty"),
    (losses.centroid_triplet, _ct, _set(centroids=torch.randn(5, 2)), ValueError,
     r"centroids: expected shape \(num_ids, d\) with d = 3"),
    (losses.centroid_triplet, _ct, _set(centroids=torch.randn(5, 3).double()), TypeError,
     "centroids: expected dtype torch.float32"),
    (losses.centroid_triplet, _ct, _set(centroids=torch.ones(5, 3, dtype=torch.int64)), TypeError,
     "centroids: expected"),
    (losses.centroid_triplet, _ct, _set(centroids=torch.randn(5, 3, 1)), ValueError, "centroids: expected a 2-D"),
    (losses.centroid_triplet, _ct, _set(labels=torch.tensor([0.0, 1.0, 1.0, 2.0])), TypeError,
     "labels: expected an int64"),
    (losses.centroid_triplet, _ct, _set(labels=[0, 1, 1, 2]), TypeError, "labels: expected a torch.Tensor"),
    (losses.centroid_triplet, _ct, _set(labels=torch.tensor([0, 1, 1])), ValueError, r"labels: expected shape \(4,\)"),
    (losses.centroid_triplet, _ct, _set(labels=torch.tensor([[0, 1, 1, 2]])), ValueError, "labels: expected shape"),
    (losses.centroid_triplet, _ct, _set(labels=torch.tensor([0, 1, 5, 2])), IndexError,
     r"labels: expected values in \[0, 5\).*got 5 at position 2"),
    (losses.centroid_triplet, _ct, _set(labels=torch.tensor([0, -1, 1, 2])), IndexError, "labels: expected values"),
    (losses.centroid_triplet, _ct, _set(negatives="bogus"), ValueError, "negatives: expected 'batch' or 'all'"),
    (losses.centroid_triplet, _ct, _set(margin=float("nan")), ValueError, "margin: expected a finite"),
    (losses.centroid_triplet, _ct, _set(margin="0.3"), TypeError, "margin: expected a float"),
    # center_separation
    (losses.center_separation, _cs, _set(features=torch.ones(4, 3, dtype=torch.int32)), TypeError,
     "features: expected a floating"),
    (losses.center_separation, _cs, _set(labels=torch.tensor([0, 1])), ValueError, "labels: expected shape"),
    (losses.center_separation, _cs, _set(labels=torch.tensor([0, 1, 1, 2], dtype=torch.int16)), TypeError,
     "labels: expected an int64"),
    (losses.center_separation, _cs, _set(rho1=float("inf")), ValueError, "rho1: expected a finite"),
    (losses.center_separation, _cs, _set(rho2=None), TypeError, "rho2: expected a float"),
    # part_diversity
    (losses.part_diversity, _pd, _set(similarity=torch.rand(2, 1, 4)), ValueError,
     r"similarity: expected shape \(B, p, n\) with p >= 2"),
    (losses.part_diversity, _pd, _set(similarity=torch.rand(3, 4)), ValueError, "similarity: expected a 3-D"),
    (losses.part_diversity, _pd, _set(similarity=torch.ones(2, 3, 4, dtype=torch.int64)), TypeError,
     "similarity: expected a floating"),
    (losses.part_diversity, _pd, _set(similarity="S"), TypeError, "similarity: expected a torch.Tensor"),
    # hard_instance_contrastive
    (losses.hard_instance_contrastive, _hic, _set(num_negatives=0), ValueError, "num_negatives: expected an int >= 1"),
    (losses.hard_instance_contrastive, _hic, _set(num_negatives=2.0), TypeError, "num_negatives: expected an int"),
    (losses.hard_instance_contrastive, _hic, _set(num_negatives=True), TypeError, "num_negatives: expected an int"),
    (losses.hard_instance_contrastive, _hic, _set(temperature=0.0), ValueError,
     "temperature: expected a finite value > 0"),
    (losses.hard_instance_contrastive, _hic, _set(temperature=-0.15), ValueError, "temperature: expected"),
    (losses.hard_instance_contrastive, _hic, _set(temperature="0.15"), TypeError, "temperature: expected a positive"),
    (losses.hard_instance_contrastive, _hic, _set(labels=torch.tensor([0, 1, 1, 0]).float()), TypeError, "labels"),
    (losses.hard_instance_contrastive, _hic, _set(features=torch.randn(2, 4, 3)), ValueError,
     "features: expected a 2-D"),
    # modality_centroid_contrastive
    (losses.modality_centroid_contrastive, _mcc, _set(modalities=torch.tensor([0, 1, 2, 1])), ValueError,
     r"modalities: expected values in \{0, 1\}.*got 2 at position 2"),
    (losses.modality_centroid_contrastive, _mcc, _set(modalities=torch.tensor([0, -1, 0, 1])), ValueError,
     "modalities"),
    (losses.modality_centroid_contrastive, _mcc, _set(modalities=torch.tensor([0.0, 1.0, 0.0, 1.0])), TypeError,
     "modalities: expected an int64"),
    (losses.modality_centroid_contrastive, _mcc, _set(modalities=torch.tensor([0, 1])), ValueError,
     r"modalities: expected shape \(4,\)"),
    (losses.modality_centroid_contrastive, _mcc, _set(centroids=torch.randn(3, 3, 3)), ValueError,
     r"centroids: expected shape \(2, num_ids, 3\)"),
    (losses.modality_centroid_contrastive, _mcc, _set(centroids=torch.randn(3, 3)), ValueError,
     r"centroids: expected shape \(2, num_ids, 3\)"),
    (losses.modality_centroid_contrastive, _mcc, _set(centroids=torch.randn(2, 3, 4)), ValueError,
     r"centroids: expected shape \(2, num_ids, 3\)"),
    (losses.modality_centroid_contrastive, _mcc, _set(centroids=torch.randn(2, 3, 3).double()), TypeError,
     "centroids: expected dtype"),
    (losses.modality_centroid_contrastive, _mcc, _set(labels=torch.tensor([0, 1, 3, 2])), IndexError,
     r"labels: expected values in \[0, 3\)"),
    (losses.modality_centroid_contrastive, _mcc, _set(temperature=0), ValueError, "temperature"),
    # channel_mix_margin
    (losses.channel_mix_margin, _cmm, _set(f_infrared=torch.randn(4, 2)), ValueError,
     r"f_infrared: expected shape \(4, 3\)"),
    (losses.channel_mix_margin, _cmm, _set(f_generated=torch.randn(3, 3)), ValueError, "f_generated: expected shape"),
    (losses.channel_mix_margin, _cmm, _set(f_generated=torch.randn(4, 3).double()), TypeError,
     "f_generated: expected dtype"),
    (losses.channel_mix_margin, _cmm, _set(f_visible=torch.ones(4, 3, dtype=torch.int64)), TypeError,
     "f_visible: expected a floating"),
    (losses.channel_mix_margin, _cmm, _set(margin=float("-inf")), ValueError, "margin"),
    # proxy_cycle
    (losses.proxy_cycle, _pc, _set(temperature=0.0), ValueError, "temperature: expected a finite value > 0"),
    (losses.proxy_cycle, _pc, _set(temperature=float("nan")), ValueError, "temperature"),
    (losses.proxy_cycle, _pc, _set(proxies_b=torch.randn(5, 4)), ValueError, r"proxies_b: expected shape \(M, d\)"),
    (losses.proxy_cycle, _pc, _set(proxies_a=torch.randn(4)), ValueError, "proxies_a: expected a 2-D"),
    (losses.proxy_cycle, _pc, _set(proxies_b=torch.randn(5, 3).double()), TypeError, "proxies_b: expected dtype"),
]


@pytest.mark.parametrize("fn, good, mutate, error, match", BAD)
def test_bad_input(fn, good, mutate, error, match):
    args = good()
    fn(**args)  # the unmodified arguments are accepted
    mutate(args)
    with pytest.raises(error, match=match):
        fn(**args)


def test_proxy_cycle_temperature_is_required():
    with pytest.raises(TypeError, match="temperature"):
        losses.proxy_cycle(torch.randn(2, 3), torch.randn(2, 3))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices_rejected():
    with pytest.raises(ValueError, match="labels: expected a tensor on cuda"):
        losses.centroid_triplet(torch.randn(2, 3, device="cuda"), torch.tensor([0, 1]),
                                torch.randn(2, 3, device="cuda"))
