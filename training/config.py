"""Configuration: defaults, YAML files, ``key=value`` overrides, and validation.

Every key has a type and a range; unknown keys and bad values raise
:class:`ConfigError` naming the dotted key, what was expected and what came.

Layers, later ones winning: :data:`DEFAULTS` <- the recipe's ``DEFAULTS`` (its ``loss``
section, and its ``model`` / ``optim`` / ``train`` defaults) <- the YAML file <- dotted
``updates`` <- ``key=value`` overrides. The recipe is the one the overrides, updates or
the file name (in that order), else ``lba``.
"""
from __future__ import annotations

import copy
import os
import re
from typing import Any, Callable, Dict, Optional, Sequence

import yaml

from . import validators as v
from .errors import ConfigError  # noqa: F401 (re-exported)
from .recipes import RECIPES

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


DEFAULTS: Dict[str, Any] = {
    "seed": 0,
    "recipe": "lba",
    "out": "runs/default",
    "data": {
        "dataset": "sysu", "root": None, "trial": 1, "height": 288, "width": 144,
        "flip": 0.5, "pad": 10, "pad_mode": "zero", "erasing": 0.0, "erasing_value": "zero",
        "channel_aug": "none", "channel_prob": 0.5,
        "cache": False, "workers": 4,
        # synthetic data: generated into `root` when it does not exist yet
        "synth": {"ids": 150, "test_ids": 48, "seed": 0, "images_per_cam": 4, "jitter": 0.8,
                  "occlusion": 0.15, "clutter": 3, "noise": 0.03, "palette": 12, "ir_material": 0.35,
                  "ir_invert": False},
    },
    "sampler": {"num_ids": 8, "num_pos": 4},
    # Shared backbone options (MCE, AAAI 2023; PECA, IEICE 2024): 1-3 modality-specific stems, AGW
    # non-local blocks, GeM fixed or learnable; the BNNeck is always there.
    "model": {"depth": 50, "width": 64, "last_stride": 1, "stem_stride": 2, "maxpool": True, "stems": 2,
              "non_local": False, "mam": False, "gem_p": 3.0, "gem_learnable": False, "pretrained": None},
    "loss": {},  # the recipe's section
    "optim": {"name": "sgd", "lr_backbone": 0.01, "lr_head": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
              "nesterov": True, "warmup_epochs": 10, "milestones": [20, 50], "gamma": 0.1},
    "train": {"epochs": 81, "amp": "none", "device": "auto", "eval_every": 10, "checkpoint_every": 1,
              "log_every": 20, "max_steps_per_epoch": None, "threads": None, "progress": True,
              "tensorboard": True, "deterministic": False},
    "eval": {"trials": 10, "modes": ["all", "indoor"], "shots": ["single"], "batch_size": 128, "max_rank": 20,
             "final": True, "rerank": "none"},
}


SPEC: Dict[str, Callable[[Any], Optional[str]]] = {
    "seed": v.integer(0), "recipe": v.choice(*RECIPES), "out": v.string(),
    "data.dataset": v.choice("sysu", "regdb", "synth"), "data.root": v.string(nullable=True),
    "data.trial": v.integer(1, 10), "data.height": v.integer(16), "data.width": v.integer(8),
    "data.flip": v.number(0, 1), "data.pad": v.integer(0), "data.pad_mode": v.choice("zero", "symmetric"),
    "data.erasing": v.number(0, 1), "data.erasing_value": v.choice("zero", "random"),
    "data.channel_aug": v.choice("none", "grayscale", "exchange", "copy"), "data.channel_prob": v.number(0, 1),
    "data.cache": v.boolean, "data.workers": v.integer(0),
    "data.synth.ids": v.integer(4), "data.synth.test_ids": v.integer(2), "data.synth.seed": v.integer(0),
    "data.synth.images_per_cam": v.integer(1), "data.synth.jitter": v.number(0),
    "data.synth.occlusion": v.number(0, 1), "data.synth.clutter": v.integer(0), "data.synth.noise": v.number(0),
    "data.synth.palette": v.integer(2, 12), "data.synth.ir_material": v.number(0, 1),
    "data.synth.ir_invert": v.boolean,
    "sampler.num_ids": v.integer(2), "sampler.num_pos": v.integer(1),
    "model.depth": v.choice(10, 18, 34, 50, 101), "model.width": v.integer(4), "model.last_stride": v.choice(1, 2),
    "model.stem_stride": v.choice(1, 2), "model.maxpool": v.boolean, "model.stems": v.choice(1, 2, 3),
    "model.non_local": v.boolean, "model.mam": v.boolean, "model.gem_p": v.number(1.0), "model.gem_learnable": v.boolean,
    "model.pretrained": v.string(nullable=True),
    "optim.name": v.choice("sgd", "adam"),
    "optim.lr_backbone": v.number(0, lo_open=True), "optim.lr_head": v.number(0, lo_open=True),
    "optim.momentum": v.number(0, 1), "optim.weight_decay": v.number(0), "optim.nesterov": v.boolean,
    "optim.warmup_epochs": v.integer(0), "optim.milestones": v.listof(v.integer(1), nonempty=False, increasing=True),
    "optim.gamma": v.number(0, 1, lo_open=True),
    "train.epochs": v.integer(1), "train.amp": v.choice("none", "bf16", "fp16"),
    "train.device": v.choice("auto", "cpu", "cuda"), "train.eval_every": v.integer(0),
    "train.checkpoint_every": v.integer(1), "train.log_every": v.integer(1),
    "train.max_steps_per_epoch": v.integer(1, nullable=True), "train.threads": v.integer(1, nullable=True),
    "train.progress": v.boolean, "train.tensorboard": v.boolean, "train.deterministic": v.boolean,
    "eval.trials": v.integer(1), "eval.modes": v.listof(v.string(), allowed=("all", "indoor")),
    "eval.shots": v.listof(v.string(), allowed=("single", "multi")), "eval.batch_size": v.integer(1),
    "eval.max_rank": v.integer(1), "eval.final": v.boolean,
    "eval.rerank": v.choice("none", "k_reciprocal", "aim", "aim-paper"),
}


def spec_for(recipe: str) -> Dict[str, Callable[[Any], Optional[str]]]:
    """Every key's validator for a config of ``recipe``: :data:`SPEC` plus the recipe's ``loss.*``."""
    spec = dict(SPEC)
    spec.update({f"loss.{k}": check for k, check in RECIPES[recipe].LOSS_SPEC.items()})
    return spec


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested config -> ``{"dotted.key": value}`` (the form of ``updates``)."""
    out = {}
    for k, value in d.items():
        key = f"{prefix}{k}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, key + "."))
        else:
            out[key] = value
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
        for k, item in value.items():
            _set(cfg, f"{dotted}.{k}", item)
        return
    node[parts[-1]] = value


def validate(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Check every key against :func:`spec_for` its recipe; returns ``cfg``."""
    if cfg.get("recipe") not in RECIPES:
        raise ConfigError(f"recipe: expected one of {list(RECIPES)}, got {cfg.get('recipe')!r}")
    spec = spec_for(cfg["recipe"])
    flat = flatten(cfg)
    for key, value in flat.items():
        check = spec.get(key)
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
    problem = RECIPES[cfg["recipe"]].check_config(cfg)
    if problem:
        raise ConfigError(problem)
    return cfg


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: ``1e-3`` and ``5E4`` are numbers, not strings
    (YAML 1.1, which PyYAML follows, needs a dot in the mantissa)."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?[0-9][0-9_]*\.[0-9_]*|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


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
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"{key}: cannot parse value {raw!r} ({error})")
    return key.strip(), value


def _merge(base: Dict[str, Any], extra: Dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "loss":
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def defaults_for(recipe: str) -> Dict[str, Any]:
    """:data:`DEFAULTS` with the recipe's defaults merged in (its ``loss`` section whole)."""
    if recipe not in RECIPES:
        raise ConfigError(f"recipe: expected one of {list(RECIPES)}, got {recipe!r}")
    cfg = copy.deepcopy(DEFAULTS)
    _merge(cfg, RECIPES[recipe].DEFAULTS)
    cfg["recipe"] = recipe
    return cfg


def load_config(name_or_path: Optional[str] = None, overrides: Sequence[str] = (),
                updates: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Defaults <- recipe defaults <- YAML file <- ``updates`` (dotted keys) <- ``key=value`` overrides, validated."""
    data: Dict[str, Any] = {}
    if name_or_path:
        path = resolve_path(name_or_path)
        with open(path, "rt") as handle:
            text = handle.read()
        try:
            data = load_yaml(text) or {}
        except yaml.YAMLError as error:
            where = getattr(error, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            raise ConfigError(f"config {path}: not valid YAML{at} ({getattr(error, 'problem', None) or error})")
        if not isinstance(data, dict):
            raise ConfigError(f"config {path}: expected a mapping at the top level")
    parsed = [parse_override(text) for text in overrides]
    recipe = data.get("recipe", DEFAULTS["recipe"])
    recipe = (updates or {}).get("recipe", recipe)
    for key, value in parsed:
        if key == "recipe":
            recipe = value
    cfg = defaults_for(recipe)
    for key, value in data.items():
        _set(cfg, key, value)
    for key, value in (updates or {}).items():
        _set(cfg, key, value)
    for key, value in parsed:
        _set(cfg, key, value)
    return validate(cfg)


def dump(cfg: Dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)


# --- resuming a run -------------------------------------------------------------------------------
# Keys a resume may set to another value than the run was started with: they say where the run's
# files are, how fast and on what it computes, what it prints and how it is evaluated -- never what
# is trained. ``train.epochs`` extends (or ends earlier) a run whose schedule does not depend on it
# (warm-up and decays are fixed epochs); ``data.root`` is where the same dataset lies now (the
# dataset check and the checkpoint's class count guard it); ``eval.*`` is the test protocol only.
# ``train.amp`` and ``train.max_steps_per_epoch`` change what an epoch computes, so they are not here.
RESUME_OVERRIDABLE = ("out", "data.root", "data.workers", "data.cache", "train.epochs", "train.device",
                      "train.threads", "train.deterministic", "train.eval_every", "train.checkpoint_every",
                      "train.log_every", "train.progress", "train.tensorboard", "eval.*")


def resume_overridable(key: str) -> bool:
    """Whether ``key`` (dotted) is in :data:`RESUME_OVERRIDABLE` (``section.*`` covers a section)."""
    return any(key == allowed or (allowed.endswith(".*") and key.startswith(allowed[:-1]))
               for allowed in RESUME_OVERRIDABLE)


def _same_path(a: Any, b: Any) -> bool:
    return isinstance(a, str) and isinstance(b, str) and os.path.abspath(a) == os.path.abspath(b)


def differences(before: Dict[str, Any], after: Dict[str, Any]) -> Dict[str, tuple]:
    """``{dotted key: (value in before, value in after)}`` for every key whose value differs
    (a path key -- ``out``, ``data.root`` -- only when the two name different places)."""
    old, new = flatten(before), flatten(after)
    changed = {}
    for key in list(old) + [k for k in new if k not in old]:
        a, b = old.get(key), new.get(key)
        if a == b or (key in ("out", "data.root") and _same_path(a, b)):
            continue
        changed[key] = (a, b)
    return changed


def resume_config(stored: Dict[str, Any], overrides: Sequence[str] = (),
                  updates: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The config a resumed run trains with: the checkpoint's ``stored`` config (over this version's
    defaults for its recipe, so keys added since keep their defaults) <- dotted ``updates`` <-
    ``key=value`` overrides, validated. Whether the result may differ from ``stored`` is the
    caller's to decide (:func:`differences`, :func:`resume_overridable`)."""
    cfg = defaults_for(stored.get("recipe"))
    for key, value in flatten(stored).items():
        _set(cfg, key, value)
    for key, value in (updates or {}).items():
        _set(cfg, key, value)
    for key, value in (parse_override(text) for text in overrides):
        _set(cfg, key, value)
    return validate(cfg)


def format_value(value: Any) -> str:
    """A config value as one would write it in an override (``false``, ``[4, 5]``, ``null``)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10 ** 6).strip().removesuffix("\n...").strip()


def undo_changes(cfg: Dict[str, Any], changes: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """``cfg`` as it was before ``changes`` (records ``{"key", "from", ...}``, oldest first) were made."""
    original = copy.deepcopy(cfg)
    for change in reversed(changes):
        _set(original, change["key"], copy.deepcopy(change["from"]))
    return original
