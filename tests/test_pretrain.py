"""The pretraining stage (training/pretrain.py): a backbone trained on a separate synthetic set,
written as a torchvision ResNet state dict that ``--pretrained`` loads into every backbone variant,
cached, and refused in one line when damaged or made with other settings."""
import json
import os
import warnings

import pytest
import torch

from reid_kernels.training.config import load_config
from reid_kernels.training.models import build_model
from reid_kernels.training.pretrain import BACKBONE, MANIFEST, PretrainError, main, pretrain, torchvision_state_dict

# A tiny pretraining: 16 identities (4 held out) of 32x16 images, width 8, one epoch of 3 steps.
TINY = ["data.height=32", "data.width=16", "data.pad=2", "data.synth.ids=16", "data.synth.test_ids=4",
        "data.synth.images_per_cam=2", "model.width=8", "train.epochs=1", "train.max_steps_per_epoch=3",
        "train.progress=false", "train.tensorboard=false", "sampler.num_ids=4", "sampler.num_pos=2"]
TORCHVISION_STEM = {"conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                    "bn1.num_batches_tracked"}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pretrain") / "pt")
    result = pretrain(out, overrides=TINY, log=lambda *_: None)
    return out, result


def model_config(**model):
    cfg = load_config("lba_synth", updates={"model.width": 8, **{f"model.{k}": v for k, v in model.items()}})
    return cfg["model"]


def test_backbone_is_a_torchvision_resnet_state_dict(pretrained):
    out, result = pretrained
    state = torch.load(os.path.join(out, BACKBONE), weights_only=True)
    assert TORCHVISION_STEM <= set(state)
    assert {name.split(".")[0] for name in state} == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}
    manifest = json.load(open(os.path.join(out, MANIFEST)))
    assert manifest["tensors"] == len(state) and manifest["identities"] == 12 and not result["cached"]
    assert manifest["config"]["data"]["synth"]["seed"] == 1000  # not the demo's generator seed (0)


def test_pretraining_trains_the_weights(pretrained):
    """The file holds trained weights, not the initialisation: a model initialised with the same
    seed and shape differs from it (3 SGD steps at lr 0.1 move every conv), and BN statistics moved."""
    out, _ = pretrained
    state = torch.load(os.path.join(out, BACKBONE), weights_only=True)
    torch.manual_seed(load_config("pretrain_synth")["seed"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        init = torchvision_state_dict(build_model(model_config(stems=1), 12))
    assert init.keys() == state.keys()
    for name in ("conv1.weight", "layer4.0.conv2.weight"):
        assert (state[name] - init[name]).abs().max() > 1e-4, name
    # the one stem runs twice a step (the visible, then the infrared half of the batch)
    assert state["bn1.num_batches_tracked"] == 2 * 3 and state["bn1.running_mean"].abs().max() > 0


@pytest.mark.parametrize("stems", [1, 2, 3])
@pytest.mark.parametrize("non_local", [False, True])
def test_backbone_loads_into_every_variant(pretrained, stems, non_local):
    out, _ = pretrained
    path = os.path.join(out, BACKBONE)
    state = torch.load(path, weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(model_config(stems=stems, non_local=non_local, pretrained=path), 5, log=lambda *_: None)
    own = model.state_dict()
    for stem in model.stem_names():
        for name in TORCHVISION_STEM:
            assert torch.equal(own[f"{stem}.{name}"], state[name]), (stem, name)
    for name, tensor in state.items():
        if name.startswith("layer"):
            assert torch.equal(own[name], tensor), name


def test_second_call_reuses_the_cached_file(pretrained):
    out, _ = pretrained
    before = os.stat(os.path.join(out, BACKBONE)).st_mtime_ns
    again = pretrain(out, overrides=TINY, log=lambda *_: None)
    assert again["cached"] and again["seconds"] == 0.0
    assert os.stat(os.path.join(out, BACKBONE)).st_mtime_ns == before


def test_pretraining_is_deterministic_and_continues_an_interrupted_run(pretrained, tmp_path):
    """Same settings, same thread count: the same operations in the same order, so the same bits.
    With the backbone file gone but the run's last.pt there (killed after training, before the
    export), the stage continues the run from its checkpoint instead of training again."""
    out, _ = pretrained
    first = torch.load(os.path.join(out, BACKBONE), weights_only=True)
    other = str(tmp_path / "pt")
    pretrain(other, overrides=TINY, log=lambda *_: None)
    second = torch.load(os.path.join(other, BACKBONE), weights_only=True)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    os.remove(os.path.join(other, BACKBONE))
    os.remove(os.path.join(other, MANIFEST))
    lines = []
    pretrain(other, overrides=TINY, log=lines.append)
    assert any("continuing the interrupted pretraining run" in line for line in lines)
    third = torch.load(os.path.join(other, BACKBONE), weights_only=True)
    assert all(torch.equal(first[k], third[k]) for k in first)


def cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err.strip()


def test_damaged_cached_file_is_one_line(pretrained, tmp_path, capsys):
    out, _ = pretrained
    copy = str(tmp_path / "pt")
    os.makedirs(copy)
    for name in (BACKBONE, MANIFEST):
        with open(os.path.join(out, name), "rb") as src, open(os.path.join(copy, name), "wb") as dst:
            dst.write(src.read())
    path = os.path.join(copy, BACKBONE)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    code, err = cli(["--out", copy, *TINY], capsys)
    assert code == 2 and err.count("\n") == 0 and "damaged" in err and path in err


def test_other_settings_and_foreign_folders_are_refused(pretrained, tmp_path, capsys):
    out, _ = pretrained
    before = os.stat(os.path.join(out, BACKBONE)).st_mtime_ns
    code, err = cli(["--out", out, *TINY, "train.epochs=2"], capsys)
    assert code == 2 and err.count("\n") == 0 and "other settings" in err
    assert os.stat(os.path.join(out, BACKBONE)).st_mtime_ns == before
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    code, err = cli(["--out", str(user), *TINY], capsys)
    assert code == 2 and "notes.txt" in err and os.listdir(user) == ["notes.txt"]
    with pytest.raises(PretrainError, match="model.stems: expected 1"):
        pretrain(str(tmp_path / "two"), overrides=[*TINY, "model.stems=2"], log=lambda *_: None)


@pytest.mark.slow
def test_demo_starts_every_row_from_the_cached_backbone(pretrained, tmp_path, capsys):
    from reid_kernels.training.demo import main as demo_main

    out, _ = pretrained
    demo_out = tmp_path / "demo"
    args = ["--out", str(demo_out), "--pretrain", out, "--rows", "baseline", "--no-figure",
            "data.height=32", "data.width=16", "data.pad=2", "data.synth.ids=14", "data.synth.test_ids=4",
            "data.synth.images_per_cam=2", "model.width=8", "train.epochs=1", "train.max_steps_per_epoch=2",
            "train.progress=false", "eval.trials=1", "sampler.num_ids=4", "sampler.num_pos=2"]
    before = os.stat(os.path.join(out, BACKBONE)).st_mtime_ns
    assert demo_main(args) == 0  # the cached (tiny) backbone, whatever settings made it: no pretraining
    assert os.stat(os.path.join(out, BACKBONE)).st_mtime_ns == before
    results = json.load(open(demo_out / "results.json"))
    assert results["runs"][0]["row"] == "pretrained network, not fine-tuned"
    assert f"from the backbone pretrained in {out}," in open(demo_out / "results.md").read()
    log = open(demo_out / "baseline_seed0" / "train.log").read()
    assert f"{out}/{BACKBONE}" in log
