"""Training application: config validation, backbone, LbA recipe, engine (learning, resume, DDP)."""
import os
import warnings

import pytest
import torch
from ddp_util import rank_env, run_ranks
from train_helpers import make_trainer, train_and_evaluate

from reid_kernels.training.config import ConfigError, load_config
from reid_kernels.training.data import Batch
from reid_kernels.training.engine.schedule import lr_factor
from reid_kernels.training.evaluate import evaluate
from reid_kernels.training.models import ReIDBackbone, load_pretrained
from reid_kernels.training.recipes import LbARecipe, batch_hard_triplet
from reid_kernels.training.synth import SynthConfig, generate

H, W = 32, 16


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(str(root), SynthConfig(ids=30, test_ids=10, height=H, width=W, images_per_cam=3, seed=11,
                                    occlusion=0.0, clutter=1, jitter=0.5, ir_material=0.2))
    return str(root)


def tiny_config(root, out, **updates):
    base = {
        "data.dataset": "synth", "data.root": root, "data.height": H, "data.width": W, "data.pad": 2,
        "data.workers": 0, "data.cache": True, "sampler.num_ids": 4, "sampler.num_pos": 2,
        "model.depth": 10, "model.width": 8, "model.stem_stride": 1, "model.maxpool": True,
        "optim.lr_backbone": 0.05, "optim.warmup_epochs": 1, "optim.milestones": [], "train.epochs": 2,
        "train.device": "cpu", "train.threads": 1, "train.progress": False, "train.eval_every": 0,
        "train.tensorboard": False, "eval.trials": 2, "eval.modes": ["all"], "eval.shots": ["single"],
        "eval.final": False, "out": out,
    }
    base.update(updates)
    return load_config("lba_synth", updates=base)


# --- config -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [
    ("loss.sites=[3]", "loss.sites"),
    ("loss.sites=[5, 4]", "loss.sites"),
    ("optim.lr_backbone=-1", "optim.lr_backbone"),
    ("train.amp=fp8", "train.amp"),
    ("data.dataset=market", "data.dataset"),
    ("model.depth=20", "model.depth"),
    ("sampler.num_ids=1", "sampler.num_ids"),
    ("loss.ic=maybe", "loss.ic"),
    ("train.bogus=1", "train.bogus"),
    ("nosuch.key=1", "nosuch"),
    ("optim.milestones=[50, 20]", "optim.milestones"),
])
def test_bad_config_values_are_rejected_with_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("lba_sysu", [override])


def test_configs_resolve_by_name_and_cli_reports_key(capsys):
    for name in ("lba_sysu", "lba_regdb", "lba_synth"):
        cfg = load_config(name)
        assert cfg["loss"]["lambda_ic"] == 1.0 and cfg["loss"]["lambda_dt"] == 0.5 and cfg["loss"]["beta"] == 50.0
    from reid_kernels.training.train import main

    assert main(["--config", "lba_synth", "loss.beta=0"]) == 2
    assert "loss.beta" in capsys.readouterr().err


def test_lr_schedule_matches_lba():
    f = [lr_factor(e, 10, [20, 50], 0.1) for e in range(81)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[19] == 1.0
    assert f[20] == pytest.approx(0.1) and f[49] == pytest.approx(0.1) and f[50] == pytest.approx(0.01)


# --- model --------------------------------------------------------------------------------------------
def two(x_vis, x_ir):
    return {"visible": x_vis, "infrared": x_ir}


def test_two_stream_shapes_and_feature_taps():
    model = ReIDBackbone(num_classes=7, depth=18, width=8, stem_stride=2)
    out = model(two(torch.randn(4, 3, 64, 32), torch.randn(4, 3, 64, 32)))
    # stride 4 stem, /2 at layer2 and layer3, last stride 1: 64x32 -> 4x2 at layer3 and layer4
    assert out.feat3.shape == (8, 32, 4, 2) and out.feat4.shape == (8, 64, 4, 2)
    assert out.pooled.shape == (8, 64) and out.logits.shape == (8, 7)
    assert model.head.classifier.bias is None and not model.head.bn.bias.requires_grad
    r50 = ReIDBackbone(num_classes=3, depth=50, width=8)
    assert r50.feat_dim == 256 and r50.feat3_dim == 128
    # the stems are modality-specific: the two modalities give different descriptors for one image
    model.eval()
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        model.infrared_stem.conv1.weight.mul_(-1)
        assert not torch.allclose(model.extract(x, "visible"), model.extract(x, "infrared"))


def test_pretrained_torchvision_state_dict_loads_into_both_stems(tmp_path):
    source = ReIDBackbone(num_classes=5, depth=18, width=8)
    state = {}
    for name, tensor in source.state_dict().items():
        if name.startswith("visible_stem."):
            state[name[len("visible_stem."):]] = tensor.clone()
        elif name.startswith("layer"):
            state[name] = tensor.clone()
    state["fc.weight"] = torch.randn(1000, 64)
    torch.save(state, tmp_path / "resnet.pth")
    target = ReIDBackbone(num_classes=5, depth=18, width=8)
    load_pretrained(target, str(tmp_path / "resnet.pth"), log=lambda *_: None)
    t = target.state_dict()
    assert torch.equal(t["infrared_stem.conv1.weight"], state["conv1.weight"])
    assert torch.equal(t["visible_stem.bn1.running_var"], state["bn1.running_var"])
    assert torch.equal(t["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_pretrained(target, str(tmp_path / "absent.pth"))
    with pytest.raises(ValueError, match="shape"):
        load_pretrained(ReIDBackbone(num_classes=5, depth=18, width=16), str(tmp_path / "resnet.pth"))


# --- recipe -------------------------------------------------------------------------------------------
def test_batch_hard_triplet_value():
    feats = torch.tensor([[0.0], [1.0], [3.0], [3.5]])
    labels = torch.tensor([0, 0, 1, 1])
    # anchor 0: pos 1, neg 3 -> relu(1-3+0.3)=0; anchor 1: pos 1, neg 2 -> 0; anchor 2: pos .5, neg 2 -> 0;
    # anchor 3: pos .5, neg 2.5 -> 0
    assert batch_hard_triplet(feats, labels, 0.3).item() == 0.0
    assert batch_hard_triplet(feats, labels, 2.0).item() == pytest.approx((1.0 + 0.0 + 0.5 + 0.0) / 4)


def lba_step(overrides):
    """(model, config, output, loss, logs) of one LbA step on a random 4 ids x 2 batch."""
    cfg = load_config("lba_synth", overrides)
    torch.manual_seed(0)
    model = ReIDBackbone(num_classes=4, depth=10, width=8, stem_stride=1)
    cfg["sampler"].update(num_ids=4, num_pos=2)
    recipe = LbARecipe(cfg, num_classes=4, seed=0)
    labels = torch.arange(4).repeat_interleave(2)
    batch = Batch(two(torch.randn(8, 3, H, W), torch.randn(8, 3, H, W)), two(labels, labels))
    out = model(batch.images)
    return (model, cfg, out) + recipe.losses(model, batch, out)


@pytest.mark.parametrize("ic, dt, coattention, sites", [
    (False, False, True, [4, 5]), (True, False, True, [4, 5]), (False, True, True, [4, 5]),
    (False, True, False, [4, 5]), (True, True, False, [4, 5]), (True, True, True, [4]), (True, True, True, [5]),
    (True, True, True, [4, 5]),
])
def test_every_table3_switch_runs_and_backpropagates(ic, dt, coattention, sites):
    model, _, _, loss, logs = lba_step([f"loss.ic={ic}", f"loss.dt={dt}", f"loss.coattention={coattention}",
                                        f"loss.sites={sites}"])
    loss.backward()
    assert torch.isfinite(loss)
    assert ("ic4" in logs) == (ic and 4 in sites) and ("dt5" in logs) == (dt and 5 in sites)
    expected = logs["ce"] + logs["tri"]
    for s in sites:
        expected = expected + (logs[f"ic{s}"] if ic else 0) + (0.5 * logs[f"dt{s}"] if dt else 0)
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)
    assert model.visible_stem.conv1.weight.grad is not None


@pytest.mark.parametrize("weighting, eps", [("lba-code", 1e-6), ("paper", 0.0)])
def test_dense_triplet_is_cmalign_with_the_configured_weighting_and_eps(weighting, eps):
    """The recipe's DT term is cmalign(..., weighting, eps) on the pairs its generator draws; the
    default is the released code's (lba-code, 1e-6), which differs from the paper's form."""
    import reid_kernels

    _, cfg, out, _, logs = lba_step(["loss.ic=false", "loss.sites=[5]", f"loss.dt_weighting={weighting}",
                                     f"loss.dt_eps={eps}"])
    twin = LbARecipe(cfg, num_classes=4, seed=0)  # the same generator state: the same pairs
    pos, neg = reid_kernels.lba_pairs(4, 2, twin.generator, negative_draw="lba-code")
    fmap = out.feat4.detach().float()
    expected = reid_kernels.cmalign(fmap, pos, neg, 50.0, 0.3, weighting=weighting, eps=eps).loss
    other = reid_kernels.cmalign(fmap, pos, neg, 50.0, 0.3, weighting="paper" if weighting == "lba-code" else
                                 "lba-code", eps=eps).loss
    assert float(logs["dt5"]) == pytest.approx(float(expected), rel=1e-6)
    assert float(logs["dt5"]) != pytest.approx(float(other), rel=1e-3)
    defaults = load_config("lba_synth")["loss"]
    assert (defaults["dt_weighting"], defaults["dt_eps"]) == ("lba-code", 1e-6)


# --- engine ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_training_lowers_loss_and_beats_untrained_model(synth_root, tmp_path):
    cfg = tiny_config(synth_root, str(tmp_path / "run"), **{"train.epochs": 8, "optim.milestones": [6],
                                                            "loss.ic": False, "loss.dt": False})
    before, after, losses, _ = train_and_evaluate(cfg, synth_root)
    assert losses[-1] < 0.8 * losses[0]
    print(f"mAP untrained {before:.3f} -> trained {after:.3f}; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert after > before + 0.10, (before, after)
    assert os.path.isfile(tmp_path / "run" / "final.pt")


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_resume_equals_uninterrupted_training(synth_root, tmp_path):
    updates = {"train.max_steps_per_epoch": 3, "data.erasing": 0.5, "data.channel_aug": "exchange"}
    straight = make_trainer(tiny_config(synth_root, str(tmp_path / "a"), **updates))
    straight.fit()
    straight.close()

    first = make_trainer(tiny_config(synth_root, str(tmp_path / "b"), **updates, **{"train.epochs": 1}))
    first.fit()
    first.close()
    torch.manual_seed(1234)  # a different global RNG state: resume must restore it
    second = make_trainer(tiny_config(synth_root, str(tmp_path / "b"), **updates))
    second.fit(resume=str(tmp_path / "b" / "last.pt"))
    second.close()
    a, b = _params(straight.model), _params(second.model)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(straight.recipe.generator.get_state(), second.recipe.generator.get_state())


def _ddp_worker(rank, world, port, root, out, queue):
    os.environ.update(rank_env(rank, world, port))
    try:
        cfg = tiny_config(root, out, **{"train.epochs": 1, "train.max_steps_per_epoch": 2})
        trainer = make_trainer(cfg)
        trainer.fit()
        # numpy, pickled by value: a shared-memory tensor would vanish when this process exits
        weight = trainer.model.layer4[0].conv1.weight.detach().numpy().copy()
        trainer.close()
        queue.put((rank, (weight, len(trainer.loader))))
    except Exception as error:  # report, so the parent fails with the reason instead of hanging
        queue.put((rank, repr(error)))


@pytest.mark.slow
def test_ddp_two_processes_gloo(synth_root, tmp_path):
    results = run_ranks(_ddp_worker, (synth_root, str(tmp_path / "ddp")), timeout=240)
    assert (results[0][0] == results[1][0]).all()  # DDP kept the replicas identical
    assert results[0][1] == results[1][1] > 0  # equal step counts per rank
    assert os.path.isfile(tmp_path / "ddp" / "final.pt")


def _ddp_resume_worker(rank, world, port, root, out, epochs, resume, queue):
    os.environ.update(rank_env(rank, world, port))
    try:
        cfg = tiny_config(root, out, **{"train.epochs": epochs, "train.max_steps_per_epoch": 2, "data.erasing": 0.5,
                                        "data.channel_aug": "exchange"})
        trainer = make_trainer(cfg)
        if resume:
            torch.manual_seed(777 + rank)  # resume must restore each rank's own RNG
        trainer.fit(resume=os.path.join(out, "last.pt") if resume else None)
        state = {k: v.numpy().copy() for k, v in trainer.model.state_dict().items()}
        generator = trainer.recipe.generator.get_state().numpy().copy()
        trainer.close()
        queue.put((rank, (state, generator)))
    except Exception as error:  # report, so the parent fails with the reason instead of hanging
        queue.put((rank, repr(error)))


@pytest.mark.slow
def test_ddp_resume_is_bit_exact_on_every_rank(synth_root, tmp_path):
    straight = run_ranks(_ddp_resume_worker, (synth_root, str(tmp_path / "a"), 3, False))
    run_ranks(_ddp_resume_worker, (synth_root, str(tmp_path / "b"), 2, False))
    resumed = run_ranks(_ddp_resume_worker, (synth_root, str(tmp_path / "b"), 3, True))
    for rank in (0, 1):
        a, b = straight[rank], resumed[rank]
        assert a[0].keys() == b[0].keys()
        for name in a[0]:
            assert (a[0][name] == b[0][name]).all(), (rank, name)
        assert (a[1] == b[1]).all(), rank  # each rank's own pair-drawing generator
    assert not (straight[0][1] == straight[1][1]).all()  # the ranks' generators do differ


# --- CLIs and the RegDB evaluation path ---------------------------------------------------------------
@pytest.mark.slow
def test_train_and_evaluate_clis(synth_root, tmp_path, capsys):
    from reid_kernels.training.evaluate import main as evaluate_main
    from reid_kernels.training.train import main as train_main

    out = str(tmp_path / "cli")
    args = ["--config", "lba_synth", "--data-root", synth_root, "--out", out,
            "data.height=32", "data.width=16", "data.pad=2", "model.width=8", "train.epochs=1",
            "train.max_steps_per_epoch=2", "train.progress=false", "eval.trials=1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert train_main(args) == 0
        assert train_main(args + ["train.epochs=2", "--resume"]) == 0  # continues from <out>/last.pt
    assert "resumed from" in open(os.path.join(out, "train.log")).read()
    capsys.readouterr()
    assert evaluate_main(["--checkpoint", os.path.join(out, "final.pt"), "eval.trials=1"]) == 0
    assert "all / single-shot" in capsys.readouterr().out


def test_regdb_evaluation_routes_modalities(tmp_path):
    from PIL import Image

    from reid_kernels.training.evaluate import modality_of

    root = tmp_path / "RegDB"
    for split in ("train", "test"):
        for modality, folder in (("visible", "Visible"), ("thermal", "Thermal")):
            lines = []
            for label, pid in enumerate((1, 2, 3)):
                os.makedirs(root / folder / str(pid), exist_ok=True)
                for k in range(2):
                    name = f"{split}_{folder[0]}_{pid}_{k}.bmp"
                    Image.new("RGB", (16, 32), (60 * label, 80, 200 if folder == "Visible" else 60 * label)).save(
                        root / folder / str(pid) / name)
                    lines.append(f"{folder}/{pid}/{name} {label}")
            os.makedirs(root / "idx", exist_ok=True)
            (root / "idx" / f"{split}_{modality}_1.txt").write_text("\n".join(lines) + "\n")
    assert modality_of(str(root / "Thermal" / "1" / "x.bmp"), "regdb") == "infrared"
    assert modality_of(str(root / "Visible" / "1" / "x.bmp"), "regdb") == "visible"
    assert modality_of("/d/cam6/0001/0001.jpg", "sysu") == "infrared"
    cfg = load_config("lba_regdb", [f"data.root={root}", "data.height=32", "data.width=16", "data.pad=2",
                                    "model.depth=10", "model.width=8"])
    model = ReIDBackbone(num_classes=3, depth=10, width=8)
    calls = []
    original = model.extract
    model.extract = lambda x, kind, descriptor: calls.append((kind, descriptor)) or original(x, kind, descriptor)
    result = evaluate(model, str(root), cfg)
    assert set(calls) == {("visible", "pooled"), ("infrared", "pooled")}
    assert [r["setting"] for r in result["rows"]] == ["visible->thermal", "thermal->visible"]
    assert 0.0 < result["summary"]["mAP"] <= 1.0


@pytest.mark.slow
def test_demo_pipeline_writes_table_and_figure(tmp_path):
    from reid_kernels.training.demo import run_demo

    overrides = ["data.height=32", "data.width=16", "data.pad=2", "data.synth.ids=14", "data.synth.test_ids=4",
                 "data.synth.images_per_cam=2", "model.width=8", "train.epochs=1", "train.max_steps_per_epoch=2",
                 "train.progress=false", "eval.trials=1", "sampler.num_ids=4", "sampler.num_pos=2"]
    result = run_demo(str(tmp_path), rows=("baseline", "ic_dt"), overrides=overrides, seeds=[0, 1],
                      log=lambda *_: None)
    table = result["table"]
    for row in ("untrained network", "baseline (ID loss only)", "+IC +DT (full LbA)"):
        assert f"| {row} |" in table
    assert "±" in table and len(result["runs"]) == 2 * 3
    assert os.path.isfile(tmp_path / "correspondence.png") and os.path.isfile(tmp_path / "results.md")
