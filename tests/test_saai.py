"""SAAI on the recipe interface: SAFL against eqs. 1-3, the dual BNNeck, the composite loss with the
released code's constants, Table-4 switches, AIM in the evaluation, training and resume."""
import os

import pytest
import torch
import torch.nn.functional as F
from ddp_util import rank_env, run_ranks

from train_helpers import (H, W, assert_same_state, cli_train_then_evaluate, make_trainer, small_config,
                           straight_and_resumed, tiny_synth, train_and_evaluate)

from reid_kernels.training.config import ConfigError, load_config
from reid_kernels.training.data import Batch
from reid_kernels.training.data.transforms import TrainTransform
from reid_kernels.training.evaluate import FeatureExtractor, evaluate
from reid_kernels.training.models import SAFL, DualBNNeck, feature_map_size
from reid_kernels.training.recipes import SAAIRecipe, build_model


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return tiny_synth(tmp_path_factory, "synth_saai", seed=7)


def saai_config(root=None, out="runs/unused", **updates):
    return small_config("saai_synth", root, out, **updates)


# --- SAFL and the dual BNNeck ---------------------------------------------------------------------------
def test_safl_matches_equations_1_to_3():
    torch.manual_seed(0)
    p, c, h, w = 3, 5, 2, 3
    safl = SAFL(c, h * w, parts=p).double()
    fmap = torch.randn(2, c, h, w, dtype=torch.float64, requires_grad=True)
    parts, sim = safl(fmap)
    # transcription: T_j = the c-vector at position j (row-major), E_j its embedding row
    expected_parts, expected_sim = [], []
    for b in range(2):
        tokens = [fmap[b, :, j // w, j % w] for j in range(h * w)]
        s = torch.stack([torch.stack([torch.sigmoid(safl.prototypes[i] @ (tokens[j] + safl.position[j]))
                                      for j in range(h * w)]) for i in range(p)])       # eq. 1
        expected_sim.append(s)
        expected_parts.append(torch.stack([sum(s[i, j] * tokens[j] for j in range(h * w)) / (h * w)
                                           for i in range(p)]))                         # eq. 2, raw tokens
    expected_parts, expected_sim = torch.stack(expected_parts), torch.stack(expected_sim)
    assert torch.allclose(parts, expected_parts, atol=1e-12) and torch.allclose(sim, expected_sim, atol=1e-12)
    g = torch.randn_like(parts)
    grads = torch.autograd.grad((parts * g).sum() + sim.sum(), [fmap, safl.prototypes, safl.position])
    expected = torch.autograd.grad((expected_parts * g).sum() + expected_sim.sum(),
                                   [fmap, safl.prototypes, safl.position])
    for a, b in zip(grads, expected):
        assert torch.allclose(a, b, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: safl(x)[0], (fmap,))


def test_position_embedding_follows_the_input_size_and_refuses_another():
    cfg = saai_config()
    model = build_model(cfg, 5, log=lambda *_: None)
    assert feature_map_size(cfg["model"], H, W) == (4, 2)  # 32x16, stem stride 1, maxpool, /2 /2
    assert model.extras.safl.position.shape == (8, model.feat_dim)
    assert feature_map_size(load_config("saai_sysu")["model"], 288, 144) == (18, 9)  # the code's 18x9
    with pytest.raises(ValueError, match=r"8x4.*4x2"):
        model.extract(torch.randn(1, 3, 64, 32), "visible", "extras")


def test_descriptor_is_parts_then_global_average():
    torch.manual_seed(1)
    cfg = saai_config()
    model = build_model(cfg, 5, log=lambda *_: None)
    fmap = torch.randn(3, model.feat_dim, 4, 2)
    feats, sim = model.extras.descriptor(fmap)
    parts, _ = model.extras.safl(fmap)
    p = cfg["loss"]["num_parts"]
    assert feats.shape == (3, (p + 1) * model.feat_dim) and sim.shape == (3, p, 8)
    assert torch.equal(feats[:, : p * model.feat_dim], parts.flatten(1))
    assert torch.allclose(feats[:, p * model.feat_dim:], fmap.mean((2, 3)))  # eq. 3: [parts, avg(F)]


def test_dual_bnneck_routes_by_modality():
    torch.manual_seed(2)
    bn = DualBNNeck(4)
    x = torch.randn(6, 4)
    infrared = torch.tensor([False, False, False, True, True, True])
    out = bn(x, infrared)
    assert torch.allclose(bn.bn_v.running_mean, 0.1 * x[:3].mean(0), atol=1e-6)
    assert torch.allclose(bn.bn_i.running_mean, 0.1 * x[3:].mean(0), atol=1e-6)
    assert torch.allclose(out[:3], F.batch_norm(x[:3], None, None, bn.bn_v.weight, bn.bn_v.bias, True), atol=1e-5)
    assert not bn.bn_v.bias.requires_grad and not bn.bn_i.bias.requires_grad
    # at test time each modality's images go through their own branch
    cfg = saai_config()
    model = build_model(cfg, 5, log=lambda *_: None).eval()
    with torch.no_grad():
        model.extras.bnneck.bn_i.weight.mul_(-1)
        img = torch.randn(2, 3, H, W)
        assert not torch.allclose(model.extract(img, "visible", "extras"), model.extract(img, "infrared", "extras"))


# --- the losses ---------------------------------------------------------------------------------------
def _step(recipe, model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 0, 3, 3])
    batch = Batch({m: torch.randn(4, 3, H, W, generator=gen) for m in ("visible", "infrared")},
                  {m: labels for m in ("visible", "infrared")})
    return batch, model(batch.images)


def test_loss_terms_match_the_code_with_its_constants():
    torch.manual_seed(3)
    cfg = saai_config()
    model = build_model(cfg, 5, log=lambda *_: None)
    recipe = SAAIRecipe(cfg, 5)
    head = model.extras
    with torch.no_grad():  # EMA copies away from the live weights, so the update is visible
        head.visible_ema.normal_()
        head.infrared_ema.normal_()
    ema_v, ema_i = head.visible_ema.clone(), head.infrared_ema.clone()
    batch, out = _step(recipe, model)
    total, logs = recipe.losses(model, batch, out)
    assert torch.allclose(head.visible_ema, 0.98 * ema_v + 0.02 * head.visible_classifier.weight.detach())
    assert torch.allclose(head.infrared_ema, 0.98 * ema_i + 0.02 * head.infrared_classifier.weight.detach())
    with torch.no_grad():
        feats, sim = head.descriptor(out.feat4)
        y = batch.all_labels()
        ir = torch.tensor([False] * 4 + [True] * 4)
        bn = head.bnneck(feats, ir)
        ce = F.cross_entropy(head.classifier(bn), y)
        lv, li = head.visible_classifier(bn[:4]), head.infrared_classifier(bn[4:])
        ce_modal = F.cross_entropy(lv, y[:4]) + F.cross_entropy(li, y[4:])
        q = torch.cat([bn[:4] @ head.infrared_ema.t(), bn[4:] @ head.visible_ema.t()]).softmax(1)
        mutual = -(q * torch.cat([lv, li]).log_softmax(1)).sum(1).mean()
        # eq. 5: centres = batch means of the pre-BN descriptors over both modalities
        centres = {k: feats[y == k].mean(0) for k in (0, 3)}
        pull = torch.stack([torch.relu((feats[i] - centres[int(y[i])]).norm() - 0.01) for i in range(8)]).mean()
        push = torch.relu(0.7 - (centres[0] - centres[3]).norm())
        # eq. 4, the code's bounded form: -2/(p(p-1)) sum_{i<j} RMS(S_i - S_j), mean over images
        p = sim.shape[1]
        pairs = [((sim[:, i] - sim[:, j]) ** 2).mean(1).sqrt() for i in range(p) for j in range(i + 1, p)]
        pd = -(2 / (p * (p - 1))) * torch.stack(pairs).sum(0).mean()
    for name, value in (("ce", ce), ("ce_modal", ce_modal), ("mutual", mutual), ("cs", pull + push), ("pd", pd)):
        assert float(logs[name]) == pytest.approx(float(value), rel=1e-4), name
    expected = ce + ce_modal + mutual + 1.0 * (pull + push) + 0.25 * pd  # the code's effective weight 0.25
    assert float(total.detach()) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("row, switches", [
    ("baseline", {"loss.parts": False, "loss.pd": False, "loss.cs": False}),
    ("+parts", {"loss.pd": False, "loss.cs": False}), ("+L_pd", {"loss.cs": False}), ("+L_cs", {"loss.pd": False}),
    ("all", {}), ("paper weight", {"loss.lambda_pd": 0.5}),
])
def test_every_table4_switch_runs_and_backpropagates(row, switches):
    cfg = saai_config(**switches)
    torch.manual_seed(0)
    model = build_model(cfg, 5, log=lambda *_: None)
    recipe = SAAIRecipe(cfg, 5)
    batch, out = _step(recipe, model)
    loss, logs = recipe.losses(model, batch, out)
    loss.backward()
    assert torch.isfinite(loss)
    assert ("pd" in logs) == cfg["loss"]["pd"] and ("cs" in logs) == cfg["loss"]["cs"]
    assert (model.extras.safl is not None) == cfg["loss"]["parts"]
    assert model.stem.conv1.weight.grad.abs().sum() > 0
    if cfg["loss"]["parts"]:
        assert model.extras.safl.prototypes.grad.abs().sum() > 0


def test_pd_without_parts_is_refused():
    with pytest.raises(ConfigError, match="loss.pd"):
        load_config("saai_synth", ["loss.parts=false"])


def test_saai_augmentations():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 255, (3, 8, 6), dtype=torch.uint8)
    copy = TrainTransform(flip=0.0, channel_aug="copy", channel_prob=1.0)
    out = copy(img, g, visible=False)  # applies to infrared images too
    assert torch.allclose(out[0] * 0.229 + 0.485, out[1] * 0.224 + 0.456, atol=1e-5)
    sym = TrainTransform(flip=0.0, pad=2, pad_mode="symmetric")
    padded = sym._pad_crop(img, torch.Generator().manual_seed(1))
    assert padded.shape == img.shape
    erase = TrainTransform(flip=0.0, erasing=1.0, erasing_value="random")
    x = erase(img, torch.Generator().manual_seed(2), visible=True)
    changed = (x != TrainTransform(flip=0.0)(img, torch.Generator().manual_seed(2), visible=True))
    assert changed.any() and x[changed].std() > 0.5  # standard-normal fill, not a constant


# --- evaluation, training, resume --------------------------------------------------------------------
def test_aim_in_the_evaluation_equals_rerank_aim_by_hand(synth_root):
    from reid_kernels import protocols, rerank

    cfg = saai_config(synth_root)
    torch.manual_seed(0)
    model = build_model(cfg, 20, log=lambda *_: None)
    result = evaluate(model, synth_root, cfg)
    assert result["rows"][0]["setting"] == "all / single-shot + aim"
    assert result["rows"][1]["setting"] == "all / single-shot"
    by_hand = protocols.evaluate_sysu(synth_root, FeatureExtractor(model, cfg, torch.device("cpu")), modes=["all"],
                                      shots=["single"], trials=2,
                                      postprocess=lambda q, g: rerank.aim(q, g, k1=4, k2=1)).rows()[0]
    for metric in ("mAP", "R1", "mINP"):
        assert result["rows"][0][f"{metric}_mean"] == pytest.approx(by_hand[f"{metric}_mean"], abs=1e-12)
    plain = protocols.evaluate_sysu(synth_root, FeatureExtractor(model, cfg, torch.device("cpu")), modes=["all"],
                                    shots=["single"], trials=2).rows()[0]
    assert result["rows"][1]["mAP_mean"] == pytest.approx(plain["mAP_mean"], abs=1e-12)


@pytest.mark.slow
def test_saai_trains_with_falling_loss_and_beats_the_untrained_network(synth_root, tmp_path):
    cfg = saai_config(synth_root, str(tmp_path / "run"), **{"train.epochs": 8, "optim.milestones": [7],
                                                            "optim.lr_backbone": 2e-3, "optim.lr_head": 2e-3})
    before, after, losses, history = train_and_evaluate(cfg, synth_root)
    print(f"SAAI mAP untrained {before:.3f} -> trained {after:.3f}; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.8 * losses[0]
    assert after > before + 0.10, (before, after)


@pytest.mark.slow
def test_resume_is_bit_exact_with_the_ema_classifiers(synth_root, tmp_path):
    straight, second = straight_and_resumed(lambda out, **u: saai_config(synth_root, out, **u), tmp_path,
                                            **{"data.erasing": 0.5, "data.erasing_value": "random"})
    assert "extras.visible_ema" in straight.model.state_dict()
    assert_same_state(straight.model.state_dict(), second.model.state_dict())


@pytest.mark.slow
def test_train_then_evaluate_json_with_and_without_aim(synth_root, tmp_path):
    settings = (("aim", "all / single-shot + aim"), ("none", "all / single-shot"))
    results = cli_train_then_evaluate("saai_synth", synth_root, tmp_path,
                                      [(f"eval.rerank={rerank}",) for rerank, _ in settings])
    for rows, (_, first) in zip(results, settings):
        assert rows[0]["setting"] == first and 0 < rows[0]["mAP"] <= 100


def _ddp_worker(rank, world, port, root, out, queue):
    os.environ.update(rank_env(rank, world, port))
    try:
        trainer = make_trainer(saai_config(root, out, **{"train.epochs": 1, "train.max_steps_per_epoch": 2}))
        trainer.fit()
        # parameters and the EMA copies (BatchNorm running statistics are per rank until the next
        # forward broadcasts rank 0's, as DDP does)
        state = {k: v.numpy().copy() for k, v in trainer.model.state_dict().items()
                 if k.startswith("extras.") and "running_" not in k and "num_batches" not in k}
        trainer.close()
        queue.put((rank, state))
    except Exception as error:  # report, so the parent fails with the reason instead of hanging
        queue.put((rank, repr(error)))


@pytest.mark.slow
def test_ddp_two_processes_with_the_head_inside_forward(synth_root, tmp_path):
    results = run_ranks(_ddp_worker, (synth_root, str(tmp_path / "ddp")))
    for name, value in results[0].items():  # prototypes, classifiers and the EMA copies agree
        assert (value == results[1][name]).all(), name


def test_mam_blocks_follow_layer3_and_layer4_and_match_their_equation():
    from reid_kernels.training.models import MAM, ReIDBackbone

    torch.manual_seed(4)
    model = ReIDBackbone(num_classes=3, depth=10, width=8, stems=1, mam=True, bnneck=False)
    assert model.mam3.attention[0].in_channels == model.feat3_dim and model.mam4.attention[0].in_channels == model.feat_dim
    plain = ReIDBackbone(num_classes=3, depth=10, width=8, stems=1, mam=False, bnneck=False)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mam")})
    model.eval(), plain.eval()
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        f3_plain = plain.layer3(plain.layer2(plain.layer1(plain.stem(x))))
        f3, f4 = model.feature_maps(x, "visible")
        assert torch.allclose(f3, model.mam3(f3_plain), atol=1e-6)
        assert torch.allclose(f4, model.mam4(plain.layer4(f3)), atol=1e-6)
        block = MAM(8, reduction=2)
        y = torch.randn(2, 8, 3, 3)
        m = torch.sigmoid(block.attention[2](torch.relu(block.attention[0](y.mean((2, 3), keepdim=True)))))
        inorm = (y - y.mean((2, 3), keepdim=True)) / torch.sqrt(y.var((2, 3), unbiased=False, keepdim=True) + 1e-5)
        assert torch.allclose(block(y), y * m + inorm * (1 - m), atol=1e-5)
