"""PEA (our design from the abstract) on the recipe interface: each term against a transcription
of the design, the switches, training, resume, DDP."""
import os

import pytest
import torch
import torch.nn.functional as F
from ddp_util import rank_env, run_ranks

from train_helpers import (H, W, assert_same_state, make_trainer, small_config, straight_and_resumed, tiny_synth,
                           train_and_evaluate)

from reid_kernels.training.data import Batch
from reid_kernels.training.recipes import PEARecipe, build_model
from reid_kernels.training.recipes.lba import batch_hard_triplet


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return tiny_synth(tmp_path_factory, "synth_pea", seed=9)


def pea_config(root=None, out="runs/unused", **updates):
    return small_config("pea_synth", root, out, **{"optim.lr_backbone": 0.05, "optim.milestones": [], **updates})


def _step(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 0, 3, 3])
    batch = Batch({m: torch.randn(4, 3, H, W, generator=gen) for m in ("visible", "infrared")},
                  {m: labels for m in ("visible", "infrared")})
    return batch, model(batch.images)


def cycle_transcription(a, b, tau):
    """Cycle-back classification, literally: a_k -> soft nearest b -> back to a; -mean log p(k)."""
    loss = 0.0
    for k in range(a.shape[0]):
        alpha = torch.stack([F.cosine_similarity(a[k], b[j], dim=0) / tau for j in range(b.shape[0])]).softmax(0)
        back = sum(alpha[j] * b[j] for j in range(b.shape[0]))
        beta = torch.stack([F.cosine_similarity(back, a[l], dim=0) / tau for l in range(a.shape[0])]).softmax(0)
        loss = loss - torch.log(beta[k])
    return loss / a.shape[0]


def test_every_term_matches_a_transcription_of_the_design():
    torch.manual_seed(0)
    cfg = pea_config()
    model = build_model(cfg, 5, log=lambda *_: None)
    with torch.no_grad():
        model.extras.visible.normal_()
        model.extras.infrared.normal_()
    recipe = PEARecipe(cfg, 5)
    batch, out = _step(model)
    total, logs = recipe.losses(model, batch, out)
    y = batch.all_labels()
    f = F.normalize(out.bn.detach(), dim=1)
    wv, wi = model.extras.visible.detach(), model.extras.infrared.detach()
    tau = 0.5  # the default (pea_synth.yaml)
    intra, inter = 0.0, 0.0
    for i in range(8):
        own, other = (wv, wi) if i < 4 else (wi, wv)  # rows 0-3 visible, 4-7 infrared
        s_own = torch.stack([F.cosine_similarity(f[i], own[k], dim=0) for k in range(5)]) / tau
        s_other = torch.stack([F.cosine_similarity(f[i], other[k], dim=0) for k in range(5)]) / tau
        intra = intra - s_own.log_softmax(0)[y[i]] / 8
        inter = inter - s_other.log_softmax(0)[y[i]] / 8
    cycle = cycle_transcription(wi, wv, tau) + cycle_transcription(wv, wi, tau)  # IR->RGB->IR, RGB->IR->RGB
    ce = F.cross_entropy(out.logits.detach(), y)
    tri = batch_hard_triplet(out.pooled.detach(), y, 0.3)
    for name, value in (("intra", intra), ("inter", inter), ("cycle", cycle), ("ce", ce), ("tri", tri)):
        assert float(logs[name]) == pytest.approx(float(value), rel=1e-5), name
    assert float(total.detach()) == pytest.approx(float(ce + tri + intra + inter + cycle), rel=1e-5)


def test_cycle_term_is_minimal_when_the_proxy_sets_are_equal():
    torch.manual_seed(1)
    w = torch.linalg.qr(torch.randn(16, 6))[0].t()  # 6 orthonormal proxies
    equal = cycle_transcription(w, w, 0.01)
    assert float(equal) < 1e-6
    assert float(cycle_transcription(w, torch.randn(6, 16), 0.01)) > 0.1


@pytest.mark.parametrize("intra, inter, cycle", [(False, False, False), (True, False, False), (False, True, False),
                                                 (False, False, True), (True, True, True)])
def test_every_switch_runs_and_backpropagates(intra, inter, cycle):
    cfg = pea_config(**{"loss.intra": intra, "loss.inter": inter, "loss.cycle": cycle})
    torch.manual_seed(0)
    model = build_model(cfg, 5, log=lambda *_: None)
    recipe = PEARecipe(cfg, 5)
    batch, out = _step(model)
    loss, logs = recipe.losses(model, batch, out)
    loss.backward()
    assert torch.isfinite(loss)
    assert ("intra" in logs, "inter" in logs, "cycle" in logs) == (intra, inter, cycle)
    has_proxies = intra or inter or cycle
    assert (getattr(model, "extras", None) is not None) == has_proxies
    if has_proxies:
        assert model.extras.visible.grad is not None and model.extras.visible.grad.abs().sum() > 0


@pytest.mark.slow
def test_pea_trains_with_falling_loss_and_beats_the_untrained_network(synth_root, tmp_path):
    cfg = pea_config(synth_root, str(tmp_path / "run"), **{"train.epochs": 8, "optim.milestones": [6]})
    before, after, losses, history = train_and_evaluate(cfg, synth_root)
    print(f"PEA mAP untrained {before:.3f} -> trained {after:.3f}; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.8 * losses[0]
    assert after > before + 0.10, (before, after)


@pytest.mark.slow
def test_resume_is_bit_exact_with_the_proxies(synth_root, tmp_path):
    straight, second = straight_and_resumed(lambda out, **u: pea_config(synth_root, out, **u), tmp_path)
    assert "extras.visible" in straight.model.state_dict()
    assert_same_state(straight.model.state_dict(), second.model.state_dict())


def _ddp_worker(rank, world, port, root, out, queue):
    os.environ.update(rank_env(rank, world, port))
    try:
        trainer = make_trainer(pea_config(root, out, **{"train.epochs": 1, "train.max_steps_per_epoch": 2}))
        trainer.fit()
        proxies = trainer.model.extras.infrared.detach().numpy().copy()
        trainer.close()
        queue.put((rank, proxies))
    except Exception as error:  # report, so the parent fails with the reason instead of hanging
        queue.put((rank, repr(error)))


@pytest.mark.slow
def test_ddp_two_processes_keep_the_proxies_identical(synth_root, tmp_path):
    results = run_ranks(_ddp_worker, (synth_root, str(tmp_path / "ddp")))
    assert (results[0] == results[1]).all()
