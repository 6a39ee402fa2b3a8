"""The reproducible CPU setting (training.reproducible) and train.deterministic: the pins are in
the environment before torch loads in every training CLI, ``--no-reproducible`` leaves them out,
the state is recorded in train.log and history.json, and the refusals say why."""
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from train_helpers import tiny_synth

from reid_kernels.training import reproducible
from reid_kernels.training.demo import format_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_AVX2 = reproducible.cpu_lacks_avx2()
needs_avx2 = pytest.mark.skipif(NO_AVX2 is not None, reason=f"needs an x86-64 CPU with AVX2: {NO_AVX2}")
SMALL = ["data.height=32", "data.width=16", "data.pad=2", "model.width=8", "train.epochs=1",
         "train.max_steps_per_epoch=1", "train.progress=false", "eval.final=false", "train.tensorboard=false"]

# Runs a CLI module as `python -m` does, and records the environment at the moment torch is first
# imported (a meta-path hook): what torch's libraries will read, not what is set afterwards.
ENV_AT_TORCH_IMPORT = textwrap.dedent("""
    import json, os, runpy, sys
    seen = {}
    class Spy:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" and not seen:
                seen.update({k: os.environ.get(k) for k in %r})
            return None
    sys.meta_path.insert(0, Spy())
    module, args = sys.argv[1], sys.argv[2:]
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit:
        pass
    print("ENV " + json.dumps(seen))
""") % (list(reproducible.PINS),)


def clean_env() -> dict:
    """This process's environment without the pins (CI's capped run sets other values for them)."""
    return {k: v for k, v in os.environ.items() if k not in reproducible.PINS}


def env_at_torch_import(module: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", ENV_AT_TORCH_IMPORT, module, *args], cwd=ROOT, env=clean_env(),
                         capture_output=True, text=True, timeout=120)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("ENV ")]
    assert line, out.stdout + out.stderr
    return json.loads(line[-1][4:])


@needs_avx2
@pytest.mark.parametrize("module", ["training.train", "training.evaluate", "training.demo"])
def test_every_cli_sets_the_pins_before_torch_loads(module):
    assert env_at_torch_import(module, "--help") == reproducible.PINS
    # the switch off: nothing set (the user's environment is left as it is)
    assert env_at_torch_import(module, "--help", "--no-reproducible") == dict.fromkeys(reproducible.PINS)


@needs_avx2
def test_the_setting_is_recorded_in_the_banner_and_history(tmp_path_factory, tmp_path):
    root = tiny_synth(tmp_path_factory, "synth_repro", seed=5)
    for switch, pinned in (([], True), (["--no-reproducible"], False)):
        out = tmp_path / ("on" if pinned else "off")
        run = subprocess.run([sys.executable, "-m", "training.train", "--config", "lba_synth", "--data-root", root,
                              "--out", str(out), *SMALL, *switch], cwd=ROOT, env=clean_env(), capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        setting = json.load(open(out / "history.json"))["reproducible"]
        assert setting["pinned"] is pinned and setting["requested"] is pinned
        assert setting["threads"] == 1 and setting["torch"] == torch.__version__
        banner = open(out / "train.log").read().splitlines()[1]
        if pinned:
            assert "reproducible CPU setting on (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2" in banner
            assert setting["env"] == reproducible.PINS and setting["aten_cpu_capability"] == "AVX2"
        else:
            assert "reproducible CPU setting off: turned off (--no-reproducible)" in banner
            assert setting["env"] == dict.fromkeys(reproducible.PINS)


@pytest.fixture
def fresh_decision(monkeypatch):
    monkeypatch.setattr(reproducible, "_decision", None)
    for key in reproducible.PINS:
        monkeypatch.delenv(key, raising=False)


@needs_avx2
def test_torch_already_loaded_with_other_settings_is_said_not_pinned(fresh_decision):
    said = io.StringIO()
    assert reproducible.pin_before_torch(True, stream=said) is False
    assert "torch was imported before the pins were set" in said.getvalue()
    assert "ATEN_CPU_CAPABILITY=(unset)" in said.getvalue()
    assert os.environ.get("ATEN_CPU_CAPABILITY") is None  # nothing half-set
    state = reproducible.state()
    assert state["pinned"] is False and "torch was imported before" in state["reason"]
    assert reproducible.describe(state).startswith("reproducible CPU setting off: torch was imported before")


def test_pins_already_in_the_environment_are_accepted(fresh_decision, monkeypatch):
    for key, value in reproducible.PINS.items():
        monkeypatch.setenv(key, value)
    assert reproducible.pin_before_torch(True, stream=io.StringIO()) is (NO_AVX2 is None)


@pytest.mark.parametrize("machine, flags, says", [
    ("aarch64", None, "this is a aarch64 CPU, not x86-64"),
    ("x86_64", ["fpu", "sse4_2", "avx"], "has no AVX2"),
])
def test_a_cpu_without_avx2_gets_a_clear_message(fresh_decision, monkeypatch, machine, flags, says):
    monkeypatch.setattr(reproducible.platform, "machine", lambda: machine)
    monkeypatch.setattr(reproducible, "_cpu_flags", lambda: flags)
    said = io.StringIO()
    assert reproducible.pin_before_torch(True, stream=said) is False
    assert said.getvalue().startswith("reproducible CPU setting not in effect: ") and says in said.getvalue()
    assert "figures will differ from the README's" in said.getvalue()
    assert all(os.environ.get(k) is None for k in reproducible.PINS)


def test_x86_with_avx2_is_accepted(monkeypatch):
    monkeypatch.setattr(reproducible.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(reproducible, "_cpu_flags", lambda: ["sse4_2", "avx", "avx2", "fma"])
    assert reproducible.cpu_lacks_avx2() is None
    monkeypatch.setattr(reproducible, "_cpu_flags", lambda: ["sse4_2", "avx", "avx2"])  # AVX2 without FMA
    assert "no AVX2" in reproducible.cpu_lacks_avx2()


def test_switch_off_leaves_the_environment_alone(fresh_decision, monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    assert reproducible.wanted(["--out", "x", "--no-reproducible"]) is False and reproducible.wanted([]) is True
    assert reproducible.pin_before_torch(False) is False
    assert os.environ["ATEN_CPU_CAPABILITY"] == "default" and os.environ.get("MKL_CBWR") is None
    assert reproducible.state()["reason"] == "turned off (--no-reproducible)"


def test_demo_table_says_the_setting():
    runs = [{"row": "baseline", "key": "baseline", "seed": 0, "mAP": 0.33, "R1": 0.29, "mINP": 0.2378, "seconds": 40}]
    cfg = {"data": {"synth": {"ids": 120, "test_ids": 40}, "height": 64, "width": 32}, "eval": {"trials": 3},
           "model": {"depth": 10, "width": 16}, "train": {"epochs": 12}}
    setting = {"pinned": True, "aten_cpu_capability": "AVX2", "torch": "2.13.0+cpu", "threads": 1}
    table = format_table(runs, cfg, [0], 50.0, 3.0, setting)
    assert "| baseline | 33.00 | 29.00 | 23.78 | 40 s |" in table
    assert ("reproducible CPU setting on (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2; "
            "ATen AVX2, torch 2.13.0+cpu, 1 thread(s))") in table


@pytest.fixture
def restore_determinism(monkeypatch):
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


def test_deterministic_sets_what_cuda_needs(restore_determinism):
    torch.backends.cudnn.benchmark = True
    logged = []
    settings = reproducible.make_deterministic(logged.append)
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic is True and torch.backends.cudnn.benchmark is False
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert settings == {"use_deterministic_algorithms": "warn_only", "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
                        "cudnn.deterministic": True, "cudnn.benchmark": False}
    assert logged == ["train.deterministic: use_deterministic_algorithms warn_only, CUBLAS_WORKSPACE_CONFIG :4096:8, "
                      "cudnn.deterministic True, cudnn.benchmark False"]


def test_deterministic_keeps_a_valid_cublas_setting(restore_determinism, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # cuBLAS's other deterministic setting
    assert reproducible.make_deterministic(lambda _: None)["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_trainer_applies_and_records_train_deterministic(restore_determinism, tmp_path_factory, tmp_path):
    from train_helpers import make_trainer, small_config

    root = tiny_synth(tmp_path_factory, "synth_det", seed=6)
    cfg = small_config("lba_synth", root=root, out=str(tmp_path / "run"), **{"train.deterministic": True,
                                                                              "train.epochs": 1,
                                                                              "train.max_steps_per_epoch": 1})
    trainer = make_trainer(cfg)
    try:
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        trainer.fit()
    finally:
        trainer.close()
    history = json.load(open(tmp_path / "run" / "history.json"))
    assert history["deterministic"]["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert history["reproducible"] == {**reproducible.state(), "threads": 1}
