"""torch.nn modules built on reid_kernels operators."""
from typing import Dict as _Dict, Mapping as _Mapping, Optional as _Optional, Sequence as _Sequence, Tuple as _Tuple  # noqa: E501

import torch
import torch.distributed as _dist
import torch.nn.functional as _F

from ._validate import check_bool as _check_bool
from ._validate import check_choice as _check_choice
from .dense_triplet import check_weighting_and_eps as _check_weighting_and_eps
from ._validate import check_finite_float as _check_finite_float
from ._validate import check_float_in as _check_float_in
from ._validate import check_index_range as _check_index_range
from ._validate import check_index_vector as _check_index_vector
from ._validate import check_int as _check_int
from ._validate import check_positive_float as _check_positive_float
from ._validate import check_same_device as _check_same_device
from ._validate import check_same_dtype as _check_same_dtype
from ._validate import check_tensor as _check_tensor
from .cmalign import CMAlignOutput, cmalign as _cmalign
from .losses import centroid_triplet as _centroid_triplet
from .memory import CONVENTIONS as _CONVENTIONS, MODES as _MODES, memory_update_ as _memory_update_
from .pairs import NEGATIVE_DRAWS as _NEGATIVE_DRAWS, lba_pairs as _lba_pairs


# ---- CMAlign ----
# LbA (Learning by Aligning, ICCV 2021): the non-parametric CMAlign module on [visible; infrared].


class CMAlign(torch.nn.Module):
    """LbA's CMAlign module (Learning by Aligning, ICCV 2021, eqs. 1-11), non-parametric, for training.

    ``forward(feat_v, feat_t)`` concatenates the visible and infrared maps as LbA
    does (``[feat_v; feat_t]``), pairs every anchor with a positive and a negative
    partner of the other modality and returns :class:`reid_kernels.CMAlignOutput`
    ``(recon_pos, recon_neg, comask, loss)`` of :func:`reid_kernels.cmalign` for the
    ``2B`` anchors (visible first):
    ``recon_pos`` feeds LbA's ID-consistency loss, ``loss`` is the dense triplet
    loss ``L_DT`` (LbA weights it by 0.5).

    Args:
        temperature: inverse softmax temperature beta > 0 (LbA: 50).
        margin: dense-triplet margin (LbA: 0.3).
        num_pos: images per identity per modality, used to draw partners when
            ``forward`` is not given any (LbA: 4).
        negative_draw: how those drawn negatives pick their images, see
            :func:`reid_kernels.lba_pairs` (``"independent"``, default, or the released
            code's ``"lba-code"``).
        weighting, eps: the dense triplet's co-attention weighting (``"paper"``, default, or the
            released code's ``"lba-code"``) and distance offset (default 0; the code's 1e-6), see
            :func:`reid_kernels.cmalign`.

    Partners: pass ``pos_idx`` / ``neg_idx`` (indices into the concatenated
    batch), or let the module draw fresh ones with :func:`reid_kernels.lba_pairs`
    at every call -- the batch must then be laid out as LbA lays it out (each
    modality identity-major, ``num_pos`` images per identity, same identity order
    in both); ``generator`` makes the draw reproducible.
    """

    def __init__(self, temperature: float = 50.0, margin: float = 0.3, num_pos: int = 4, *,
                 negative_draw: str = "independent", weighting: str = "paper", eps: float = 0.0):
        super().__init__()
        self.temperature = _check_positive_float("temperature", temperature)
        self.margin = _check_finite_float("margin", margin)
        self.num_pos = _check_int("num_pos", num_pos, 1)
        self.negative_draw = _check_choice("negative_draw", negative_draw, _NEGATIVE_DRAWS)
        self.eps = _check_weighting_and_eps(weighting, eps)
        self.weighting = weighting

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, margin={self.margin}, num_pos={self.num_pos}, "
                f"negative_draw={self.negative_draw!r}, weighting={self.weighting!r}, eps={self.eps}")

    def forward(
        self,
        feat_v: torch.Tensor,
        feat_t: torch.Tensor,
        pos_idx: _Optional[torch.Tensor] = None,
        neg_idx: _Optional[torch.Tensor] = None,
        *,
        num_pos: _Optional[int] = None,
        generator: _Optional[torch.Generator] = None,
    ) -> CMAlignOutput:
        _check_tensor("feat_v", feat_v, ndim=4, floating=True)
        _check_tensor("feat_t", feat_t, ndim=4, floating=True)
        if feat_t.shape != feat_v.shape:
            raise ValueError(f"feat_t: expected shape {tuple(feat_v.shape)} (like feat_v), got {tuple(feat_t.shape)}")
        # torch.cat would promote mixed dtypes silently (float32 maps computed in float64)
        _check_same_dtype([("feat_v", feat_v), ("feat_t", feat_t)])
        _check_same_device([("feat_v", feat_v), ("feat_t", feat_t)])
        if (pos_idx is None) != (neg_idx is None):
            given, missing = ("pos_idx", "neg_idx") if neg_idx is None else ("neg_idx", "pos_idx")
            raise ValueError(f"{missing}: expected a tensor when {given} is given (pass both or neither), got None")
        if pos_idx is None:
            per_id = self.num_pos if num_pos is None else _check_int("num_pos", num_pos, 1)
            batch = feat_v.shape[0]
            if batch % per_id != 0 or batch // per_id < 2:
                raise ValueError(
                    f"feat_v: expected a batch of num_ids * num_pos images with num_ids >= 2 and "
                    f"num_pos = {per_id}, got {batch} images"
                )
            pos_idx, neg_idx = _lba_pairs(batch // per_id, per_id, generator=generator,
                                          negative_draw=self.negative_draw)
        feat = torch.cat([feat_v, feat_t], dim=0)
        return _cmalign(feat, pos_idx, neg_idx, self.temperature, self.margin, weighting=self.weighting, eps=self.eps)


# ---- Memory banks ----
# MCE (Cross-Modality Person Re-identification with Memory-Based Contrastive Embedding,
# AAAI 2023): modality-aware banks W^v, W^r, W^a and the modality-agnostic W^u, their
# historical copies C, the cluster-contrast CE (eq. 2), the KL between proxy
# distributions (eqs. 5-8) and the hardest-negative-centroid hinge (eq. 9).  PECA
# (Partial Enhancement and Channel Aggregation for Visible-Infrared Person
# Re-Identification, IEICE 2024): centroid memory with the new-sample momentum
# convention (convention="new").




def _per_bank(value, names: _Sequence[str], what: str) -> _Dict[str, object]:
    """A scalar for every bank, or a mapping bank name -> value covering every bank."""
    if isinstance(value, _Mapping):
        missing = [n for n in names if n not in value]
        extra = [n for n in value if n not in names]
        if missing or extra:
            raise ValueError(f"{what}: expected a value for each bank {list(names)}, missing {missing}, unknown {extra}")
        return {n: value[n] for n in names}
    return {n: value for n in names}


def _gather_across_ranks(features: torch.Tensor, labels: torch.Tensor) -> _Tuple[torch.Tensor, torch.Tensor]:
    """All ranks' (features, labels), concatenated in rank order; unchanged without DDP.

    Batches may differ in size between ranks: sizes are gathered first, rows padded to the
    largest, then trimmed.  Every rank ends with the same tensors, so the deterministic
    update leaves every rank's bank bit-identical.
    """
    if not (_dist.is_available() and _dist.is_initialized()) or _dist.get_world_size() == 1:
        return features, labels
    world = _dist.get_world_size()
    count = torch.tensor([features.shape[0]], dtype=torch.int64, device=features.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    _dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    largest = max(sizes)
    padded_f = features.new_zeros((largest, features.shape[1]))
    padded_f[: features.shape[0]] = features
    padded_y = labels.new_zeros((largest,))
    padded_y[: labels.shape[0]] = labels
    all_f = [torch.empty_like(padded_f) for _ in range(world)]
    all_y = [torch.empty_like(padded_y) for _ in range(world)]
    _dist.all_gather(all_f, padded_f.contiguous())
    _dist.all_gather(all_y, padded_y.contiguous())
    return (torch.cat([f[:s] for f, s in zip(all_f, sizes)]), torch.cat([y[:s] for y, s in zip(all_y, sizes)]))


class _LogitsThenUpdate(torch.autograd.Function):
    """Logits against the pre-update bank; the bank is updated in backward (MCE's code).

    The gradient uses the bank as it was in forward; the update runs after it.
    """

    @staticmethod
    def forward(ctx, features, labels, bank_module, name, temperature):
        memory = bank_module.memory(name)
        ctx.save_for_backward(features.detach(), labels)
        ctx.bank_module, ctx.name, ctx.temperature = bank_module, name, temperature
        ctx.memory, ctx.version = memory, memory._version
        return features @ memory.to(features.dtype).t() / temperature

    @staticmethod
    def backward(ctx, grad_logits):
        features, labels = ctx.saved_tensors
        if ctx.memory._version != ctx.version:
            raise RuntimeError(
                f"MemoryBank: bank {ctx.name!r} changed between forward and backward of a contrast loss with "
                f"update_in_backward=True (use one such loss per bank per step, or update after the step)"
            )
        grad_features = grad_logits @ ctx.memory.to(grad_logits.dtype) / ctx.temperature
        ctx.bank_module.update_(ctx.name, features, labels)
        return grad_features, None, None, None, None


_BANK_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_bank_dtype(dtype) -> torch.dtype:
    """A floating dtype a bank can be updated in (float16/bfloat16 need CUDA, see memory_update_)."""
    if not isinstance(dtype, torch.dtype) or dtype not in _BANK_DTYPES:
        names = ", ".join(str(d) for d in _BANK_DTYPES)
        raise TypeError(f"dtype: expected one of ({names}) for the banks, got {dtype}")
    return dtype


class MemoryBank(torch.nn.Module):
    """One or several class-memory banks (one row per identity) with momentum updates.

    MCE (AAAI 2023) uses four banks -- modality-aware ``v``, ``r``, ``a`` and
    modality-agnostic ``u`` -- each with a frozen historical copy refreshed every epoch::

        mb = MemoryBank(395, 2048, names=("v", "r", "a", "u"), momentum={"v": .3, "r": .3, "a": .3, "u": .1},
                        mode={"v": "mean", "r": "mean", "a": "mean", "u": "hard"}, temperature=0.05)
        mb.initialize_("v", feats_v, labels_v)            # eq. 1 class means -> bank and history
        loss = mb.contrast_loss(f_v, y_v, "v") + ...     # eq. 2 (and 4)
        loss = loss + 1.2 * (mb.kl_loss(f_v, "v", target_bank="r") + mb.kl_loss(f_r, "r", target_bank="v"))  # eq. 7
        loss = loss + mb.hard_negative_loss(f_all, y_all, "u")  # eq. 9, historical agnostic centroids
        loss.backward(); optimizer.step()
        mb.update_("v", f_v, y_v)                         # eq. 3, after the step

    PECA's centroid memory is ``MemoryBank(N, d, names=("v", "ir"), momentum=0.8, convention="new",
    mode="sequential")``.

    Args:
        num_classes, dim: rows and width of every bank.
        names: bank names (Python identifiers); buffers ``bank_<name>`` (and ``history_<name>``).
        momentum: float or {name: float}; weight on the OLD row unless ``convention="new"``
            (see :func:`reid_kernels.memory_update_`).
        mode: ``"sequential"``, ``"mean"`` or ``"hard"`` (or {name: mode}).
        normalize: re-normalise updated (and initialised) rows to unit length.
        convention: ``"old"`` (MCE's gamma) or ``"new"`` (PECA's alpha).
        temperature: default temperature tau of the logits ``f . W^T / tau``.
        history: keep a historical copy of every bank (``history_<name>`` buffers).
        sync_ddp: under an initialised ``torch.distributed``, all-gather features and labels before
            each update so that every rank's bank stays identical.
        dtype, device: of the banks (float16/bfloat16 banks need CUDA).

    Banks and historical copies are buffers: they move with ``.to()``, are saved in ``state_dict``
    and never receive gradient.  Rows start at zero; fill them with :meth:`initialize_`.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        names: _Sequence[str] = ("memory",),
        *,
        momentum=0.2,
        mode="mean",
        normalize: bool = True,
        convention: str = "old",
        temperature: float = 0.05,
        history: bool = True,
        sync_ddp: bool = True,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        num_classes = _check_int("num_classes", num_classes, 1)
        dim = _check_int("dim", dim, 1)
        dtype = _check_bank_dtype(dtype)
        names = (names,) if isinstance(names, str) else tuple(names)
        if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n.isidentifier() for n in names):
            raise ValueError(f"names: expected distinct Python identifiers, got {names!r}")
        self.names = names
        self.momentum = {n: self._check_momentum(m) for n, m in _per_bank(momentum, names, "momentum").items()}
        self.mode = _per_bank(mode, names, "mode")
        for m in self.mode.values():
            if m not in _MODES:
                raise ValueError(f"mode: expected one of {_MODES}, got {m!r}")
        if convention not in _CONVENTIONS:
            raise ValueError(f"convention: expected 'old' or 'new', got {convention!r}")
        self.normalize = _check_bool("normalize", normalize)
        self.convention = convention
        self.sync_ddp = _check_bool("sync_ddp", sync_ddp)
        self.temperature = self._check_temperature(temperature)
        self.has_history = _check_bool("history", history)
        for n in names:
            self.register_buffer(f"bank_{n}", torch.zeros(num_classes, dim, dtype=dtype, device=device))
            if self.has_history:
                self.register_buffer(f"history_{n}", torch.zeros(num_classes, dim, dtype=dtype, device=device))

    # -- access ---------------------------------------------------------------
    @staticmethod
    def _check_momentum(value) -> float:
        return _check_float_in("momentum", value, 0.0, 1.0)

    @staticmethod
    def _check_temperature(value) -> float:
        return _check_positive_float("temperature", value)

    def _check_labels(self, labels, batch: int) -> torch.Tensor:
        """Integer class labels, one per feature row, each a row of the banks."""
        labels = _check_index_vector("labels", labels, batch, "class labels")
        _check_index_range("labels", labels, self.memory(self.names[0]).shape[0], "bank rows")
        return labels

    def _check_features(self, features, width: int) -> torch.Tensor:
        _check_tensor("features", features, ndim=2, floating=True, allow_empty=True)
        if features.shape[1] != width:
            raise ValueError(f"features: expected shape (batch, {width}), got {tuple(features.shape)}")
        return features

    def _check_name(self, name: str) -> str:
        if name not in self.names:
            raise KeyError(f"bank: expected one of {list(self.names)}, got {name!r}")
        return name

    def memory(self, name: str) -> torch.Tensor:
        """The up-to-date bank ``name`` (rows = classes); a buffer, no gradient."""
        return getattr(self, f"bank_{self._check_name(name)}")

    def history(self, name: str) -> torch.Tensor:
        """The historical (frozen) copy of bank ``name`` (MCE's C)."""
        if not self.has_history:
            raise RuntimeError("MemoryBank was built with history=False: there are no historical copies")
        return getattr(self, f"history_{self._check_name(name)}")

    def table(self, name: str, historical: bool = False) -> torch.Tensor:
        return self.history(name) if historical else self.memory(name)

    # -- filling --------------------------------------------------------------
    def _class_means(self, features: torch.Tensor, labels: torch.Tensor) -> _Tuple[torch.Tensor, torch.Tensor]:
        """(per-class mean of features, bool mask of the classes present); MCE eq. 1."""
        rows = self.memory(self.names[0]).shape[0]
        labels = labels.to(device=features.device, dtype=torch.int64)
        feats = features.detach().float()
        sums = feats.new_zeros((rows, feats.shape[1])).index_add_(0, labels, feats)
        counts = torch.bincount(labels, minlength=rows)
        present = counts > 0
        means = sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype)
        if self.normalize:
            means = _F.normalize(means, dim=1, eps=1e-12)
        return means, present

    @torch.no_grad()
    def initialize_(self, name: str, features: torch.Tensor, labels: torch.Tensor, *, history: bool = True) -> None:
        """Set the rows of the classes present to their class mean (MCE eq. 1), normalised
        if ``normalize``; also the historical copy when ``history``.  Gathered across DDP ranks."""
        bank = self.memory(name)
        self._check_features(features, bank.shape[1])
        self._check_labels(labels, features.shape[0])
        if not bool(torch.isfinite(features).all()):
            raise ValueError("features: expected finite values, got NaN/inf entries")
        if self.sync_ddp:
            features, labels = _gather_across_ranks(features.detach(), labels)
        means, present = self._class_means(features, labels)
        bank[present] = means[present].to(device=bank.device, dtype=bank.dtype)
        if history and self.has_history:
            self.history(name).copy_(bank)

    @torch.no_grad()
    def snapshot_(self, names: _Optional[_Sequence[str]] = None) -> None:
        """Historical copy <- current bank (for ``names``, default all): the "snapshot" reading of MCE's C."""
        for n in self.names if names is None else names:
            self.history(n).copy_(self.memory(n))

    @torch.no_grad()
    def set_history_(self, name: str, centroids: torch.Tensor) -> None:
        """Historical copy <- ``centroids`` (e.g. class means re-extracted at the end of an epoch)."""
        target = self.history(name)
        _check_tensor("centroids", centroids, floating=True, allow_empty=True)
        if tuple(centroids.shape) != tuple(target.shape):
            raise ValueError(f"centroids: expected shape {tuple(target.shape)}, got {tuple(centroids.shape)}")
        if not bool(torch.isfinite(centroids).all()):
            bad = int((~torch.isfinite(centroids)).any(dim=1).nonzero()[0, 0])
            raise ValueError(f"centroids: expected finite values, got NaN/inf (first in row {bad})")
        target.copy_(centroids)

    def update_(self, name: str, features: torch.Tensor, labels: torch.Tensor, *, momentum: _Optional[float] = None,
                mode: _Optional[str] = None) -> torch.Tensor:
        """Momentum update of bank ``name`` with this step's (features, labels) (MCE eq. 3).

        Call it after the optimiser step.  Under DDP (``sync_ddp``) features and labels of all
        ranks are gathered first, so every rank applies the same update.
        """
        bank = self.memory(name)
        features = features.detach()
        if self.sync_ddp:
            features, labels = _gather_across_ranks(features, labels)
        return _memory_update_(
            bank,
            features.to(bank.device),
            labels.to(bank.device),
            self.momentum[name] if momentum is None else momentum,
            mode=self.mode[name] if mode is None else mode,
            normalize=self.normalize,
            convention=self.convention,
        )

    # -- heads ----------------------------------------------------------------
    def logits(self, features: torch.Tensor, bank: str, temperature: _Optional[float] = None, *,
               historical: bool = False) -> torch.Tensor:
        """``features @ W^T / temperature`` against bank ``bank`` (or its historical copy): (B, classes)."""
        tau = self.temperature if temperature is None else self._check_temperature(temperature)
        table = self.table(bank, historical)
        self._check_features(features, table.shape[1])
        return features @ table.to(features.dtype).t() / tau

    def contrast_loss(self, features: torch.Tensor, labels: torch.Tensor, bank: str,
                      temperature: _Optional[float] = None, *, historical: bool = False,
                      update_in_backward: bool = False) -> torch.Tensor:
        """Cluster-contrast cross-entropy of MCE eq. 2, averaged over the batch.

        ``features`` are used as given: they are *not* L2-normalised here (cluster-contrast's
        ``ClusterMemory.forward`` normalises its inputs first).  Pass normalised features for the
        cosine logits of that code; the bank rows are unit length when ``normalize=True``.

        ``labels``: 1-D int64 (or int32), one per feature row, each in ``[0, num_classes)``.

        With ``update_in_backward=True`` the bank is updated with (features, labels) inside the
        backward pass, after the gradient was computed from the pre-update bank (MCE's
        released code); use at most one such loss per bank per step.
        """
        self._check_features(features, self.table(bank, historical).shape[1])
        labels = self._check_labels(labels, features.shape[0])
        if update_in_backward:
            if historical:
                raise ValueError("update_in_backward: the historical copies are frozen; use historical=False")
            tau = self.temperature if temperature is None else self._check_temperature(temperature)
            self.logits(features[:0], bank, tau)  # argument checks
            logits = _LogitsThenUpdate.apply(features, labels, self, self._check_name(bank), tau)
        else:
            logits = self.logits(features, bank, temperature, historical=historical)
        return _F.cross_entropy(logits, labels.to(device=logits.device, dtype=torch.int64))

    forward = contrast_loss

    def kl_loss(self, features: torch.Tensor, bank: str, target_bank: _Optional[str] = None, *,
                target_features: _Optional[torch.Tensor] = None, historical: bool = True,
                temperature: _Optional[float] = None) -> torch.Tensor:
        """KL(target || p) between proxy distributions, target under stop-gradient (MCE eqs. 5-8).

        ``p = softmax(features . C_bank / tau)`` and the target is
        ``softmax(target_features . C_target_bank / tau)`` (defaults: the same features, the same
        bank), computed without gradient; ``batchmean`` reduction.  The paper's eq. 7 for v<->r is
        ``kl_loss(f_v, "v", "r") + kl_loss(f_r, "r", "v")``; the released code's pairing is
        ``kl_loss(f_v, "v", target_features=f_r) + kl_loss(f_r, "r", target_features=f_v)``.
        """
        log_p = _F.log_softmax(self.logits(features, bank, temperature, historical=historical), dim=1)
        target_features = features if target_features is None else target_features
        if target_features.shape != features.shape:
            raise ValueError(f"target_features: expected shape {tuple(features.shape)}, got "
                             f"{tuple(target_features.shape)}")
        with torch.no_grad():
            target = self.logits(target_features.detach(), bank if target_bank is None else target_bank, temperature,
                                 historical=historical)
            log_q = _F.log_softmax(target, dim=1)
        return _F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")

    def hard_negative_loss(self, features: torch.Tensor, labels: torch.Tensor, bank: str, *, margin: float = 0.3,
                           historical: bool = True, negatives: str = "all") -> torch.Tensor:
        """Hardest-negative-centroid hinge of MCE eq. 9, averaged over the batch.

        ``[||f_i - c_{y_i}|| - min_{k != y_i} ||f_i - c_k|| + margin]_+`` with Euclidean distances to
        the (historical, by default) centroids.  ``negatives="all"`` searches every other class
        (the paper); ``"batch"`` only the other classes present in the batch (the released code).
        Samples without any candidate negative contribute 0.  This is
        :func:`reid_kernels.losses.centroid_triplet` on the bank's table (note the defaults differ:
        ``"all"`` here, the released code's ``"batch"`` there).
        """
        if negatives not in ("all", "batch"):
            raise ValueError(f"negatives: expected 'all' or 'batch', got {negatives!r}")
        table = self.table(bank, historical)
        self._check_features(features, table.shape[1])
        labels = self._check_labels(labels, features.shape[0])
        return _centroid_triplet(features, labels.to(features.device), table.to(features.dtype), margin=margin,
                                 negatives=negatives)
