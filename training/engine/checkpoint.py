"""Checkpoint files: durable writes, RNG state, integrity, and reading a checkpoint back.

A training checkpoint holds the model, optimiser, schedule, sampler, recipe state (its
generators, banks ...), gradient scaler, every RNG state, the epoch, step, history and
the config, so ``--resume`` continues bit-exactly from an epoch boundary. It also records
the checkpoint ``format``, the toolkit ``version`` that wrote it and a SHA-256 ``digest`` of
its content: torch's zip container notices a truncated file but loads a bit-flipped tensor
without a word, so :func:`read_checkpoint` recomputes the digest.

Every way a file can fail to be a usable checkpoint raises a :class:`CheckpointError` whose
message is one line naming the file and what is wrong: damaged (truncated or corrupt, with
torch's own reason), written by another version of the toolkit (both versions), not a training
checkpoint at all, or holding another model (the first differing keys and shapes).
"""
from __future__ import annotations

import hashlib
import os
import random
import warnings
from typing import Dict, List, Mapping, Optional

import numpy as np
import torch

from ..errors import CheckpointError  # noqa: F401 (re-exported)
from ..config import ConfigError, RESUME_OVERRIDABLE, differences, format_value, resume_config, resume_overridable
from ..recipes import build_model
from .durable import atomic_write

FORMAT = "reid_kernels.training/1"
FORMAT_FAMILY = "reid_kernels.training/"
# what evaluate / visualize need, and what a resume needs on top
MODEL_ENTRIES = ("model", "config", "num_classes")
RESUME_ENTRIES = ("optimizer", "schedule", "sampler", "recipe", "scaler", "rng", "epoch", "step", "history")


def toolkit_version() -> str:
    from reid_kernels import __version__

    return __version__


def rng_state() -> Dict[str, object]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, object]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def atomic_save(obj, path: str) -> None:
    """``torch.save`` through :func:`~.durable.atomic_write`: never a half-written checkpoint,
    not even after a power cut."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


class CheckpointDamaged(CheckpointError):
    """A checkpoint that cannot be read back as written: truncated, bit-flipped, incomplete."""


class CheckpointVersionError(CheckpointError):
    """A checkpoint written by a version of the toolkit whose format this one does not read."""


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint of another run than the one asked for: another recipe, another model."""


# --- integrity -------------------------------------------------------------------------------------
def _digest_into(hasher, value) -> None:
    """Feed ``value`` to ``hasher`` in a form that survives ``torch.save`` / ``torch.load`` unchanged:
    tensors and arrays by dtype, shape and bytes, containers item by item, scalars by ``repr``
    (exact for floats); any other object by its type name only (its ``repr`` may hold an address)."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        hasher.update(f"T{flat.dtype}{tuple(value.shape)}".encode())
        hasher.update(flat.view(torch.uint8).numpy())
    elif isinstance(value, np.ndarray):
        hasher.update(f"A{value.dtype.str}{value.shape}".encode())
        hasher.update(np.ascontiguousarray(value).view(np.uint8))
    elif isinstance(value, dict):
        hasher.update(f"D{len(value)}".encode())
        for key, item in value.items():
            _digest_into(hasher, key)
            _digest_into(hasher, item)
    elif isinstance(value, (list, tuple)):
        hasher.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}".encode())
        for item in value:
            _digest_into(hasher, item)
    elif value is None or isinstance(value, (bool, int, float, str, bytes, np.generic)):
        hasher.update(f"S{type(value).__name__}:{value!r};".encode())
    else:
        hasher.update(f"O{type(value).__qualname__};".encode())


def content_digest(state: Mapping) -> str:
    """SHA-256 of every entry of ``state`` but ``digest`` itself."""
    hasher = hashlib.sha256()
    _digest_into(hasher, {k: v for k, v in state.items() if k != "digest"})
    return "sha256:" + hasher.hexdigest()


def seal(state: dict) -> dict:
    """``state`` with this toolkit's ``format`` and ``version`` and the ``digest`` of its content:
    what :func:`read_checkpoint` accepts."""
    state = dict(state, format=FORMAT, version=toolkit_version())
    state["digest"] = content_digest(state)
    return state


# --- reading ---------------------------------------------------------------------------------------
def _torch_reason(error: BaseException) -> str:
    """torch's explanation, first sentence, one line ("PytorchStreamReader failed reading zip
    archive: failed finding central directory")."""
    text = " ".join(str(error).split()) or type(error).__name__
    first = text.split(". ")[0].rstrip(".")
    return first if len(first) <= 200 else first[:197] + "..."


def _starts_like_torch_file(path: str) -> bool:
    """torch.save writes a zip archive (legacy torch: a pickle, protocol 2)."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    return head.startswith(b"PK\x03\x04") or head.startswith(b"\x80\x02")


def _load(path: str, what: str):
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointDamaged(f"{what}: {path} is damaged: the file is empty (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated, corrupt, text, foreign pickles
        if _starts_like_torch_file(path):
            raise CheckpointDamaged(f"{what}: {path} is damaged (truncated or corrupt, {size} bytes): torch cannot "
                                    f"read it: {_torch_reason(error)}") from error
        raise CheckpointError(f"{what}: {path} is not a checkpoint written by training.train (torch cannot read it: "
                              f"{type(error).__name__}: {_torch_reason(error)})") from error


def _check_format(state, path: str, what: str) -> None:
    if not isinstance(state, dict):
        raise CheckpointError(f"{what}: {path} is not a checkpoint written by training.train "
                              f"(it holds a {type(state).__name__}, not a checkpoint's dict)")
    found = state.get("format")
    if isinstance(found, str) and found.startswith(FORMAT_FAMILY) and found != FORMAT:
        theirs = state.get("version") or "unknown"
        raise CheckpointVersionError(
            f"{what}: {path} was written by reid_kernels {theirs} in checkpoint format {found!r}; this is "
            f"reid_kernels {toolkit_version()}, which reads format {FORMAT!r}: use the version that wrote it")
    if found != FORMAT:
        raise CheckpointError(f"{what}: {path} is not a checkpoint written by training.train "
                              f"(no {FORMAT!r} format entry)")


def _check_integrity(state: dict, path: str, what: str, entries) -> None:
    stored = state.get("digest")
    # checkpoints written before the digest was added have none: read as they are
    if stored is not None and stored != content_digest(state):
        raise CheckpointDamaged(f"{what}: {path} is damaged (corrupt): its content does not match the SHA-256 "
                                f"digest saved with it (a flipped bit or a partial overwrite)")
    missing = [name for name in entries if name not in state]
    if missing:
        raise CheckpointDamaged(f"{what}: {path} is incomplete: it lacks {', '.join(missing)}")


def read_checkpoint(path: str, what: str = "--checkpoint", for_resume: bool = False) -> dict:
    """A checkpoint written by ``training.train`` (``for_resume``: with everything a resume needs);
    anything else raises a :class:`CheckpointError` naming ``what`` and the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{what}: file not found: {path}")
    state = _load(path, what)
    _check_format(state, path, what)
    _check_integrity(state, path, what, MODEL_ENTRIES + (RESUME_ENTRIES if for_resume else ()))
    return state


# --- the model inside ------------------------------------------------------------------------------
def state_dict_differences(expected: Mapping[str, torch.Tensor], stored: Mapping[str, torch.Tensor],
                           first: int = 3) -> str:
    """What keeps ``stored`` from loading into a model whose state dict is ``expected``: the first
    ``first`` keys of each kind (other shape, missing, unexpected), ``""`` when it would load."""
    def shape(t) -> str:
        return "x".join(str(n) for n in t.shape) or "scalar"

    reshaped = [f"{k} {shape(stored[k])} (model {shape(v)})" for k, v in expected.items()
                if k in stored and tuple(stored[k].shape) != tuple(v.shape)]
    missing = [k for k in expected if k not in stored]
    unexpected = [k for k in stored if k not in expected]
    parts = []
    for label, items in (("other shapes", reshaped), ("missing", missing), ("not in the model", unexpected)):
        if items:
            more = f" and {len(items) - first} more" if len(items) > first else ""
            parts.append(f"{label}: {', '.join(items[:first])}{more}")
    return "; ".join(parts)


def check_model_state(expected: Mapping[str, torch.Tensor], state: dict, path: Optional[str], what: str) -> None:
    """Raise :class:`CheckpointMismatch` when ``state``'s model does not fit ``expected``."""
    problem = state_dict_differences(expected, state["model"])
    if problem:
        raise CheckpointMismatch(f"{what}: {path or 'the checkpoint'} holds another model than its config "
                                 f"builds ({problem})")


def _build_without_weights(cfg: dict, num_classes: int):
    cfg = dict(cfg, model=dict(cfg["model"], pretrained=None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model(cfg, num_classes, log=lambda *_: None)


def check_model_shape(state: dict, cfg: dict, path: str, what: str) -> None:
    """The model ``cfg`` builds has the keys and shapes of ``state``'s, checked without building it
    for real (on the ``meta`` device: no memory, no initialisation, no RNG draw)."""
    try:
        with torch.device("meta"):
            expected = _build_without_weights(cfg, state["num_classes"]).state_dict()
    except Exception:  # a module that cannot be built on meta: build it on the CPU
        expected = _build_without_weights(cfg, state["num_classes"]).state_dict()
    check_model_state(expected, state, path, what)


def load_model_from_checkpoint(state: dict, cfg: dict, path: Optional[str] = None, what: str = "--checkpoint"):
    """The model of a checkpoint (built as its recipe builds it), weights loaded."""
    model = _build_without_weights(cfg, state["num_classes"])
    check_model_state(model.state_dict(), state, path, what)
    model.load_state_dict(state["model"])
    return model


def describe_changes(changes: List[dict]) -> str:
    """``loss.dt: false -> true, train.epochs: 2 -> 3`` (values as overrides write them)."""
    return ", ".join(f"{c['key']}: {format_value(c['from'])} -> {format_value(c['to'])}" for c in changes)


# --- resuming --------------------------------------------------------------------------------------
def stored_config(state: dict, path: str, what: str = "--resume") -> dict:
    """The checkpoint's config as this version reads it (keys added since at their defaults); a
    config this version cannot read is a :class:`CheckpointVersionError` naming both versions."""
    try:
        return resume_config(state["config"])
    except ConfigError as error:
        raise CheckpointVersionError(
            f"{what}: {path} holds a config this version cannot use ({error}); it was written by reid_kernels "
            f"{state.get('version') or 'unknown'}, this is reid_kernels {toolkit_version()}") from error


def resume_changes(state: dict, cfg: dict, path: str, with_changes: bool = False) -> List[dict]:
    """Every key where ``cfg`` differs from the checkpoint's config, as records ``{"epoch": the first
    epoch (1-based, as in the history) trained with it, "key", "from", "to", "forced"}``; ``forced``:
    outside :data:`~training.config.RESUME_OVERRIDABLE`, refused (:class:`ConfigError`, one line naming
    each key with both values) unless ``with_changes`` (``--resume-with-changes``)."""
    records = [{"epoch": state["epoch"] + 1, "key": key, "from": old, "to": new,
                "forced": not resume_overridable(key)}
               for key, (old, new) in differences(stored_config(state, path), cfg).items()]
    forced = [r for r in records if r["forced"]]
    if forced and not with_changes:
        raise ConfigError(f"--resume: {path} was trained with another config: {describe_changes(forced)} "
                          f"(checkpoint -> asked); a resume may change only {', '.join(RESUME_OVERRIDABLE)}; "
                          f"--resume-with-changes applies the others, recorded in train.log and history.json")
    return records


def check_processes(state: dict, world_size: int, path: str) -> None:
    """A DDP run resumes with as many processes as wrote it (each restores its own RNG and recipe state)."""
    ranks = len(state.get("ranks") or [None])
    if ranks != world_size:
        raise CheckpointMismatch(f"--resume: {path} was written by {ranks} process(es); resume it with as many, "
                                 f"not {world_size}")
