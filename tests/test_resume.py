"""``--resume`` continues the saved run: the checkpoint's config, overrides limited to the keys that
cannot change what is trained (``--resume-with-changes`` records the others), every checkpoint error
one line naming the file and what is wrong, checked before any dataset work, and durable saves
(``fsync`` of the temporary file before the rename and of the folder after it)."""
import json
import os
import shutil
import stat
import struct
import warnings
import zipfile

import pytest
import torch
import yaml
from train_helpers import CLI_SMALL, folder_digest, run_train_cli, tiny_synth

from reid_kernels.training.engine import checkpoint as ck
from reid_kernels.training.engine import durable
from reid_kernels.training.train import main as train_main

SMALL = CLI_SMALL


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return tiny_synth(tmp_path_factory, "synth_resume", seed=5)


digest, run = folder_digest, run_train_cli


def args_for(root, out, *extra, config="lba_synth"):
    return ["--config", config, "--data-root", root, "--out", str(out), *SMALL, *extra]


@pytest.fixture(scope="module")
def finished_run(synth_root, tmp_path_factory):
    """One LbA run of 1 epoch (1 step) with ``loss.dt=false``; tests copy its folder."""
    out = tmp_path_factory.mktemp("finished") / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert train_main(args_for(synth_root, out, "loss.dt=false")) == 0
    return out


def copy_run(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def refused(args, capsys, folder, *needles):
    """The command exits 2 with one line on stderr holding every needle; ``folder`` is untouched."""
    before = digest(folder)
    code, err = run(args, capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert digest(folder) == before
    return err


# --- the run's config -------------------------------------------------------------------------------
def test_resume_keeps_the_stored_switch_refuses_a_change_and_records_a_forced_one(finished_run, synth_root, tmp_path,
                                                                                capsys):
    out = copy_run(finished_run, tmp_path)
    # without repeating loss.dt=false: the run continues without DT (no dt4/dt5 terms in epoch 2)
    assert run(args_for(synth_root, out, "--resume", "train.epochs=2"), capsys)[0] == 0
    history = json.load(open(out / "history.json"))
    assert "dt4" not in history["history"][1] and "ic4" in history["history"][1]
    assert yaml.safe_load(open(out / "config.yaml"))["loss"]["dt"] is False
    # switching it on is refused, naming the key with both values
    err = refused(args_for(synth_root, out, "--resume", "train.epochs=3", "loss.dt=true"), capsys, out,
                  "loss.dt: false -> true", "--resume-with-changes", str(out / "last.pt"))
    assert err.startswith("config error: --resume:") and "train.epochs" not in err.split("(checkpoint")[0]
    # ... and applied with the flag: logged, in history.json and config_changes.yaml with its epoch
    assert run(args_for(synth_root, out, "--resume", "train.epochs=3", "loss.dt=true", "--resume-with-changes"),
               capsys)[0] == 0
    history = json.load(open(out / "history.json"))
    assert "dt4" in history["history"][2]  # epoch 3 trained with DT
    assert {"epoch": 3, "key": "loss.dt", "from": False, "to": True, "forced": True} in history["config_changes"]
    assert {"epoch": 2, "key": "train.epochs", "from": 1, "to": 2, "forced": False} in history["config_changes"]
    log = open(out / "train.log").read()
    assert "config changed by --resume-with-changes, from epoch 3: loss.dt: false -> true" in log
    assert yaml.safe_load(open(out / "config.yaml"))["loss"]["dt"] is False  # the run as it started
    assert yaml.safe_load(open(out / "config.yaml"))["train"]["epochs"] == 1
    assert yaml.safe_load(open(out / "config_changes.yaml")) == history["config_changes"]
    final = ck.read_checkpoint(str(out / "final.pt"))
    assert final["config"]["loss"]["dt"] is True and final["config_changes"] == history["config_changes"]


def test_the_trainer_api_refuses_a_change_too(synth_root, tmp_path):
    from train_helpers import make_trainer, small_config

    from reid_kernels.training.config import ConfigError

    cfg = small_config("lba_synth", synth_root, str(tmp_path / "run"), **{"train.max_steps_per_epoch": 1,
                                                                          "train.epochs": 1})
    make_trainer(cfg).fit()
    changed = small_config("lba_synth", synth_root, str(tmp_path / "run"),
                           **{"train.max_steps_per_epoch": 1, "train.epochs": 2, "loss.ic": False})
    trainer = make_trainer(changed)
    with pytest.raises(ConfigError, match=r"loss.ic: true -> false"):
        trainer.fit(resume=str(tmp_path / "run" / "last.pt"))
    assert make_trainer(changed).fit(resume=str(tmp_path / "run" / "last.pt"), resume_with_changes=True)["history"]


def test_resume_with_another_recipe_or_model_is_one_line(finished_run, synth_root, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    refused(["--config", "mce_synth", "--out", str(out), "--resume"], capsys, out,
            "--config mce_synth is recipe mce", "recipe lba", str(out / "last.pt"))
    refused(["--config", "lba_sysu", "--out", str(out), "--resume"], capsys, out, "on sysu data", "on synth data")
    # a wider model (forced) does not fit the checkpoint's weights: the first keys with both shapes
    err = refused(args_for(synth_root, out, "--resume", "train.epochs=2", "model.width=16", "--resume-with-changes"),
                  capsys, out, "holds another model", "other shapes: ")
    assert "visible_stem.conv1.weight 8x3x7x7 (model 16x3x7x7)" in err and " more)" in err
    # evaluate reads a tampered model the same way: one line, not a state-dict traceback
    from reid_kernels.training.evaluate import main as evaluate_main

    state = torch.load(out / "final.pt", weights_only=False)
    state["model"] = {k: v for k, v in state["model"].items() if "layer4" not in k}
    torch.save(ck.seal(state), tmp_path / "cut.pt")
    assert evaluate_main(["--checkpoint", str(tmp_path / "cut.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds another model" in err and "missing: layer4." in err and len(err.splitlines()) == 1


def test_another_class_count_and_another_folder_holding_a_run(finished_run, synth_root, tmp_path, capsys):
    from reid_kernels.training.synth import SynthConfig, generate

    out = copy_run(finished_run, tmp_path)
    other = tmp_path / "fewer_ids"  # 18 training identities instead of 20
    generate(str(other), SynthConfig(ids=28, test_ids=10, height=32, width=16, images_per_cam=3, seed=5))
    code, err = run(args_for(str(other), out, "--resume", "train.epochs=2"), capsys)
    assert code == 2 and "trained on 20 identities" in err and "has 18" in err, err
    # --resume PATH --out DIR where DIR holds another run: refused, that run untouched
    second = copy_run(finished_run, tmp_path / "second")
    refused(args_for(synth_root, second, "--resume", str(out / "last.pt"), "train.epochs=2"), capsys, second,
            "already holds another run")
    # --resume PATH without --out continues in PATH's folder
    assert run(["--config", "lba_synth", "--resume", str(out / "last.pt"), "train.epochs=2"], capsys)[0] == 0
    assert len(json.load(open(out / "history.json"))["history"]) == 2
    code, err = run(args_for(synth_root, out, "--resume-with-changes"), capsys)
    assert code == 2 and "only with --resume" in err


# --- damaged and foreign checkpoints ----------------------------------------------------------------
def largest_tensor_offset(path) -> int:
    """Where the bytes of the checkpoint's largest tensor start (torch stores zip entries uncompressed)."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length + info.file_size // 2


def test_truncated_and_bit_flipped_checkpoints(finished_run, synth_root, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    last = out / "last.pt"
    good = last.read_bytes()
    last.write_bytes(good[: len(good) // 2])
    refused(args_for(synth_root, out, "--resume", "train.epochs=2"), capsys, out,
            "is damaged (truncated or corrupt", "failed finding central directory", str(last))
    flipped = bytearray(good)
    flipped[largest_tensor_offset(str(out / "final.pt"))] ^= 0x08  # final.pt has last.pt's layout
    last.write_bytes(bytes(flipped))
    torch.load(last, weights_only=False)  # torch itself loads it without a word: the digest is what catches it
    refused(args_for(synth_root, out, "--resume", "train.epochs=2"), capsys, out,
            "is damaged (corrupt): its content does not match the SHA-256 digest", str(last))
    last.write_bytes(b"")
    refused(args_for(synth_root, out, "--resume", "train.epochs=2"), capsys, out, "the file is empty")
    # a torch file that is no training checkpoint, and one that lacks what a resume needs
    torch.save({"weight": torch.zeros(2)}, last)
    refused(args_for(synth_root, out, "--resume"), capsys, out, "not a checkpoint written by training.train")
    state = torch.load(out / "final.pt", weights_only=False)
    del state["optimizer"]
    torch.save(ck.seal(state), last)
    refused(args_for(synth_root, out, "--resume"), capsys, out, "is incomplete: it lacks optimizer")


def test_another_toolkit_version_and_checkpoints_from_before_the_version_field(finished_run, synth_root, tmp_path,
                                                                             capsys):
    out = copy_run(finished_run, tmp_path)
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["format"] == ck.FORMAT and state["version"] == ck.toolkit_version()
    newer = ck.seal(state)
    newer.update(format="reid_kernels.training/2", version="9.9.9")
    newer["digest"] = ck.content_digest(newer)
    torch.save(newer, out / "last.pt")
    refused(args_for(synth_root, out, "--resume", "train.epochs=2"), capsys, out, "reid_kernels 9.9.9",
            "'reid_kernels.training/2'", f"this is reid_kernels {ck.toolkit_version()}", "'reid_kernels.training/1'")
    future = dict(state)
    future["config"] = {**state["config"], "train": {**state["config"]["train"], "warp_drive": True}}
    torch.save(ck.seal(future), out / "last.pt")
    refused(args_for(synth_root, out, "--resume", "train.epochs=2"), capsys, out,
            "holds a config this version cannot use (train.warp_drive: unknown config key)")
    # written before checkpoints carried a version and a digest: still resumes
    old = {k: v for k, v in state.items() if k not in ("version", "digest", "config_changes")}
    torch.save(old, out / "last.pt")
    assert run(args_for(synth_root, out, "--resume", "train.epochs=2"), capsys)[0] == 0
    assert "written by reid_kernels unknown" in open(out / "train.log").read()


@pytest.mark.parametrize("damage", ["truncated", "flipped", "version", "recipe", "model"])
def test_checkpoint_errors_come_before_any_dataset_work(damage, finished_run, tmp_path, capsys, monkeypatch):
    import reid_kernels.training.engine.loop as loop

    out = copy_run(finished_run, tmp_path)
    last = out / "last.pt"
    state = torch.load(last, weights_only=False)
    extra, config = ["--resume", "train.epochs=2"], "lba_synth"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[:1000])
    elif damage == "flipped":
        state["history"][0]["loss"] += 1.0
        torch.save(state, last)
    elif damage == "version":
        torch.save({**state, "format": "reid_kernels.training/0"}, last)
    elif damage == "recipe":
        config = "mce_synth"
    else:
        extra += ["model.depth=18", "--resume-with-changes"]
    # a data root that fails its check: a folder of the user's files, not a synthetic set
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine\n")

    def no_trainer(*args, **kwargs):
        raise AssertionError("the trainer (dataset check, model build) must not start")

    monkeypatch.setattr(loop, "Trainer", no_trainer)
    err = refused(["--config", config, "--data-root", str(mine), "--out", str(out), *SMALL, *extra], capsys, out)
    assert str(last) in err and "data.root" not in err and "notes.txt" not in err, err


# --- durable saves ----------------------------------------------------------------------------------
def record_fsyncs(monkeypatch):
    """Patch ``os.fsync`` to record what each call syncs: ("file" | "folder", path, whether the
    target exists at that moment) -- then sync for real."""
    calls = []
    real = os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")  # Linux: the path the descriptor was opened with, resolved
        calls.append(("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file", path))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    calls = record_fsyncs(monkeypatch)
    target = tmp_path / "history.json"
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append(list(calls))  # what was synced when the rename happened
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    durable.atomic_write_text(str(target), "new\n")
    assert target.read_text() == "new\n"
    temporary = os.path.realpath(f"{target}.tmp.{os.getpid()}")
    assert seen == [[("file", temporary)]]
    assert calls == [("file", temporary), ("folder", os.path.realpath(tmp_path))]
    # a failing write leaves the old file and no temporary
    def broken(tmp):
        open(tmp, "wt").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        durable.atomic_write(str(target), broken)
    assert target.read_text() == "new\n" and os.listdir(tmp_path) == ["history.json"]


def test_every_file_a_run_reads_back_is_saved_durably(synth_root, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "history.json.tmp.4242").write_text("{")  # left by a killed save: removed
    (out / "notes.tmp.7").write_text("mine")  # not the run's: kept
    calls = record_fsyncs(monkeypatch)
    assert run(args_for(synth_root, out), capsys)[0] == 0
    synced = [path for kind, path in calls if kind == "file"]
    pid = os.getpid()
    for name in ("config.yaml", "last.pt", "final.pt", "history.json"):
        assert os.path.realpath(out / f"{name}.tmp.{pid}") in synced, name
    assert calls.count(("folder", os.path.realpath(out))) == len(synced)  # each rename followed by a folder sync
    assert sorted(os.listdir(out)) == ["config.yaml", "final.pt", "history.json", "last.pt", "notes.tmp.7",
                                       "train.log"]
