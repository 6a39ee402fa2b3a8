"""Configuration: defaults, YAML files, ``key=value`` overrides, and validation.

Every key has a type and a range; unknown keys and bad values raise
:class:`ConfigError` naming the dotted key, what was expected and what came.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Callable, Dict, Optional, Sequence

import yaml

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key."""


DEFAULTS: Dict[str, Any] = {
    "seed": 0,
    "recipe": "lba",
    "out": "runs/default",
    "data": {
        "dataset": "sysu", "root": None, "trial": 1, "height": 288, "width": 144,
        "flip": 0.5, "pad": 10, "erasing": 0.0, "channel_aug": "none", "channel_prob": 0.5,
        "cache": False, "workers": 4,
        # synthetic data: generated into `root` when it does not exist yet
        "synth": {"ids": 150, "test_ids": 48, "seed": 0, "images_per_cam": 4, "jitter": 0.8,
                  "occlusion": 0.15, "clutter": 3, "noise": 0.03, "palette": 12, "ir_material": 0.35,
                  "ir_invert": False},
    },
    "sampler": {"num_ids": 8, "num_pos": 4},
    "model": {"depth": 50, "width": 64, "last_stride": 1, "stem_stride": 2, "maxpool": True,
              "gem_p": 3.0, "gem_learnable": False, "pretrained": None},
    "loss": {"ic": True, "dt": True, "coattention": True, "sites": [4, 5], "lambda_ic": 1.0, "lambda_dt": 0.5,
             "beta": 50.0, "dt_margin": 0.3, "triplet_margin": 0.3},
    "optim": {"lr_backbone": 0.01, "lr_head": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True,
              "warmup_epochs": 10, "milestones": [20, 50], "gamma": 0.1},
    "train": {"epochs": 81, "amp": "none", "device": "auto", "eval_every": 10, "checkpoint_every": 1,
              "log_every": 20, "max_steps_per_epoch": None, "threads": None, "progress": True,
              "tensorboard": True, "deterministic": False},
    "eval": {"trials": 10, "modes": ["all", "indoor"], "shots": ["single"], "batch_size": 128, "max_rank": 20,
             "final": True},
}


# --- validators: each returns an error description or None --------------------------------
def _int(lo=None, hi=None, nullable=False):
    def check(v):
        if v is None and nullable:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            return f"an integer{' or null' if nullable else ''}"
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            return f"an integer in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        return None
    return check


def _float(lo=None, hi=None, lo_open=False):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            return "a number"
        if lo is not None and (v < lo or (lo_open and v == lo)):
            return f"a number {'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
        if hi is not None and v > hi:
            return f"a number <= {hi}"
        return None
    return check


def _bool(v):
    return None if isinstance(v, bool) else "true or false"


def _choice(*options):
    def check(v):
        return None if v in options else f"one of {list(options)}"
    return check


def _str(nullable=False):
    def check(v):
        if v is None and nullable:
            return None
        return None if isinstance(v, str) and v else f"a non-empty string{' or null' if nullable else ''}"
    return check


def _list(item: Callable, allowed=None, nonempty=True, increasing=False):
    def check(v):
        if not isinstance(v, (list, tuple)) or (nonempty and not v):
            return "a non-empty list" if nonempty else "a list"
        for x in v:
            err = item(x)
            if err or (allowed is not None and x not in allowed):
                return f"a list of {err or 'values in ' + str(list(allowed))}"
        if increasing and list(v) != sorted(set(v)):
            return "a strictly increasing list"
        return None
    return check


SPEC: Dict[str, Callable[[Any], Optional[str]]] = {
    "seed": _int(0), "recipe": _choice("lba"), "out": _str(),
    "data.dataset": _choice("sysu", "regdb", "synth"), "data.root": _str(nullable=True),
    "data.trial": _int(1, 10), "data.height": _int(16), "data.width": _int(8),
    "data.flip": _float(0, 1), "data.pad": _int(0), "data.erasing": _float(0, 1),
    "data.channel_aug": _choice("none", "grayscale", "exchange"), "data.channel_prob": _float(0, 1),
    "data.cache": _bool, "data.workers": _int(0),
    "data.synth.ids": _int(4), "data.synth.test_ids": _int(2), "data.synth.seed": _int(0),
    "data.synth.images_per_cam": _int(1), "data.synth.jitter": _float(0), "data.synth.occlusion": _float(0, 1),
    "data.synth.clutter": _int(0), "data.synth.noise": _float(0), "data.synth.palette": _int(2, 12),
    "data.synth.ir_material": _float(0, 1), "data.synth.ir_invert": _bool,
    "sampler.num_ids": _int(2), "sampler.num_pos": _int(1),
    "model.depth": _choice(10, 18, 34, 50, 101), "model.width": _int(4), "model.last_stride": _choice(1, 2),
    "model.stem_stride": _choice(1, 2), "model.maxpool": _bool, "model.gem_p": _float(1.0),
    "model.gem_learnable": _bool, "model.pretrained": _str(nullable=True),
    "loss.ic": _bool, "loss.dt": _bool, "loss.coattention": _bool,
    "loss.sites": _list(_int(), allowed=(4, 5), increasing=True),
    "loss.lambda_ic": _float(0), "loss.lambda_dt": _float(0), "loss.beta": _float(0, lo_open=True),
    "loss.dt_margin": _float(0), "loss.triplet_margin": _float(0),
    "optim.lr_backbone": _float(0, lo_open=True), "optim.lr_head": _float(0, lo_open=True),
    "optim.momentum": _float(0, 1), "optim.weight_decay": _float(0), "optim.nesterov": _bool,
    "optim.warmup_epochs": _int(0), "optim.milestones": _list(_int(1), nonempty=False, increasing=True),
    "optim.gamma": _float(0, 1, lo_open=True),
    "train.epochs": _int(1), "train.amp": _choice("none", "bf16", "fp16"),
    "train.device": _choice("auto", "cpu", "cuda"), "train.eval_every": _int(0),
    "train.checkpoint_every": _int(1), "train.log_every": _int(1),
    "train.max_steps_per_epoch": _int(1, nullable=True), "train.threads": _int(1, nullable=True),
    "train.progress": _bool, "train.tensorboard": _bool, "train.deterministic": _bool,
    "eval.trials": _int(1), "eval.modes": _list(_str(), allowed=("all", "indoor")),
    "eval.shots": _list(_str(), allowed=("single", "multi")), "eval.batch_size": _int(1),
    "eval.max_rank": _int(1), "eval.final": _bool,
}


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and f"{key}" not in SPEC:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _set(cfg: Dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: unknown config section (in key {dotted!r})")
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(f"{dotted}: unknown config key")
    if isinstance(node[parts[-1]], dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{dotted}: expected a mapping (a config section), got {value!r}")
        for k, v in value.items():
            _set(cfg, f"{dotted}.{k}", v)
        return
    node[parts[-1]] = value


def validate(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Check every key against :data:`SPEC`; returns ``cfg``."""
    flat = _flatten(cfg)
    for key, value in flat.items():
        check = SPEC.get(key)
        if check is None:
            raise ConfigError(f"{key}: unknown config key")
        err = check(value)
        if err:
            raise ConfigError(f"{key}: expected {err}, got {value!r}")
    if cfg["data"]["synth"]["test_ids"] > cfg["data"]["synth"]["ids"] - 2:
        raise ConfigError(f"data.synth.test_ids: expected <= data.synth.ids - 2 = {cfg['data']['synth']['ids'] - 2}, "
                          f"got {cfg['data']['synth']['test_ids']}")
    if cfg["data"]["pad"] >= min(cfg["data"]["height"], cfg["data"]["width"]):
        raise ConfigError(f"data.pad: expected < image size {cfg['data']['height']}x{cfg['data']['width']}, "
                          f"got {cfg['data']['pad']}")
    return cfg


def resolve_path(name_or_path: str) -> str:
    """A bare name (``lba_sysu``) means ``training/configs/<name>.yaml``."""
    if os.path.isfile(name_or_path):
        return name_or_path
    candidate = os.path.join(CONFIG_DIR, name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
    if os.path.isfile(candidate):
        return candidate
    available = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))
    raise ConfigError(f"config: {name_or_path!r} is neither a file nor one of the built-in configs {available}")


def parse_override(text: str):
    """``key.sub=value`` -> (key, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. train.epochs=5)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"{key}: cannot parse value {raw!r} ({error})")
    return key.strip(), value


def load_config(name_or_path: Optional[str] = None, overrides: Sequence[str] = (),
                updates: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Defaults <- YAML file <- ``updates`` (dotted keys) <- ``key=value`` overrides, validated."""
    cfg = copy.deepcopy(DEFAULTS)
    if name_or_path:
        path = resolve_path(name_or_path)
        with open(path, "rt") as handle:
            data = yaml.safe_load(handle) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config {path}: expected a mapping at the top level")
        for key, value in data.items():
            _set(cfg, key, value)
    for key, value in (updates or {}).items():
        _set(cfg, key, value)
    for text in overrides:
        _set(cfg, *parse_override(text))
    return validate(cfg)


def dump(cfg: Dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
