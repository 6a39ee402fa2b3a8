"""reid_kernels.nn.MemoryBank: MCE's banks and heads (eqs. 1-9), updates, state_dict, DDP."""
import os
import tempfile
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import reid_kernels
from reid_kernels import reference
from reid_kernels.nn import MemoryBank

NUM_CLASSES, DIM = 12, 16


def unit(*shape, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=gen), dim=-1).to(device)


def filled_bank(device, **kwargs):
    kwargs.setdefault("names", ("v", "r", "u"))
    kwargs.setdefault("momentum", {"v": 0.3, "r": 0.3, "u": 0.1})
    kwargs.setdefault("mode", {"v": "mean", "r": "mean", "u": "hard"})
    bank = MemoryBank(NUM_CLASSES, DIM, **kwargs).to(device)
    labels = torch.arange(3 * NUM_CLASSES, device=device) % NUM_CLASSES
    for i, name in enumerate(bank.names):
        bank.initialize_(name, unit(3 * NUM_CLASSES, DIM, seed=10 + i, device=device), labels)
    return bank


def batch(device, seed=1):
    labels = torch.tensor([1, 1, 1, 4, 4, 4, 7, 7], device=device)
    return unit(len(labels), DIM, seed=seed, device=device), labels


def test_initialize_is_the_normalised_class_mean(device):
    bank = MemoryBank(NUM_CLASSES, DIM, names=("v",)).to(device)
    feats, labels = batch(device)
    bank.initialize_("v", feats, labels)
    for k in (1, 4, 7):
        torch.testing.assert_close(bank.memory("v")[k], F.normalize(feats[labels == k].mean(0), dim=0))
    assert torch.equal(bank.memory("v")[0], torch.zeros(DIM, device=device))  # absent class untouched
    assert torch.equal(bank.history("v"), bank.memory("v"))


def test_logits_and_contrast_loss(device):
    bank = filled_bank(device)
    feats, labels = batch(device)
    table = bank.memory("v")
    torch.testing.assert_close(bank.logits(feats, "v"), feats @ table.t() / 0.05)
    torch.testing.assert_close(bank.logits(feats, "v", 0.1, historical=True), feats @ bank.history("v").t() / 0.1)
    expected = F.cross_entropy(feats @ table.t() / 0.05, labels)  # eq. 2
    torch.testing.assert_close(bank.contrast_loss(feats, labels, "v"), expected)
    torch.testing.assert_close(bank(feats, labels, "v"), expected)


def test_kl_loss_matches_definition_and_stops_target_gradient(device):
    bank = filled_bank(device)
    feats, _ = batch(device)
    feats.requires_grad_(True)
    other = unit(*feats.shape, seed=5, device=device).requires_grad_(True)
    loss = bank.kl_loss(feats, "v", "r", target_features=other)
    log_p = F.log_softmax(feats @ bank.history("v").t() / 0.05, dim=1)
    q = F.softmax(other.detach() @ bank.history("r").t() / 0.05, dim=1)
    expected = (q * (q.log() - log_p)).sum(1).mean()  # KL(q || p), batchmean
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert feats.grad is not None and other.grad is None


def test_hard_negative_loss_brute_force(device):
    bank = filled_bank(device)
    feats, labels = batch(device)
    centroids = bank.history("u")
    for negatives, candidates in (("all", range(NUM_CLASSES)), ("batch", (1, 4, 7))):
        expected = []
        for f, y in zip(feats, labels.tolist()):
            d = [torch.linalg.vector_norm(f - centroids[k]) for k in candidates if k != y]
            expected.append(torch.clamp(torch.linalg.vector_norm(f - centroids[y]) - min(d) + 0.3, min=0))
        loss = bank.hard_negative_loss(feats, labels, "u", negatives=negatives)
        torch.testing.assert_close(loss, torch.stack(expected).mean())


def test_hard_negative_loss_without_candidates_is_zero(device):
    bank = filled_bank(device)
    feats = unit(3, DIM, device=device).requires_grad_(True)
    loss = bank.hard_negative_loss(feats, torch.full((3,), 2, device=device), "u", negatives="batch")
    assert loss.item() == 0.0
    loss.backward()


def test_update_uses_each_banks_momentum_and_mode(device):
    bank = filled_bank(device)
    feats, labels = batch(device)
    expected = {n: reference.memory_update_(bank.memory(n).clone(), feats, labels, m, bank.mode[n])
                for n, m in bank.momentum.items()}
    for name in bank.names:
        bank.update_(name, feats, labels)
        torch.testing.assert_close(bank.memory(name), expected[name], rtol=1e-6, atol=1e-6)


def test_new_sample_convention(device):
    bank = MemoryBank(NUM_CLASSES, DIM, names=("v", "ir"), momentum=0.8, convention="new", mode="sequential")
    bank = bank.to(device)
    feats, labels = batch(device)
    expected = reference.memory_update_(bank.memory("v").clone(), feats, labels, 0.2, "sequential")
    bank.update_("v", feats, labels)
    torch.testing.assert_close(bank.memory("v"), expected, rtol=1e-6, atol=1e-6)


def test_update_in_backward_uses_pre_update_bank(device):
    bank = filled_bank(device)
    feats, labels = batch(device)
    before = bank.memory("v").clone()
    x = feats.clone().requires_grad_(True)
    loss = bank.contrast_loss(x, labels, "v", update_in_backward=True)
    plain = feats.clone().requires_grad_(True)
    ref_loss = F.cross_entropy(plain @ before.t() / 0.05, labels)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    assert torch.equal(bank.memory("v"), before)  # forward does not touch the bank
    loss.backward()
    torch.testing.assert_close(x.grad, plain.grad)
    expected = reid_kernels.memory_update_(before.clone(), feats, labels, 0.3, mode="mean")
    assert torch.equal(bank.memory("v"), expected)


def test_update_in_backward_detects_a_bank_changed_in_between(device):
    bank = filled_bank(device)
    feats, labels = batch(device)
    loss = bank.contrast_loss(feats.clone().requires_grad_(True), labels, "v", update_in_backward=True)
    bank.update_("v", feats, labels)
    with pytest.raises(RuntimeError, match="changed between forward and backward"):
        loss.backward()


def test_snapshot_and_set_history(device):
    bank = filled_bank(device)
    feats, labels = batch(device)
    bank.update_("v", feats, labels)
    assert not torch.equal(bank.history("v"), bank.memory("v"))
    bank.snapshot_(["v"])
    assert torch.equal(bank.history("v"), bank.memory("v"))
    centroids = unit(NUM_CLASSES, DIM, seed=9, device=device)
    bank.set_history_("r", centroids)
    assert torch.equal(bank.history("r"), centroids)


def test_state_dict_round_trip(device):
    bank = filled_bank(device)
    bank.update_("u", *batch(device))
    state = bank.state_dict()
    assert set(state) == {f"{kind}_{n}" for n in ("v", "r", "u") for kind in ("bank", "history")}
    fresh = filled_bank(device)
    fresh.load_state_dict(state)
    for name in bank.names:
        assert torch.equal(fresh.memory(name), bank.memory(name))
        assert torch.equal(fresh.history(name), bank.history(name))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(names=("v", "v")), ValueError, "names: expected distinct"),
        (dict(names=("a-b",)), ValueError, "names: expected distinct Python identifiers"),
        (dict(momentum=1.2), ValueError, r"momentum: expected a value in \[0, 1\]"),
        (dict(names=("v", "r"), momentum={"v": 0.3}), ValueError, r"missing \['r'\]"),
        (dict(mode="median"), ValueError, "mode: expected one of"),
        (dict(temperature=0.0), ValueError, "temperature: expected a finite value > 0"),
        (dict(convention="both"), ValueError, "convention: expected 'old' or 'new'"),
    ],
)
def test_bad_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        MemoryBank(NUM_CLASSES, DIM, **kwargs)


def test_bad_use():
    bank = MemoryBank(NUM_CLASSES, DIM, names=("v",), history=False)
    feats, labels = batch("cpu")
    with pytest.raises(KeyError, match="bank: expected one of"):
        bank.logits(feats, "w")
    with pytest.raises(RuntimeError, match="history=False"):
        bank.logits(feats, "v", historical=True)
    with pytest.raises(ValueError, match=r"features: expected shape \(batch, 16\)"):
        bank.logits(feats[:, :3], "v")
    with pytest.raises(IndexError, match="labels: expected values in"):
        bank.update_("v", feats, labels + NUM_CLASSES)
    with pytest.raises(ValueError, match="negatives: expected 'all' or 'batch'"):
        bank.hard_negative_loss(feats, labels, "v", historical=False, negatives="some")


# ---- DDP: every rank's bank stays identical ---------------------------------------------------

WORLD = 2


def _ddp_worker(rank, init_file, out_dir):
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        bank = MemoryBank(NUM_CLASSES, DIM, names=("v", "u"), momentum={"v": 0.3, "u": 0.1},
                          mode={"v": "sequential", "u": "hard"})
        labels = torch.arange(2 * NUM_CLASSES) % NUM_CLASSES
        bank.initialize_("v", unit(2 * NUM_CLASSES, DIM, seed=50 + rank), labels)  # gathered: same on all ranks
        bank.initialize_("u", unit(2 * NUM_CLASSES, DIM, seed=60 + rank), labels)
        for step in range(3):
            n = 5 + rank  # different batch sizes per rank
            gen = torch.Generator().manual_seed(100 * step + rank)
            feats = unit(n, DIM, seed=1000 * step + rank)
            ys = torch.randint(0, 4, (n,), generator=gen)  # heavy label overlap across ranks
            bank.update_("v", feats, ys)
            bank.update_("u", feats, ys)
        # and once inside backward (MCE's code path): the gather then runs in backward
        feats = unit(4, DIM, seed=7000 + rank).requires_grad_(True)
        bank.contrast_loss(feats, torch.tensor([rank, 3, 3, rank]), "v", update_in_backward=True).backward()
        torch.save({n: bank.memory(n) for n in bank.names}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single_process_equivalent():
    """What the banks must be: each update applied to the rank-order concatenation of the batches."""
    bank = MemoryBank(NUM_CLASSES, DIM, names=("v", "u"), momentum={"v": 0.3, "u": 0.1},
                      mode={"v": "sequential", "u": "hard"}, sync_ddp=False)
    labels = torch.arange(2 * NUM_CLASSES) % NUM_CLASSES
    for name, base in (("v", 50), ("u", 60)):
        feats = torch.cat([unit(2 * NUM_CLASSES, DIM, seed=base + r) for r in range(WORLD)])
        bank.initialize_(name, feats, torch.cat([labels] * WORLD))
    for step in range(3):
        feats, ys = [], []
        for rank in range(WORLD):
            n = 5 + rank
            gen = torch.Generator().manual_seed(100 * step + rank)
            feats.append(unit(n, DIM, seed=1000 * step + rank))
            ys.append(torch.randint(0, 4, (n,), generator=gen))
        bank.update_("v", torch.cat(feats), torch.cat(ys))
        bank.update_("u", torch.cat(feats), torch.cat(ys))
    feats = torch.cat([unit(4, DIM, seed=7000 + rank) for rank in range(WORLD)])
    bank.update_("v", feats, torch.cat([torch.tensor([rank, 3, 3, rank]) for rank in range(WORLD)]))
    return {n: bank.memory(n) for n in bank.names}


def test_ddp_banks_stay_identical():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        context = mp.start_processes(_ddp_worker, args=(init_file, tmp), nprocs=WORLD, join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + 90
        try:
            while not context.join(timeout=5):
                if time.monotonic() > deadline:
                    pytest.fail("DDP workers did not finish within 90 s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
        banks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]
    expected = _single_process_equivalent()
    for name in ("v", "u"):
        assert torch.equal(banks[0][name], banks[1][name])  # bit-identical across ranks
        torch.testing.assert_close(banks[0][name], expected[name], rtol=1e-6, atol=1e-6)


def test_update_before_backward_is_refused_by_autograd(device):
    """Logits saved the pre-update bank: updating it before backward must not silently change the gradient."""
    bank = filled_bank(device)
    feats, labels = batch(device)
    loss = bank.contrast_loss(feats.clone().requires_grad_(True), labels, "v")
    bank.update_("v", feats, labels)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
