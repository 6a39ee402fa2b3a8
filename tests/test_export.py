"""training.export: the exported extractor's features equal the eager model's, and the file loads
and runs in a process where the toolkit cannot be imported (plain torch / onnxruntime only)."""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from reid_kernels.training.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from reid_kernels.training.export import main as export_main
from reid_kernels.training.index import load_model
from reid_kernels.training.synth import SynthConfig, generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["data.height=32", "data.width=16", "data.pad=2", "model.width=8", "train.epochs=1",
         "train.max_steps_per_epoch=1", "train.progress=false", "eval.final=false", "train.tensorboard=false",
         "sampler.num_ids=4", "sampler.num_pos=2"]
# Float32 error between the exported file (run in another process) and eager torch on these 32x16
# inputs, measured relative to the largest feature (|f| up to ~27, GeM-pooled, not normalised):
# TorchScript max 2.9e-6 absolute = 1.1e-7 relative (the same kernels; the other process's thread count
# changes summation orders), onnxruntime max 9.5e-6 = 3.7e-7 relative (its own convolution kernels).
# The tolerance, ~10x the larger: 4e-6 of the largest feature.
REL_TOL = 4e-6


def close(got, want):
    return np.abs(got - want).max() <= REL_TOL * np.abs(want).max()

# Run in a fresh `python -I` (no PYTHONPATH, no user site, not the working folder): the checkout's
# folders leave sys.path and a meta-path finder refuses reid_kernels and training, also the editable
# install's finder in site-packages; the script proves both imports fail before loading the file.
BLOCKED = r"""
import sys, importlib.abc, json
REPO = {repo!r}
sys.path[:] = [p for p in sys.path if p and not (p == REPO or p.startswith(REPO + "/") and "site-packages" not in p)]
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("reid_kernels", "training"):
            raise ModuleNotFoundError(f"blocked: {{name}}")
        return None
sys.meta_path.insert(0, Refuse())
for name in ("reid_kernels", "training"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{{name}} is importable: the test proves nothing")
import numpy as np
x = np.load({inputs!r})
{body}
loaded = [m for m in sys.modules if m.split(".")[0] in ("reid_kernels", "training")]
assert not loaded, loaded
print("ran without the toolkit")
"""

TORCHSCRIPT_BODY = r"""
import torch
extra = {{"reid_kernels.json": ""}}
m = torch.jit.load({model!r}, _extra_files=extra)
meta = json.loads(extra["reid_kernels.json"])
out = {{m_: getattr(m, m_)(torch.from_numpy(x)).numpy() for m_ in meta["modalities"]}}
np.savez({result!r}, forward=m(torch.from_numpy(x)).numpy(), **out)
"""

ONNX_BODY = r"""
import onnxruntime
session = onnxruntime.InferenceSession({model!r}, providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
(features,) = session.run(["features"], {{"images": x}})
np.savez({result!r}, features=features, modalities=np.array(json.loads(meta["modalities"])))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from reid_kernels.training.train import main as train_main

    base = tmp_path_factory.mktemp("export")
    root = str(base / "synth")
    generate(root, SynthConfig(ids=8, test_ids=2, height=32, width=16, images_per_cam=2, seed=2, occlusion=0.0,
                               clutter=1, jitter=0.5, ir_material=0.2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert train_main(["--config", "lba_synth", "--data-root", root, "--out", str(base / "run"), *SMALL]) == 0
    return str(base / "run" / "final.pt")


def eager(checkpoint, x, modality):
    model, _, descriptor, _ = load_model(checkpoint, "cpu")
    with torch.no_grad():
        return model.extract((torch.from_numpy(x) - IMAGENET_MEAN) / IMAGENET_STD, modality, descriptor).numpy()


def run_blocked(tmp_path, body, model, x):
    inputs, result = str(tmp_path / "x.npy"), str(tmp_path / "out.npz")
    np.save(inputs, x)
    script = BLOCKED.format(repo=REPO, inputs=inputs, body=body.format(model=model, result=result))
    done = subprocess.run([sys.executable, "-I", "-c", script], cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ran without the toolkit" in done.stdout
    return np.load(result)


def inputs(batch=5, seed=0):
    # a batch size other than the trace's example (2): the exported graph must not have fixed it
    return torch.rand(batch, 3, 32, 16, generator=torch.Generator().manual_seed(seed)).numpy()


def test_torchscript_equals_eager_and_runs_without_the_toolkit(checkpoint, tmp_path):
    out = str(tmp_path / "extractor.pt")
    assert export_main(["--checkpoint", checkpoint, "--format", "torchscript", "--out", out]) == 0
    x = inputs()
    got = run_blocked(tmp_path, TORCHSCRIPT_BODY, out, x)
    for modality in ("visible", "infrared"):
        want = eager(checkpoint, x, modality)
        assert got[modality].shape == want.shape == (5, 64)
        assert close(got[modality], want), np.abs(got[modality] - want).max()
    assert np.array_equal(got["forward"], got["visible"])
    # the two stems differ, so a file that ran one stem for both would fail above
    assert not close(got["infrared"], got["visible"])
    extra = {"reid_kernels.json": ""}
    torch.jit.load(out, _extra_files=extra)
    meta = json.loads(extra["reid_kernels.json"])
    assert (meta["height"], meta["width"], meta["dim"], meta["descriptor"]) == (32, 16, 64, "pooled")


def test_onnx_equals_eager_and_runs_with_onnxruntime_only(checkpoint, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out = str(tmp_path / "infrared.onnx")
    assert export_main(["--checkpoint", checkpoint, "--format", "onnx", "--modality", "infrared", "--out", out]) == 0
    x = inputs(batch=3, seed=1)
    got = run_blocked(tmp_path, ONNX_BODY, out, x)
    want = eager(checkpoint, x, "infrared")
    assert got["features"].shape == (3, 64) and got["modalities"].tolist() == ["infrared"]
    assert close(got["features"], want), np.abs(got["features"] - want).max()


def test_export_refuses_in_one_line(checkpoint, tmp_path, capsys):
    existing = tmp_path / "mine.pt"
    existing.write_text("keep")
    cases = [
        (["--checkpoint", checkpoint, "--format", "torchscript", "--out", str(existing)], "exists"),
        (["--checkpoint", checkpoint, "--format", "onnx", "--out", str(tmp_path / "a.onnx")], "--modality"),
        (["--checkpoint", str(existing), "--format", "torchscript", "--out", str(tmp_path / "b.pt")],
         "--checkpoint"),
    ]
    for argv, needle in cases:
        assert export_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    assert existing.read_text() == "keep" and sorted(os.listdir(tmp_path)) == ["mine.pt"]
