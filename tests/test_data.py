"""Dataset loaders (SYSU-MM01 and RegDB layouts), transforms and the cross-modality sampler."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from reid_kernels.training.data import (BatchSpec, CrossModalityIdentitySampler, DatasetError, ImageCache, ModalityDataset,
                           TrainTransform, collate_batch,
                           load_trainset)
from reid_kernels.training.data.common import load_image
from reid_kernels.training.synth import SynthConfig, generate


@pytest.fixture(scope="module")
def sysu_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sysu")
    generate(str(root), SynthConfig(ids=12, test_ids=3, val_ids=2, height=32, width=16, images_per_cam=2, seed=5))
    return root


def _write_regdb(root, ids=(1, 2, 3, 4), per_id=3):
    """A RegDB-shaped tree: Visible/<id>/..., Thermal/<id>/..., idx/train_{visible,thermal}_1.txt."""
    lines = {"visible": [], "thermal": []}
    for label, pid in enumerate(ids):
        for modality, folder, tag in (("visible", "Visible", "v"), ("thermal", "Thermal", "t")):
            os.makedirs(root / folder / str(pid), exist_ok=True)
            for k in range(per_id):
                name = f"male_back_{tag}_{pid:05d}_{k}.bmp"
                colour = (40 * label, 10 * k, 200) if modality == "visible" else (90 + 30 * label,) * 3
                Image.new("RGB", (16, 32), colour).save(root / folder / str(pid) / name)
                lines[modality].append(f"{folder}/{pid}/{name} {label}")
    os.makedirs(root / "idx", exist_ok=True)
    for modality in lines:
        (root / "idx" / f"train_{modality}_1.txt").write_text("\n".join(lines[modality]) + "\n")
    return root


# --- SYSU-MM01 layout -----------------------------------------------------------------------------
def test_sysu_loader_reads_train_and_val_ids(sysu_root):
    ts = load_trainset("sysu", str(sysu_root))
    ids = set()
    for name in ("train_id.txt", "val_id.txt"):
        ids |= {int(t) for t in (sysu_root / "exp" / name).read_text().strip().split(",")}
    assert set(ts.visible.pids.tolist()) <= ids and set(ts.infrared.pids.tolist()) <= ids
    assert set(ts.visible.cams.tolist()) <= {1, 2, 4, 5} and set(ts.infrared.cams.tolist()) <= {3, 6}
    assert ts.num_classes == len(set(ts.visible.pids.tolist()) & set(ts.infrared.pids.tolist()))
    # dense labels, same label for the same pid in both modalities
    assert sorted(set(ts.visible.labels.tolist())) == list(range(ts.num_classes))
    vis = dict(zip(ts.visible.pids.tolist(), ts.visible.labels.tolist()))
    assert all(vis[p] == l for p, l in zip(ts.infrared.pids.tolist(), ts.infrared.labels.tolist()))


def test_sysu_missing_pieces_are_named(tmp_path, sysu_root):
    with pytest.raises(DatasetError, match="not a directory"):
        load_trainset("sysu", str(tmp_path / "nowhere"))
    broken = tmp_path / "broken"
    os.makedirs(broken)
    for cam in (1, 2, 3, 4, 5):
        os.makedirs(broken / f"cam{cam}")
    with pytest.raises(DatasetError, match="cam6"):
        load_trainset("sysu", str(broken))
    os.makedirs(broken / "cam6")
    with pytest.raises(DatasetError, match="train_id.txt"):
        load_trainset("sysu", str(broken))


def test_corrupt_and_missing_images_are_named(tmp_path):
    bad = tmp_path / "0001.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(DatasetError, match="0001.jpg"):
        load_image(str(bad))
    with pytest.raises(DatasetError, match="missing.*0002.jpg"):
        load_image(str(tmp_path / "0002.jpg"))


# --- RegDB layout ---------------------------------------------------------------------------------
def test_regdb_loader(tmp_path):
    root = _write_regdb(tmp_path / "RegDB")
    ts = load_trainset("regdb", str(root), trial=1)
    assert ts.num_classes == 4 and len(ts.visible) == 12 and len(ts.infrared) == 12
    assert all("Visible" in p for p in ts.visible.paths) and all("Thermal" in p for p in ts.infrared.paths)
    assert np.array_equal(ts.visible.labels, np.repeat(np.arange(4), 3))
    image = load_image(ts.infrared.paths[0])
    assert image.size == (16, 32)


def test_regdb_errors_name_file_and_line(tmp_path):
    root = _write_regdb(tmp_path / "RegDB")
    with pytest.raises(DatasetError, match="train_visible_2.txt"):
        load_trainset("regdb", str(root), trial=2)
    path = root / "idx" / "train_thermal_1.txt"
    path.write_text(path.read_text() + "Thermal/9/x.bmp notanumber\n")
    with pytest.raises(DatasetError, match=r"train_thermal_1.txt line 13"):
        load_trainset("regdb", str(root), trial=1)


# --- sampler --------------------------------------------------------------------------------------
def _labels(counts):
    return np.concatenate([np.full(n, i) for i, n in enumerate(counts)])


def test_sampler_batch_layout_and_epoch_length():
    vis = _labels([5, 3, 7, 2, 4, 6])  # 27 visible
    ir = _labels([2, 4, 1, 3, 5, 2])  # 17 infrared
    s = CrossModalityIdentitySampler(vis, ir, num_ids=3, num_pos=2, seed=1)
    assert s.batches_per_epoch == 27 // 6 + 1  # floor(max(#rgb, #ir) / (P*K)) + 1
    slots = list(s)
    assert len(slots) == len(s) == s.batches_per_epoch * 6
    for b in range(s.batches_per_epoch):
        batch = slots[6 * b: 6 * b + 6]
        vis_ids = [vis[v] for v, _, _ in batch]
        ir_ids = [ir[i] for _, i, _ in batch]
        assert vis_ids == ir_ids  # same identity order in both halves
        blocks = [vis_ids[k:k + 2] for k in range(0, 6, 2)]
        assert all(len(set(block)) == 1 for block in blocks)  # identity-major, K per identity
        assert len({block[0] for block in blocks}) == 3  # P distinct identities


def test_sampler_reproducible_per_epoch_and_sharded():
    vis, ir = _labels([4] * 8), _labels([3] * 8)
    a = CrossModalityIdentitySampler(vis, ir, 4, 2, seed=7)
    b = CrossModalityIdentitySampler(vis, ir, 4, 2, seed=7)
    assert list(a) == list(b)
    a.set_epoch(1)
    first = list(a)
    assert first != list(b)
    b.load_state_dict(a.state_dict())
    assert list(b) == first
    ranks = [CrossModalityIdentitySampler(vis, ir, 4, 2, seed=7, rank=r, world_size=2) for r in range(2)]
    shards = [list(r) for r in ranks]
    assert len(shards[0]) == len(shards[1]) == (a.batches_per_epoch // 2) * 8
    whole = a.epoch_batches() if False else CrossModalityIdentitySampler(vis, ir, 4, 2, seed=7).epoch_batches()
    assert shards[0][:8] == whole[0] and shards[1][:8] == whole[1]


def test_sampler_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_ids"):
        CrossModalityIdentitySampler(_labels([2, 2]), _labels([2, 2]), num_ids=3, num_pos=1)


# --- dataset + transforms -------------------------------------------------------------------------
def test_paired_dataset_batches_and_deterministic_augmentation(sysu_root):
    ts = load_trainset("sysu", str(sysu_root))
    transform = TrainTransform(flip=0.5, pad=2, erasing=0.5, channel_aug="exchange")
    ds = ModalityDataset(ts, transform, ImageCache(32, 16, keep=True))
    sampler = CrossModalityIdentitySampler(ts.visible.labels, ts.infrared.labels, 3, 2, seed=0)
    slots = list(sampler)[:6]
    batch = collate_batch([ds[s] for s in slots])
    x_vis, x_ir = batch.images["visible"], batch.images["infrared"]
    assert batch.modalities == ("visible", "infrared")
    assert x_vis.shape == x_ir.shape == (6, 3, 32, 16) and x_vis.dtype == torch.float32
    assert torch.equal(batch.labels["visible"], batch.labels["infrared"])
    again = collate_batch([ds[s] for s in slots])
    assert torch.equal(again.images["visible"], x_vis) and torch.equal(again.images["infrared"], x_ir)


def test_auxiliary_modality_is_a_channel_exchanged_copy_and_leaves_the_others_unchanged(sysu_root):
    ts = load_trainset("sysu", str(sysu_root))
    transform = TrainTransform(flip=0.5, pad=2)
    images = ImageCache(32, 16, keep=True)
    slots = list(CrossModalityIdentitySampler(ts.visible.labels, ts.infrared.labels, 3, 2, seed=0))[:6]
    two = collate_batch([ModalityDataset(ts, transform, images)[s] for s in slots])
    spec = BatchSpec(("visible", "infrared", "auxiliary"), "channel_exchange")
    three = collate_batch([ModalityDataset(ts, transform, images, spec)[s] for s in slots])
    assert three.modalities == ("visible", "infrared", "auxiliary")
    # adding a derived modality draws after the others: visible and infrared images are unchanged
    assert torch.equal(three.images["visible"], two.images["visible"])
    assert torch.equal(three.images["infrared"], two.images["infrared"])
    aux = three.images["auxiliary"]
    assert torch.equal(three.labels["auxiliary"], three.labels["visible"])
    # every auxiliary image has three equal channels (one channel of the normalised image copied)
    assert torch.equal(aux[:, 0], aux[:, 1]) and torch.equal(aux[:, 1], aux[:, 2])
    assert three.all_labels().shape == (18,) and three.sizes() == (6, 6, 6)
    with pytest.raises(ValueError, match="auxiliary"):
        BatchSpec(("visible", "auxiliary"), None)
    with pytest.raises(ValueError, match="auxiliary"):
        BatchSpec(("visible", "infrared", "auxiliary"), "bogus")
