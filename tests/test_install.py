"""The built wheel, installed into a fresh virtual environment outside the checkout, works as a
user would use it: from an unrelated folder that holds a ``training/`` package of its own.

What is proven: ``pip install`` adds exactly one top-level package (``reid_kernels``); the wheel
holds the compiled extension, the training application as ``reid_kernels.training`` and its
configs; the console commands run a one-epoch synthetic training and an evaluation; the user's
own ``training`` package still imports as theirs; the sdist holds the csrc headers the build
needs.  Nothing of the checkout is on the venv's path (the test asserts where each module loads
from).

How it reuses the CPU torch without network: the venv's pip resolves the wheel's dependencies
exactly as the README's set-up does (pip's configured local index and wheel folder), with torch
pinned to the version already installed here, so pip takes the same CPU wheel from disk rather
than resolving a newer (CUDA) build.

Building the wheel compiles the C++ extension (about 3 minutes on 2 cores): marker ``install``,
run once per CI run (``make test``) and left out of the capped second run in ``.ci/run``.
"""
import json
import os
import subprocess
import sys
import time
import zipfile

import pytest
import torch

install = pytest.mark.install

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("reid-train", "reid-evaluate", "reid-demo", "reid-synth", "reid-visualize", "reid-pretrain", "reid-index",
            "reid-search", "reid-export")


def _run(cmd, cwd, env=None, timeout=900, check=True):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def _user_env():
    """The environment of a user's shell: nothing pointing at the checkout or this venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not os.path.abspath(p).startswith(ROOT))
    return env


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(wheel path, sdist path, seconds the wheel took to build)."""
    out = tmp_path_factory.mktemp("dist")
    start = time.time()
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(out), ROOT],
         cwd=str(out), env={**os.environ, "REID_KERNELS_NO_CUDA": "1"})
    seconds = time.time() - start
    print(f"\nwheel built in {seconds:.0f} s")
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", str(out)], cwd=ROOT,
         env={**os.environ, "REID_KERNELS_NO_CUDA": "1"})
    wheels = [p for p in os.listdir(out) if p.endswith(".whl")]
    sdists = [p for p in os.listdir(out) if p.endswith(".tar.gz")]
    assert len(wheels) == 1 and len(sdists) == 1, os.listdir(out)
    return str(out / wheels[0]), str(out / sdists[0]), seconds


@pytest.fixture(scope="module")
def venv(built, tmp_path_factory):
    """A fresh venv with the wheel installed; its bin/ folder."""
    path = tmp_path_factory.mktemp("venv")
    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", str(path)], cwd=str(path), env=_user_env())
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    start = time.time()
    _run([str(path / "bin" / "python"), "-m", "pip", "install", "-q", built[0], torch_pin], cwd=str(path),
         env=_user_env())
    print(f"\nvenv install took {time.time() - start:.0f} s")
    return path / "bin"


@install
@pytest.mark.slow
def test_wheel_has_one_top_level_package_and_its_data(built):
    names = zipfile.ZipFile(built[0]).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"reid_kernels"}, sorted(top)
    assert any(n.startswith("reid_kernels/_C") and n.endswith(".so") for n in names)
    assert "reid_kernels/training/configs/lba_synth.yaml" in names
    assert "reid_kernels/training/engine/loop.py" in names and "reid_kernels/training/errors.py" in names
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(built[0]).read(entry).decode()
    for command in COMMANDS:
        assert f"{command} = reid_kernels.training.commands:" in text


@install
@pytest.mark.slow
def test_sdist_holds_the_sources_the_build_needs(built):
    import tarfile

    names = {n.split("/", 1)[1] for n in tarfile.open(built[1]).getnames() if "/" in n}
    headers = {os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(os.path.join(ROOT, "csrc"))
               for f in fs if f.endswith((".h", ".cuh"))}
    assert headers and headers <= names, sorted(headers - names)
    assert "training/configs/lba_synth.yaml" in names and "MANIFEST.in" in names


@install
@pytest.mark.slow
def test_installed_commands_beside_a_foreign_training_package(venv, tmp_path):
    user = tmp_path / "project"
    (user / "training").mkdir(parents=True)
    (user / "training" / "__init__.py").write_text("WHO = 'the user'\n")
    env = _user_env()
    for command in COMMANDS:
        assert f"usage: {command}" in _run([str(venv / command), "--help"], cwd=str(user), env=env).stdout
    bad = _run([str(venv / "reid-train"), "--config", "no_such_config"], cwd=str(user), env=env, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("config error: config: 'no_such_config'")
    _run([str(venv / "reid-synth"), "--out", "data", "--ids", "12", "--test-ids", "4", "--height", "32",
          "--width", "16", "--images-per-cam", "2"], cwd=str(user), env=env)
    _run([str(venv / "reid-train"), "--config", "lba_synth", "--data-root", "data", "--out", "run",
          "data.height=32", "data.width=16", "data.pad=2", "model.width=8", "train.epochs=1",
          "train.max_steps_per_epoch=2", "train.progress=false", "train.threads=1", "eval.trials=1",
          "eval.final=false", "sampler.num_ids=4", "sampler.num_pos=2"], cwd=str(user), env=env)
    assert (user / "run" / "final.pt").is_file()
    _run([str(venv / "reid-evaluate"), "--checkpoint", "run/final.pt", "--json", "eval.json", "eval.trials=1"],
         cwd=str(user), env=env)
    rows = json.loads((user / "eval.json").read_text())["rows"]
    assert rows and all(0.0 <= row["mAP"] <= 100.0 for row in rows), rows
    probe = ("import json, reid_kernels, reid_kernels.training, training; "
             "print(json.dumps([reid_kernels.__file__, reid_kernels.training.__file__, training.__file__, "
             "training.WHO, reid_kernels.extension_available()]))")
    kernels, app, theirs, who, extension = json.loads(
        _run([str(venv / "python"), "-c", probe], cwd=str(user), env=env).stdout)
    site = str(venv.parent)
    assert kernels.startswith(site) and app.startswith(site) and not app.startswith(ROOT)
    assert theirs == str(user / "training" / "__init__.py") and who == "the user"
    assert extension is True


@install
@pytest.mark.slow
def test_installed_files_are_one_top_level_package(venv):
    """Every file the wheel put into site-packages lies under reid_kernels/ or its dist-info."""
    out = _run([str(venv / "python"), "-c",
                "import importlib.metadata as m; print('\\n'.join(str(f) for f in m.distribution('reid_kernels').files))"],
               cwd=str(venv), env=_user_env()).stdout.split()
    top = {f.split("/")[0] for f in out if not f.startswith("..")}  # ../../../bin/reid-*: the commands
    assert {t for t in top if not t.endswith(".dist-info")} == {"reid_kernels"}, sorted(top)


# The console commands' own logic, through the checkout's editable install (no wheel build).

def test_a_command_names_itself_in_help_and_errors(capsys):
    from reid_kernels.training.cli import set_prog
    from reid_kernels.training.commands import run

    try:
        with pytest.raises(SystemExit) as exit_info:
            run("synth", "reid-synth", ["--help"])
        assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("usage: reid-synth ")
        with pytest.raises(SystemExit) as exit_info:
            run("synth", "reid-synth", ["--ids", "x"])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.startswith("error: argument --ids: invalid int value: 'x' (see reid-synth --help)")
    finally:
        set_prog(None)


@pytest.mark.skipif(__import__("reid_kernels.training.reproducible", fromlist=["x"]).cpu_lacks_avx2() is not None,
                    reason="needs an x86-64 CPU with AVX2")
@pytest.mark.parametrize("switch, pinned", [([], True), (["--no-reproducible"], False)])
def test_a_command_restarts_with_the_reproducible_pins(tmp_path_factory, tmp_path, switch, pinned):
    """torch is loaded before a command's code runs, so reid-train re-executes itself with the pins
    set (and does not when they are turned off)."""
    from reid_kernels.training.reproducible import PINS
    from train_helpers import tiny_synth

    root = tiny_synth(tmp_path_factory, "synth_commands", seed=3)
    out = tmp_path / "run"
    code = ("import sys; from reid_kernels.training.commands import train; sys.argv[0] = 'reid-train'; "
            "sys.exit(train())")
    env = {k: v for k, v in os.environ.items() if k not in PINS}
    result = subprocess.run([sys.executable, "-c", code, "--config", "lba_synth", "--data-root", root, "--out", str(out),
                             "data.height=32", "data.width=16", "data.pad=2", "model.width=8", "train.epochs=1",
                             "train.max_steps_per_epoch=1", "train.progress=false", "eval.final=false",
                             "train.tensorboard=false", *switch], cwd=str(tmp_path), env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    setting = json.load(open(out / "history.json"))["reproducible"]
    assert setting["pinned"] is pinned and setting["requested"] is pinned
    assert setting["env"] == (PINS if pinned else dict.fromkeys(PINS))
