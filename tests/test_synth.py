"""Synthetic VI-ReID data: SYSU-MM01 layout, determinism, infrared rendering."""
import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from reid_kernels.training.synth import IR_CAMS, RGB_CAMS, SynthConfig, generate, main

SMALL = dict(ids=8, test_ids=3, val_ids=1, height=32, width=16, images_per_cam=2)


def _digest(root):
    h = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = os.path.join(folder, name)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as handle:
                h.update(handle.read())
    return h.hexdigest()


def test_layout_and_id_files(tmp_path):
    counts = generate(str(tmp_path), SynthConfig(seed=1, **SMALL))
    assert counts["rgb"] > 0 and counts["ir"] > 0
    for cam in RGB_CAMS + IR_CAMS:
        assert (tmp_path / f"cam{cam}").is_dir()
    split = {}
    for name in ("train_id.txt", "val_id.txt", "test_id.txt"):
        text = (tmp_path / "exp" / name).read_text().strip()
        split[name] = [int(t) for t in text.split(",")]
    assert len(split["test_id.txt"]) == 3 and len(split["val_id.txt"]) == 1
    assert sorted(sum(split.values(), [])) == list(range(1, 9))
    # every identity: >= 2 visible cameras and >= 1 infrared camera, 4-digit folder and file names
    for pid in range(1, 9):
        rgb = [c for c in RGB_CAMS if (tmp_path / f"cam{c}" / f"{pid:04d}").is_dir()]
        ir = [c for c in IR_CAMS if (tmp_path / f"cam{c}" / f"{pid:04d}").is_dir()]
        assert len(rgb) >= 2 and len(ir) >= 1
        for c in rgb + ir:
            names = sorted(os.listdir(tmp_path / f"cam{c}" / f"{pid:04d}"))
            assert names and all(len(n) == 8 and n.endswith(".jpg") for n in names)


def test_deterministic_from_seed(tmp_path):
    generate(str(tmp_path / "a"), SynthConfig(seed=3, **SMALL))
    generate(str(tmp_path / "b"), SynthConfig(seed=3, **SMALL))
    generate(str(tmp_path / "c"), SynthConfig(seed=4, **SMALL))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_infrared_is_grey_and_visible_is_colour(tmp_path):
    generate(str(tmp_path), SynthConfig(seed=0, **SMALL))
    ir = [np.asarray(Image.open(os.path.join(d, f)), dtype=np.int16)
          for c in IR_CAMS for d, _, fs in os.walk(tmp_path / f"cam{c}") for f in fs]
    rgb = [np.asarray(Image.open(os.path.join(d, f)), dtype=np.int16)
           for c in RGB_CAMS for d, _, fs in os.walk(tmp_path / f"cam{c}") for f in fs]
    assert ir[0].shape == (32, 16, 3)
    # JPEG chroma may wobble by a few levels; infrared carries no colour
    assert max(np.abs(x[..., 0] - x[..., 1]).mean() for x in ir) < 2.0
    assert np.mean([np.abs(x[..., 0] - x[..., 2]).mean() for x in rgb]) > 10.0


def test_cli_and_bad_sizes(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "d"), "--ids", "6", "--test-ids", "2", "--height", "32", "--width", "16",
                 "--images-per-cam", "1"]) == 0
    assert "identities" in capsys.readouterr().out
    with pytest.raises(ValueError, match="test_ids"):
        generate(str(tmp_path / "e"), SynthConfig(ids=5, test_ids=4))
