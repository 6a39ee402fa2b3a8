"""PECA on the recipe interface: ICAL images against eq. 2, GSL's stop-gradient, the centroid
memory against the closed form of eq. 9, every loss against a transcription of its equation,
the ablation switches, training, resume, DDP and the CLI."""
import os

import pytest
import torch
import torch.nn.functional as F
from ddp_util import rank_env, run_ranks

from train_helpers import H, W, assert_same_state, make_trainer, small_config, straight_and_resumed, tiny_synth
from train_helpers import cli_train_then_evaluate, train_and_evaluate

from reid_kernels.training.data import (Batch, BatchSpec, ICAL_VARIANTS, ImageCache, ModalityDataset, TrainTransform, ical_image,
                           ical_mix, load_trainset, normalize)
from reid_kernels.training.models import ModelOutput
from reid_kernels.training.recipes import PECARecipe, build_model
from reid_kernels.training.recipes.base import TrainContext
from reid_kernels.training.recipes.peca import (ABLATION, ablation_updates, local_features, part_crops,
                                   weighted_regularized_triplet)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return tiny_synth(tmp_path_factory, "synth_peca", seed=11)


def peca_config(root=None, out="runs/unused", **updates):
    return small_config("peca_synth", root, out, **{"optim.milestones": [], **updates})


def quiet_model(cfg, num_classes=6):
    return build_model(cfg, num_classes, log=lambda *_: None)


# --- ICAL (eq. 2) -------------------------------------------------------------------------------

# Eq. 2's table, written out: per variant, the source of the output R, G, B channels.
EQ2 = {"RG": ("v_r", "v_g", "ir"), "RB": ("v_r", "ir", "v_b"), "GB": ("ir", "v_g", "v_b"),
       "R": ("v_r", "ir", "ir"), "G": ("ir", "v_g", "ir"), "B": ("ir", "ir", "v_b")}


def _images(seed=0, size=(3, 6, 5)):
    g = torch.Generator().manual_seed(seed)
    visible = torch.randint(0, 256, size, generator=g, dtype=torch.uint8)
    ir = torch.randint(0, 256, size[1:], generator=g, dtype=torch.uint8)
    return visible, ir


@pytest.mark.parametrize("variant", sorted(EQ2))
def test_ical_image_is_the_channel_recipe_of_eq2(variant):
    visible, ir = _images()
    sources = {"v_r": visible[0], "v_g": visible[1], "v_b": visible[2], "ir": ir}
    expected = torch.stack([sources[s] for s in EQ2[variant]])
    assert torch.equal(ical_mix(visible, ir.expand(3, -1, -1).contiguous(), variant), expected)
    assert set(ICAL_VARIANTS) == set(EQ2)


def test_ical_takes_the_luma_of_a_three_channel_infrared_image():
    visible, _ = _images(1)
    ir3 = torch.tensor([[[10, 200]], [[20, 100]], [[30, 0]]], dtype=torch.uint8)  # unequal channels
    luma = (0.299 * ir3[0].float() + 0.587 * ir3[1].float() + 0.114 * ir3[2].float()).round().to(torch.uint8)
    out = ical_mix(visible[:, :1, :2].contiguous(), ir3, "R")
    assert torch.equal(out[1], luma) and torch.equal(out[2], luma)
    with pytest.raises(ValueError, match="variant"):
        ical_mix(visible, visible, "RGB")
    with pytest.raises(ValueError, match="visible, infrared"):
        ical_mix(visible, visible[:, :2], "R")


def test_ical_draws_the_six_variants_uniformly():
    visible, ir = _images(2)
    ir3 = ir.expand(3, -1, -1).contiguous()
    g = torch.Generator().manual_seed(0)
    made = [ical_image(visible, ir3, g) for _ in range(3000)]
    counts = {v: sum(torch.equal(m, ical_mix(visible, ir3, v)) for m in made) for v in EQ2}
    assert sum(counts.values()) == 3000
    # 500 expected each; a binomial standard deviation is ~20, so 5 sigma is ~100
    assert all(400 < n < 600 for n in counts.values()), counts


def test_dataset_makes_one_generated_image_per_visible_image_from_the_slots_pair(synth_root):
    trainset = load_trainset("synth", synth_root)
    plain = TrainTransform(flip=0.0, pad=0, erasing=0.0, channel_aug="none")
    images = ImageCache(H, W, keep=False)
    spec = BatchSpec(("visible", "infrared", "auxiliary"), "ical")
    with_ical = ModalityDataset(trainset, plain, images, spec)
    without = ModalityDataset(trainset, TrainTransform(), images)
    slot = (3, 5, 1234)
    items, modalities = with_ical[slot]
    assert modalities == ("visible", "infrared", "auxiliary")
    (vis, yv), (ir, yi), (gen, yg) = items
    raw_v = images.get(trainset.visible.paths[3])
    raw_i = images.get(trainset.infrared.paths[5])
    candidates = [normalize(ical_mix(raw_v, raw_i, v)) for v in EQ2]
    assert any(torch.equal(gen, c) for c in candidates)
    assert yg == yv == int(trainset.visible.labels[3])
    # adding the derived modality leaves the slot's real images unchanged (augmented ones too)
    augmenting = ModalityDataset(trainset, TrainTransform(flip=0.5, pad=2, erasing=0.5, channel_aug="exchange"),
                                 images, spec)
    real = ModalityDataset(trainset, TrainTransform(flip=0.5, pad=2, erasing=0.5, channel_aug="exchange"), images)
    a, b = augmenting[slot][0], real[slot][0]
    assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[1][0], b[1][0])
    assert without[slot][1] == ("visible", "infrared")


# --- GSL (eq. 1) --------------------------------------------------------------------------------


def test_part_crops_are_top_centre_and_bottom_thirds():
    x = torch.arange(64, dtype=torch.float32).view(1, 1, 64, 1).expand(2, 3, 64, 4)
    upper, middle, lower = part_crops(x)
    assert [c.shape[-2] for c in (upper, middle, lower)] == [21, 21, 21]
    assert [float(c[0, 0, 0, 0]) for c in (upper, middle, lower)] == [0.0, 21.0, 43.0]
    thirds = part_crops(torch.arange(288.0).view(1, 1, 288, 1))
    assert [float(c[0, 0, 0, 0]) for c in thirds] == [0.0, 96.0, 192.0] and thirds[2].shape[-2] == 96
    assert all(c.shape[-2:] == (64, 4) for c in part_crops(x, resize=True))


def _batch(seed=0, modalities=("visible", "infrared", "auxiliary"), labels=(0, 0, 3, 3)):
    gen = torch.Generator().manual_seed(seed)
    y = torch.tensor(labels)
    return Batch({m: torch.randn(len(labels), 3, H, W, generator=gen) for m in modalities}, {m: y for m in modalities})


def test_gsl_local_branch_gets_no_gradient_and_keeps_the_running_statistics():
    torch.manual_seed(0)
    cfg = peca_config(**{"loss.ins": False, "loss.mod": False, "loss.ical": False, "model.stems": 2})
    model = quiet_model(cfg)
    model.train()
    recipe = PECARecipe(cfg, 6)
    batch = _batch(modalities=("visible", "infrared"))
    out = model(batch.images)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    local = local_features(model, batch)
    assert not local.requires_grad
    assert all(torch.equal(stats[k], v) for k, v in model.state_dict().items() if k in stats)
    total, logs = recipe.losses(model, batch, out)
    # the gradient of CE + L_sim equals that of CE - cos(f^g, constant target): nothing flows through the parts
    sim = -(F.normalize(out.extras["projected"], dim=1) * F.normalize(local, dim=1)).sum(1).mean()
    assert float(logs["sim"]) == pytest.approx(float(sim.detach()), rel=1e-6)
    ce = F.cross_entropy(out.logits[:4], batch.labels["visible"]) + F.cross_entropy(out.logits[4:],
                                                                                     batch.labels["infrared"])
    params = [p for p in model.parameters() if p.requires_grad]
    expected = torch.autograd.grad(ce + sim, params, retain_graph=True, allow_unused=True)
    grads = torch.autograd.grad(total, params, allow_unused=True)
    for a, b in zip(grads, expected):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind, layers", [("bn", (torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU,
                                                    torch.nn.Linear)), ("linear", (torch.nn.Linear, torch.nn.Linear))])
def test_gsl_has_three_separate_mlps_of_the_chosen_shape(kind, layers):
    cfg = peca_config(**{"loss.gsl_mlp": kind})
    model = quiet_model(cfg)
    mlps = model.extras.parts
    assert len(mlps) == 3 and len({id(m[0].weight) for m in mlps}) == 3
    assert tuple(type(layer) for layer in mlps[0]) == layers
    d = model.feat_dim
    assert mlps[0][0].in_features == d and mlps[0][-1].out_features == d
    assert mlps[0][0].out_features == round(0.25 * d)


# --- losses against their equations (synthetic model outputs) -----------------------------------


def _fake_output(batch, num_classes, dim=8, seed=0, projected=True):
    gen = torch.Generator().manual_seed(seed)
    rows = batch.num_images()
    pooled = torch.randn(rows, dim, generator=gen).requires_grad_()
    logits = torch.randn(rows, num_classes, generator=gen).requires_grad_()
    real = sum(batch.labels[m].numel() for m in batch.modalities if m != "auxiliary")
    bn = torch.randn(rows, dim, generator=gen).requires_grad_()
    extras = {"projected": torch.randn(real, 3 * dim, generator=gen)} if projected else None
    return ModelOutput(None, None, pooled, logits, bn, extras)


def _recipe(num_classes=6, dim=8, **updates):
    cfg = peca_config(**updates)
    cfg["model"]["width"] = dim // 8  # feature_dim(depth 10, width) = 8 * width
    return PECARecipe(cfg, num_classes)


def ins_transcription(f, y, q, tau):
    """Eq. 6 literally: hardest (farthest) positive, the q nearest negatives, a softmax over them."""
    loss, count = 0.0, 0
    for i in range(len(y)):
        pos = [j for j in range(len(y)) if j != i and y[j] == y[i]]
        neg = sorted((j for j in range(len(y)) if y[j] != y[i]), key=lambda j: float((f[i] - f[j]).norm()))[:q]
        if not pos:
            continue
        p = max(pos, key=lambda j: float((f[i] - f[j]).norm()))
        terms = torch.stack([f[i] @ f[k] / tau for k in [p] + neg])
        loss, count = loss - (terms[0] - torch.logsumexp(terms, 0)), count + 1
    return loss / count


def mod_transcription(f, y, modality, centroids, tau):
    """Eq. 10 literally: P = both centroids of y_i, U = the other identities' own-modality centroids."""
    loss = 0.0
    for i in range(len(y)):
        positives = [centroids[0, y[i]], centroids[1, y[i]]]
        negatives = [centroids[modality[i], k] for k in range(centroids.shape[1]) if k != y[i]]
        denominator = torch.logsumexp(torch.stack([f[i] @ c / tau for c in positives + negatives]), 0)
        loss = loss - sum(f[i] @ c / tau - denominator for c in positives) / len(positives)
    return loss / len(y)


@pytest.mark.parametrize("feature", ["bnneck", "pooled"])
def test_every_term_and_the_total_match_their_equations(feature):
    labels = (0, 0, 1, 1, 4, 4)
    batch = _batch(1, labels=labels)
    recipe = _recipe(**{"loss.gsl": False, "loss.feature": feature})
    recipe.memory.memory("v").copy_(torch.randn(6, 8))
    recipe.memory.memory("ir").copy_(torch.randn(6, 8))
    out = _fake_output(batch, 6, projected=False)
    total, logs = recipe.losses(None, batch, out)
    f = F.normalize((out.bn if feature == "bnneck" else out.pooled).detach(), dim=1)
    y = batch.all_labels()
    n = len(labels)
    fv, fi, fg = f[:n], f[n:2 * n], f[2 * n:]
    real, y_real = f[:2 * n], y[:2 * n]
    logits = out.logits.detach()
    ce = F.cross_entropy(logits[:n], y[:n]) + F.cross_entropy(logits[n:2 * n], y[n:2 * n])  # eq. 4
    ins = ins_transcription(real, y_real, 50, 0.15)
    centroids = torch.stack([recipe.memory.memory("v"), recipe.memory.memory("ir")])
    mod = mod_transcription(real, y_real, [0] * n + [1] * n, centroids, 0.10)
    mix = sum(max(float((fv[i] - fg[i]).norm()) - 0.7, 0) + max(float((fi[i] - fg[i]).norm()) - 0.7, 0)
              for i in range(n)) / n  # eq. 3, hinge reading
    assert mix > 0.1  # random unit vectors: the hinge is active, so the margin matters
    # float32: the recipe and the transcriptions agree to 1.2e-7 relative (measured); a 1% error in
    # tau_ins, tau_mod, lambda_m or m changes a term by far more than 1e-5
    for name, value in (("ce", ce), ("ins", ins), ("mod", mod), ("mix", mix)):
        assert float(logs[name]) == pytest.approx(float(value), rel=1e-5), name
    assert float(total) == pytest.approx(float(ce + ins + 0.5 * mod + mix), rel=1e-5)  # eq. 11


def test_hard_negative_set_is_the_nearest_num_negatives():
    batch = _batch(2, modalities=("visible", "infrared"), labels=(0, 0, 1, 2, 3, 5))
    recipe = _recipe(**{"loss.gsl": False, "loss.mod": False, "loss.ical": False, "model.stems": 2,
                        "loss.num_negatives": 2})
    out = _fake_output(batch, 6, projected=False)
    _, logs = recipe.losses(None, batch, out)
    f = F.normalize(out.bn.detach(), dim=1)
    y = batch.all_labels()
    assert float(logs["ins"]) == pytest.approx(float(ins_transcription(f, y, 2, 0.15)), rel=1e-5)
    assert float(logs["ins"]) != pytest.approx(float(ins_transcription(f, y, 3, 0.15)), rel=1e-3)


def test_generated_images_are_classified_only_with_ce_generated():
    batch = _batch(3)
    out = _fake_output(batch, 6, projected=False)
    y, logits = batch.all_labels(), out.logits.detach()
    plain = _recipe(**{"loss.gsl": False}).losses(None, batch, out)[1]["ce"]
    with_gen = _recipe(**{"loss.gsl": False, "loss.ce_generated": True}).losses(None, batch, out)[1]["ce"]
    assert float(with_gen - plain) == pytest.approx(float(F.cross_entropy(logits[8:], y[8:])), rel=1e-5)


def wrt_transcription(x, y):
    """AGW's weighted regularised triplet, one anchor at a time."""
    loss = 0.0
    for i in range(len(y)):
        d = torch.stack([(x[i] - x[j]).pow(2).sum().clamp_min(1e-12).sqrt() for j in range(len(y))])
        pos = torch.tensor([bool(y[j] == y[i]) for j in range(len(y))])
        wp = torch.softmax(d[pos], 0)
        wn = torch.softmax(-d[~pos], 0)
        loss = loss + F.softplus((wp * d[pos]).sum() - (wn * d[~pos]).sum())
    return loss / len(y)


def test_weighted_regularized_triplet_matches_its_transcription():
    torch.manual_seed(4)
    x = torch.randn(8, 5, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    # float64: AGW's +1e-6 in the softmax denominators is the only difference from the exact
    # softmax (measured 2.0e-6 relative); a 1% error anywhere is far outside 1e-5
    assert float(weighted_regularized_triplet(x, y)) == pytest.approx(float(wrt_transcription(x, y)), rel=1e-5)


# --- centroid memory (eqs. 7-9) -----------------------------------------------------------------


def test_memory_after_a_step_is_the_closed_form_applied_in_batch_order():
    labels = (2, 2, 2, 5)
    batch = _batch(5, labels=labels)
    recipe = _recipe(**{"loss.gsl": False})
    m0 = {b: torch.randn(6, 8, dtype=torch.float32) for b in ("v", "ir")}
    for b in m0:
        recipe.memory.memory(b).copy_(m0[b])
    out = _fake_output(batch, 6, projected=False)
    recipe.losses(None, batch, out)
    recipe.after_step(None)
    f = F.normalize(out.bn.detach(), dim=1).float()
    a = 0.8
    for bank, block in (("v", f[:4]), ("ir", f[4:8])):  # generated rows (8:) update nothing
        ones = block[:3]  # the three samples of identity 2, in batch order
        expected = (1 - a) ** 3 * m0[bank][2] + sum(a * (1 - a) ** (3 - t) * ones[t - 1] for t in (1, 2, 3))
        torch.testing.assert_close(recipe.memory.memory(bank)[2], expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(recipe.memory.memory(bank)[5], (1 - a) * m0[bank][5] + a * block[3],
                                   rtol=1e-6, atol=1e-6)
        untouched = [0, 1, 3, 4]
        assert torch.equal(recipe.memory.memory(bank)[untouched], m0[bank][untouched])


def test_memory_normalize_renormalises_after_every_sample():
    batch = _batch(6, labels=(1, 1))
    recipe = _recipe(**{"loss.gsl": False, "loss.memory_normalize": True})
    m0 = F.normalize(torch.randn(6, 8), dim=1)
    recipe.memory.memory("v").copy_(m0)
    recipe.memory.memory("ir").copy_(m0)
    out = _fake_output(batch, 6, projected=False)
    recipe.losses(None, batch, out)
    recipe.after_step(None)
    f = F.normalize(out.bn.detach(), dim=1).float()
    row = m0[1]
    for t in range(2):
        row = F.normalize(0.2 * row + 0.8 * f[t], dim=0)
    torch.testing.assert_close(recipe.memory.memory("v")[1], row, rtol=1e-6, atol=1e-6)


def test_memory_is_initialised_by_class_means_once():
    recipe = _recipe()
    feats = {"visible": torch.randn(5, 8), "infrared": torch.randn(4, 8)}
    labels = {"visible": torch.tensor([0, 0, 3, 3, 3]), "infrared": torch.tensor([1, 1, 0, 5])}
    calls = []

    def extract(modality, descriptor, **_):
        calls.append((modality, descriptor))
        return feats[modality], labels[modality]

    ctx = TrainContext(None, torch.device("cpu"), None, {}, log=lambda *_: None, extract=extract)
    assert "memory_init_seconds" in recipe.on_epoch_start(ctx)
    fv = F.normalize(feats["visible"], dim=1)
    torch.testing.assert_close(recipe.memory.memory("v")[3], fv[2:].mean(0))  # mean of normalised (eq. 7)
    assert float(recipe.memory.memory("v")[1].abs().sum()) == 0  # no visible image of identity 1
    fi = F.normalize(feats["infrared"], dim=1)
    torch.testing.assert_close(recipe.memory.memory("ir")[1], fi[:2].mean(0))
    assert calls == [("visible", "bnneck"), ("infrared", "bnneck")]  # the feature the losses see
    assert recipe.on_epoch_start(ctx) is None and len(calls) == 2  # later epochs keep the memory
    state = recipe.state_dict()
    fresh = _recipe()
    fresh.load_state_dict(state)
    assert fresh.initialized and torch.equal(fresh.memory.memory("ir"), recipe.memory.memory("ir"))


# --- switches -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ABLATION))
def test_every_ablation_model_runs_and_backpropagates(name):
    torch.manual_seed(0)
    cfg = peca_config(**ablation_updates(name))
    model = quiet_model(cfg)
    recipe = PECARecipe(cfg, 6)
    switches = ABLATION[name]
    batch = _batch(7, modalities=recipe.batch_spec().modalities)
    out = model(batch.images)
    loss, logs = recipe.losses(model, batch, out)
    loss.backward()
    assert torch.isfinite(loss)
    expected = {"ce"} | {k for k, key in (("tri", "triplet"), ("ins", "ins"), ("mod", "mod"), ("sim", "gsl"),
                                         ("mix", "ical")) if switches[key]}
    assert set(logs) - {"loss"} == expected
    assert (getattr(model, "extras", None) is not None) == switches["gsl"]
    assert hasattr(model, "auxiliary_stem") == switches["ical"]
    # every parameter takes part (DDP needs it), the frozen BNNeck bias aside
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused


def test_stems_must_match_the_generated_stream():
    from reid_kernels.training.config import ConfigError

    with pytest.raises(ConfigError, match="model.stems.*expected 2, got 3"):
        peca_config(**{"loss.ical": False})
    with pytest.raises(ConfigError, match="model.stems.*expected 3, got 2"):
        peca_config(**{"model.stems": 2})


# --- training -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_peca_trains_with_falling_loss_and_beats_the_untrained_network(synth_root, tmp_path):
    cfg = peca_config(synth_root, str(tmp_path / "run"), **{"train.epochs": 8, "optim.milestones": [6]})
    before, after, losses, history = train_and_evaluate(cfg, synth_root)
    print(f"PECA mAP untrained {before:.3f} -> trained {after:.3f}; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.8 * losses[0]
    assert after > before + 0.10, (before, after)
    assert "memory_init_seconds" in history[0] and "memory_init_seconds" not in history[1]


@pytest.mark.slow
def test_resume_is_bit_exact_with_the_memory(synth_root, tmp_path):
    straight, second = straight_and_resumed(lambda out, **u: peca_config(synth_root, out, **u), tmp_path)
    assert_same_state(straight.model.state_dict(), second.model.state_dict())
    assert_same_state(straight.recipe.memory.state_dict(), second.recipe.memory.state_dict())
    assert float(straight.recipe.memory.memory("v").abs().sum()) > 0


def _ddp_worker(rank, world, port, root, out, queue):
    os.environ.update(rank_env(rank, world, port))
    try:
        trainer = make_trainer(peca_config(root, out, **{"train.epochs": 1, "train.max_steps_per_epoch": 2}))
        trainer.fit()
        banks = {k: v.numpy().copy() for k, v in trainer.recipe.memory.state_dict().items()}
        weight = trainer.model.auxiliary_stem.conv1.weight.detach().numpy().copy()
        trainer.close()
        queue.put((rank, (weight, banks)))
    except Exception as error:  # report, so the parent fails with the reason instead of hanging
        queue.put((rank, repr(error)))


@pytest.mark.slow
def test_ddp_two_processes_keep_weights_and_memory_identical(synth_root, tmp_path):
    results = run_ranks(_ddp_worker, (synth_root, str(tmp_path / "ddp")))
    assert (results[0][0] == results[1][0]).all()
    for name, bank in results[0][1].items():  # updates gathered across ranks
        assert (bank == results[1][1][name]).all(), name


@pytest.mark.slow
def test_train_then_evaluate_json(synth_root, tmp_path):
    (rows,) = cli_train_then_evaluate("peca_synth", synth_root, tmp_path, [("eval.trials=2",)])
    assert rows[0]["setting"] == "all / single-shot" and 0 < rows[0]["mAP"] <= 100
