"""The dataset check before training (training.data.check), the protocol's errors for trees without
a modality (reid_kernels.protocols), and what reaches train.log -- each through the CLI in a
temporary folder: exit status, the one-line message, the user's files unchanged."""
import io
import os
import shutil
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import tiny_synth

from reid_kernels.training.data import DatasetError
from reid_kernels.training.data.check import check_images, decode_problem
from reid_kernels.training.train import main as train_main

SMALL = ["data.height=32", "data.width=16", "data.pad=2", "model.width=8", "model.depth=10", "train.epochs=1",
         "train.max_steps_per_epoch=1", "train.progress=false", "eval.final=false", "train.tensorboard=false",
         "sampler.num_ids=4", "sampler.num_pos=2", "data.workers=0", "train.threads=1"]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return tiny_synth(tmp_path_factory, "synth_check", seed=4)


def copy_tree(synth_root, tmp_path, name="data") -> str:
    target = tmp_path / name
    shutil.copytree(synth_root, target)
    return str(target)


def train(args, capsys, show_warnings=False):
    with warnings.catch_warnings():
        warnings.simplefilter("always" if show_warnings else "ignore")
        code = train_main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def truncate(path: str, keep: float = 0.5) -> None:
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * keep)])


def test_a_truncated_jpeg_is_caught_by_a_full_decode_not_by_verify(tmp_path):
    """Which PIL call notices a JPEG cut short: ``verify()`` reads the headers only and passes it;
    a decode (``load()``, at 1/8 DCT scale after ``draft()``) reads the entropy-coded data and fails."""
    rng = np.random.default_rng(0)
    path = str(tmp_path / "cut.jpg")
    Image.fromarray(rng.integers(0, 255, (64, 32, 3), dtype=np.uint8)).save(path, quality=92)
    assert decode_problem(path) is None
    truncate(path, 0.5)
    with Image.open(path) as image:
        image.verify()  # no error: verify() is not a decode check for JPEG
    assert "truncated" in decode_problem(path)
    with Image.open(path) as image, pytest.raises(OSError, match="truncated"):
        image.load()
    (tmp_path / "text.jpg").write_text("not an image")
    assert "cannot decode" in decode_problem(str(tmp_path / "text.jpg"))
    assert decode_problem(str(tmp_path / "absent.jpg")) == "file missing"


def test_check_images_names_the_first_bad_file_and_counts_them(tmp_path):
    paths = []
    for k in range(100):  # above the threaded-path threshold
        path = tmp_path / f"{k:03d}.png"
        Image.new("RGB", (8, 16), (k, 0, 0)).save(path)
        paths.append(str(path))
    assert check_images(paths, threads=4) == 100
    truncate(paths[70])
    os.remove(paths[30])
    with pytest.raises(DatasetError) as info:
        check_images(paths, threads=4)
    message = str(info.value)
    assert paths[30] in message and "file missing" in message and "1 more of the 100" in message
    assert "\n" not in message and "--skip-data-check" in message


def test_train_refuses_a_truncated_training_jpeg_in_one_line_also_in_train_log(tmp_path, synth_root, capsys,
                                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = copy_tree(synth_root, tmp_path)
    victim = os.path.join(root, "cam3", sorted(os.listdir(os.path.join(root, "cam3")))[-1])
    victim = os.path.join(victim, sorted(os.listdir(victim))[0])
    truncate(victim)
    before = open(victim, "rb").read()
    code, out, err = train(["--config", "lba_synth", "--data-root", root, "--out", "run", *SMALL], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: data check:") and victim in err and "truncated" in err
    log = open(os.path.join("run", "train.log")).read()
    assert err in log  # the line the user saw is in the run's log
    assert "run: recipe lba" in log  # the banner
    assert open(victim, "rb").read() == before
    assert not os.path.exists(os.path.join("run", "last.pt"))


def test_skip_data_check_skips_it(tmp_path, synth_root, capsys):
    """A test identity without infrared images: refused by the check, trained with --skip-data-check
    (eval.final=false: nothing reads the test split)."""
    root = copy_tree(synth_root, tmp_path)
    test_ids = [int(t) for t in open(os.path.join(root, "exp", "test_id.txt")).read().split(",")]
    for cam in (3, 6):
        shutil.rmtree(os.path.join(root, f"cam{cam}", f"{test_ids[0]:04d}"), ignore_errors=True)
    args = ["--config", "lba_synth", "--data-root", root, "--out", str(tmp_path / "run"), *SMALL]
    code, _, err = train(args, capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert f"test identities {test_ids[0]} " in err and "no infrared image" in err and root in err
    code, out, err = train(args + ["--skip-data-check"], capsys)
    assert code == 0, err
    assert "data check" not in out and "data check" not in open(tmp_path / "run" / "train.log").read().split(
        "run: recipe")[-1]


def test_a_test_identity_without_visible_images_is_refused(tmp_path, synth_root, capsys):
    root = copy_tree(synth_root, tmp_path)
    last = int(open(os.path.join(root, "exp", "test_id.txt")).read().split(",")[-1])
    for cam in (1, 2, 4, 5):
        shutil.rmtree(os.path.join(root, f"cam{cam}", f"{last:04d}"), ignore_errors=True)
    code, _, err = train(["--config", "lba_synth", "--data-root", root, "--out", str(tmp_path / "run"), *SMALL],
                         capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert f"test identities {last} " in err and "no visible image" in err


def write_regdb(root, ids=(1, 2, 3, 4)):
    """A RegDB tree with train and test splits of trial 1 (2 images per identity and modality)."""
    for split in ("train", "test"):
        for modality, folder in (("visible", "Visible"), ("thermal", "Thermal")):
            lines = []
            for label, pid in enumerate(ids):
                os.makedirs(root / folder / str(pid), exist_ok=True)
                for k in range(2):
                    name = f"{split}_{folder[0]}_{pid}_{k}.bmp"
                    Image.new("RGB", (16, 32), (50 * label, 40 * k, 120)).save(root / folder / str(pid) / name)
                    lines.append(f"{folder}/{pid}/{name} {label}")
            os.makedirs(root / "idx", exist_ok=True)
            (root / "idx" / f"{split}_{modality}_1.txt").write_text("\n".join(lines) + "\n")
    return root


def test_a_missing_listed_image_is_named(tmp_path, capsys):
    root = write_regdb(tmp_path / "RegDB")
    missing = root / "Thermal" / "3" / "train_T_3_1.bmp"
    os.remove(missing)
    out = tmp_path / "run"
    code, _, err = train(["--config", "lba_regdb", "--data-root", str(root), "--out", str(out), *SMALL], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{missing}: file missing" in err
    assert err in open(out / "train.log").read()
    # and a test identity in one modality's split only
    write_regdb(tmp_path / "RegDB2")
    lines = (tmp_path / "RegDB2" / "idx" / "test_thermal_1.txt").read_text().splitlines()
    (tmp_path / "RegDB2" / "idx" / "test_thermal_1.txt").write_text("\n".join(lines[:-2]) + "\n")
    code, _, err = train(["--config", "lba_regdb", "--data-root", str(tmp_path / "RegDB2"), "--out",
                          str(tmp_path / "run2"), *SMALL], capsys)
    assert code == 2 and "test identities 3 " in err and "test_visible_1.txt" in err


def test_everything_printed_reaches_train_log(tmp_path, synth_root, capsys, monkeypatch):
    """Banner, data check, warnings, per-epoch lines: on the console and in train.log; with
    train.progress=true but output to a pipe, one line per epoch and no bar redraws."""
    monkeypatch.chdir(tmp_path)
    args = ["--config", "lba_synth", "--data-root", synth_root, "--out", "run", *SMALL, "train.epochs=2",
            "train.max_steps_per_epoch=3", "train.progress=true"]
    code, out, err = train(args, capsys, show_warnings=True)
    assert code == 0, err
    log = open(os.path.join("run", "train.log")).read()
    for needle in ("run: recipe lba", "data check:", "epoch 1:", "epoch 2:", "model.pretrained not set"):
        assert needle in log, needle
    assert "warning: model.pretrained not set" in err  # a Python warning: stderr and train.log
    console_epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    logged = [line.split(" ", 1)[1] for line in log.splitlines()]  # without the time stamp
    assert len(console_epochs) == 2 and console_epochs == [line for line in logged if line.startswith("epoch ")]
    assert "\r" not in out + err and "it/s" not in err  # no progress bar into a pipe


def test_progress_bar_redraws_in_a_terminal(monkeypatch):
    from reid_kernels.training.engine.logs import progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = progress(3, "epoch 1/1", enabled=True)
    assert bar is not None
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert "\r" in terminal.getvalue()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress(3, "epoch 1/1", enabled=True) is None


def test_an_unexpected_error_keeps_its_traceback_and_reaches_train_log(tmp_path, synth_root, capsys, monkeypatch):
    from reid_kernels.training.engine.loop import Trainer

    def broken(self, *args, **kwargs):
        raise RuntimeError("boom in epoch")

    monkeypatch.setattr(Trainer, "train_epoch", broken)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom in epoch"):
        train(["--config", "lba_synth", "--data-root", synth_root, "--out", str(out), *SMALL], capsys)
    log = open(out / "train.log").read()
    assert "Traceback (most recent call last)" in log and "RuntimeError: boom in epoch" in log


# --- the protocol on trees without a modality (reid_kernels.protocols) ---------------------------
def sysu_tree(root, visible_ids=(1, 2), ir_ids=(1, 2), test_ids=(1, 2)):
    for cam in range(1, 7):
        os.makedirs(root / f"cam{cam}", exist_ok=True)
    for cam, ids in ((1, visible_ids), (2, visible_ids), (3, ir_ids)):
        for pid in ids:
            os.makedirs(root / f"cam{cam}" / f"{pid:04d}")
            for k in range(2):
                (root / f"cam{cam}" / f"{pid:04d}" / f"{k + 1:04d}.jpg").write_bytes(b"")
    os.makedirs(root / "exp", exist_ok=True)
    (root / "exp" / "test_id.txt").write_text(",".join(map(str, test_ids)) + "\n")
    return root


def features(paths):
    return torch.randn(len(paths), 4, generator=torch.Generator().manual_seed(len(paths)))


def test_protocol_without_infrared_images_names_the_cameras_and_root(tmp_path):
    from reid_kernels.protocols import evaluate_sysu

    root = sysu_tree(tmp_path / "sysu", ir_ids=())
    with pytest.raises(FileNotFoundError, match=r"no infrared query image.*cam3/<id>/, cam6/<id>/") as info:
        evaluate_sysu(root, features, trials=1)
    assert str(root) in str(info.value) and "2 test identities" in str(info.value)


def test_protocol_without_visible_images_names_the_ids_and_cameras(tmp_path):
    from reid_kernels.protocols import evaluate_sysu

    root = sysu_tree(tmp_path / "sysu", visible_ids=())
    with pytest.raises(FileNotFoundError, match=r"no visible gallery image for all-search.*\(1, 2\).*cam1/<id>/"):
        evaluate_sysu(root, features, trials=1, modes=("all",))
    # visible images for other identities than the infrared ones: no query can match
    root = sysu_tree(tmp_path / "sysu2", visible_ids=(2,), ir_ids=(1,))
    with pytest.raises(FileNotFoundError, match=r"identities 1 have infrared images only, 2 visible"):
        evaluate_sysu(root, features, trials=1, modes=("all",))
    # the fixed path still evaluates a well-formed tree
    table = evaluate_sysu(sysu_tree(tmp_path / "sysu3"), features, trials=1, modes=("all",), shots=("single",))
    assert len(table.settings) == 1 and 0.0 < table.settings[0].mean("mAP") <= 1.0


def test_evaluate_cli_turns_the_protocol_error_into_one_line(tmp_path, synth_root, capsys):
    from reid_kernels.training.evaluate import main as evaluate_main

    out = tmp_path / "run"
    assert train(["--config", "lba_synth", "--data-root", synth_root, "--out", str(out), *SMALL], capsys)[0] == 0
    root = copy_tree(synth_root, tmp_path)
    for cam in (3, 6):
        shutil.rmtree(os.path.join(root, f"cam{cam}"))
        os.makedirs(os.path.join(root, f"cam{cam}"))
    assert evaluate_main(["--checkpoint", str(out / "final.pt"), "--data-root", root, "eval.trials=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no infrared query image" in err and root in err
