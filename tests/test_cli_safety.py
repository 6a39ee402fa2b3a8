"""The training CLI never writes over a user's files and refuses bad input in one line (part of the
application-safety work: data roots, finished runs, --pretrained, overrides, numbers, stale temporaries)."""
import os

import pytest
from train_helpers import CLI_SMALL, folder_digest, run_train_cli, tiny_synth

from reid_kernels.training.config import ConfigError, load_config
from reid_kernels.training.train import main as train_main

SMALL = CLI_SMALL


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return tiny_synth(tmp_path_factory, "synth_cli", seed=3)


digest, run = folder_digest, run_train_cli


def test_synthetic_data_is_never_generated_into_a_users_folder(tmp_path, capsys):
    user = tmp_path / "mine"
    (user / "cam1" / "0001").mkdir(parents=True)
    (user / "cam1" / "0001" / "0001.jpg").write_bytes(b"my photo")
    (user / "exp").mkdir()
    (user / "exp" / "train_id.txt").write_text("my ids\n")
    before = digest(user)
    code, err = run(["--config", "lba_synth", "--data-root", str(user), "--out", str(tmp_path / "o"), *SMALL], capsys)
    assert code == 2 and "data.root" in err and str(user) in err and len(err.splitlines()) == 1
    assert digest(user) == before


def test_missing_pretrained_file_is_an_error_naming_it(tmp_path, synth_root, capsys):
    missing = str(tmp_path / "nope" / "resnet50.pth")
    code, err = run(["--config", "lba_synth", "--data-root", synth_root, "--out", str(tmp_path / "o"),
                     "--pretrained", missing, *SMALL], capsys)
    assert code == 2 and missing in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "o")


def test_a_finished_run_is_not_replaced_without_resume_or_overwrite(tmp_path, synth_root, capsys):
    out = str(tmp_path / "run")
    args = ["--config", "lba_synth", "--data-root", synth_root, "--out", out, *SMALL]
    assert run(args, capsys)[0] == 0
    before = digest(out)
    code, err = run(args, capsys)
    assert code == 2 and "--resume" in err and "--overwrite" in err and out in err
    assert digest(out) == before
    open(os.path.join(out, "last.pt.tmp.999999"), "wb").write(b"half a checkpoint")
    assert run(args + ["--overwrite"], capsys)[0] == 0
    assert not any(".tmp." in name for name in os.listdir(out))  # the stale temporary is cleaned
    log = open(os.path.join(out, "train.log")).read()
    assert log.count("run: recipe") == 1  # the replaced run's log went with it


def test_overrides_anywhere_and_after_resume(tmp_path, synth_root, capsys):
    out = str(tmp_path / "run")
    assert run(["--config", "lba_synth", "--out", out, "loss.dt=false", "--data-root", synth_root, *SMALL],
               capsys)[0] == 0
    # `--resume train.epochs=2`: the override is an override, the checkpoint the default one
    assert run(["--config", "lba_synth", "--data-root", synth_root, "--out", out, *SMALL, "loss.dt=false",
                "--resume", "train.epochs=2"], capsys)[0] == 0
    assert "resumed from" in open(os.path.join(out, "train.log")).read()


def test_resume_with_another_process_count_is_one_line(tmp_path, synth_root, capsys):
    import torch

    from reid_kernels.training.engine.checkpoint import seal

    out = str(tmp_path / "run")
    args = ["--config", "lba_synth", "--data-root", synth_root, "--out", out, *SMALL]
    assert run(args, capsys)[0] == 0
    last = os.path.join(out, "last.pt")
    state = torch.load(last, weights_only=False)
    state["ranks"] = state["ranks"] * 2  # as if written by 2 DDP processes
    torch.save(seal(state), last)
    before = digest(out)
    code, err = run(args + ["--resume", "train.epochs=2"], capsys)
    assert code == 2 and "written by 2 process(es)" in err and len(err.splitlines()) == 1
    assert digest(out) == before  # checked before the run starts: nothing in the folder changed


def test_yaml_12_numbers_and_finite_values(tmp_path):
    assert load_config("lba_synth", ["optim.lr_backbone=1e-3"])["optim"]["lr_backbone"] == 0.001
    config = tmp_path / "c.yaml"
    config.write_text("recipe: lba\noptim: {lr_head: 5E-2}\n")
    assert load_config(str(config))["optim"]["lr_head"] == 0.05
    for bad in (".inf", "-.inf", ".nan"):
        with pytest.raises(ConfigError, match="optim.lr_backbone.*finite"):
            load_config("lba_synth", [f"optim.lr_backbone={bad}"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: {lr_head: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML at line \d+"):
        load_config(str(broken))


def test_evaluate_and_visualize_refuse_in_one_line(tmp_path, synth_root, capsys, monkeypatch):
    import torch

    from reid_kernels.training.evaluate import main as evaluate_main
    from reid_kernels.training.visualize import main as visualize_main

    out = str(tmp_path / "run")
    assert run(["--config", "lba_synth", "--data-root", synth_root, "--out", out, *SMALL], capsys)[0] == 0
    final = os.path.join(out, "final.pt")
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    for args, needle in (([("--checkpoint"), str(plain)], "plain.pt"), (["--checkpoint", str(text)], "notes.txt"),
                         (["--checkpoint", str(tmp_path / "absent.pt")], "absent.pt"),
                         (["--checkpoint", final, "eval.trails=3"], "eval.trails")):
        assert evaluate_main(args) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert visualize_main(["--checkpoint", str(text)]) == 2 and "notes.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        visualize_main(["--checkpoint", final, "--pairs", "0"])
    assert "--pairs" in capsys.readouterr().err
    code, err = run(["--config", "lba_synth", "--data-root", synth_root, "--out", out, *SMALL, "--resume", str(text)],
                    capsys)
    assert code == 2 and "notes.txt" in err
    # a relative --data-root is recorded absolute: evaluation works from another folder
    monkeypatch.chdir(tmp_path)
    assert run(["--config", "lba_synth", "--data-root", os.path.relpath(synth_root), "--out", "rel", *SMALL],
               capsys)[0] == 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert evaluate_main(["--checkpoint", str(tmp_path / "rel" / "final.pt"), "eval.trials=1"]) == 0


def test_synth_cli_defaults_fit_and_bad_sizes_are_refused(tmp_path, capsys):
    from reid_kernels.training.synth import main as synth_main

    assert synth_main(["--out", str(tmp_path / "s"), "--ids", "12", "--height", "32", "--width", "16",
                       "--images-per-cam", "1"]) == 0  # the default --test-ids fits 12 ids
    assert len((tmp_path / "s" / "exp" / "test_id.txt").read_text().split(",")) == 4
    for args, needle in ((["--height", "0"], "--height"), (["--ids", "3"], "--ids"),
                         (["--out", str(tmp_path / "s")], "--out")):
        argv = ["--out", str(tmp_path / "t")] + args if args[0] != "--out" else args
        with pytest.raises(SystemExit):
            synth_main(argv)
        assert needle in capsys.readouterr().err


def test_cuda_device_without_cuda_is_one_line(tmp_path, synth_root, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    code, err = run(["--config", "lba_synth", "--data-root", synth_root, "--out", str(tmp_path / "o"), *SMALL,
                     "train.device=cuda"], capsys)
    assert code == 2 and "train.device" in err and len(err.splitlines()) == 1


def test_demo_refuses_in_one_line_and_leaves_user_files_alone(tmp_path, capsys, monkeypatch):
    from reid_kernels.training import demo

    def refused(args, needle, code=2):
        if code == "exit":
            with pytest.raises(SystemExit) as info:
                demo.main(args)
            assert info.value.code == 2
        else:
            assert demo.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
        return err

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes\n")
    before = digest(mine)
    err = refused(["--out", str(mine)], "--out")
    assert str(mine) in err and "notes.txt" in err and digest(mine) == before
    new = tmp_path / "new"
    for args, needle in ((["--rows", "nope"], "--rows"), (["--seeds", "1,x"], "--seeds"),
                         (["--epochs", "two"], "--epochs"), (["--bogus"], "--bogus")):
        refused(["--out", str(new), *args], needle, code="exit")
    assert refused(["--out", str(new), "train.epochz=1"], "train.epochz").startswith("config error:")
    refused(["--out", str(new), "--config", "mce_synth", "--rows", "baseline"], "rows: unknown")
    assert not new.exists()  # nothing written for a refused command
    # a folder an earlier demo wrote is reused; one whose data/ holds the user's files is not written into
    earlier = tmp_path / "earlier"
    (earlier / "data").mkdir(parents=True)
    (earlier / "baseline_seed0").mkdir()
    (earlier / "results.md").write_text("| row |\n")
    demo.check_out_folder(str(earlier))
    (earlier / "data" / "mine.txt").write_text("mine\n")
    before = digest(earlier)
    refused(["--out", str(earlier)], "data.root")
    assert digest(earlier) == before

    def broken(*args, **kwargs):
        raise RuntimeError("an unexpected failure")

    monkeypatch.setattr(demo, "run_demo", broken)
    with pytest.raises(RuntimeError, match="an unexpected failure"):  # keeps its traceback
        demo.main(["--out", str(tmp_path / "other")])


def test_bad_arguments_are_one_line_in_every_cli(capsys):
    from reid_kernels.training.evaluate import main as evaluate_main
    from reid_kernels.training.synth import main as synth_main
    from reid_kernels.training.visualize import main as visualize_main

    for main, args in ((train_main, ["--config"]), (train_main, []), (evaluate_main, ["--device", "tpu"]),
                       (visualize_main, ["--site", "3"]), (synth_main, ["--ids", "many"])):
        with pytest.raises(SystemExit) as info:
            main(args)
        err = capsys.readouterr().err.strip()
        assert info.value.code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err


def test_a_batch_the_data_cannot_fill_and_an_out_file_are_one_line(tmp_path, synth_root, capsys):
    out = tmp_path / "run"
    code, err = run(["--config", "lba_synth", "--data-root", synth_root, "--out", str(out), *SMALL,
                     "sampler.num_ids=500"], capsys)
    assert code == 2 and err.startswith("config error: sampler.num_ids: 500") and len(err.splitlines()) == 1, err
    assert err in open(out / "train.log").read()
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    code, err = run(["--config", "lba_synth", "--data-root", synth_root, "--out", str(notes), *SMALL], capsys)
    assert code == 2 and "--out" in err and "not a folder" in err and notes.read_text() == "mine\n"
