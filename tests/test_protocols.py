"""SYSU-MM01 / RegDB protocols on synthetic folder trees in the real layouts."""
import os
import random
import zlib

import numpy as np
import pytest
import torch

from reid_kernels.metrics import evaluate_ranking
from reid_kernels.protocols import (
    RegDB,
    SYSUMM01,
    FeatureTable,
    evaluate_regdb,
    evaluate_sysu,
)

TEST_IDS = [12, 3, 7, 1]  # deliberately unsorted in the file
# images per (cam, id); a missing key = no folder. id 12 is never seen by the outdoor cams 4/5,
# id 7 never by cam2; (1, 3) has 4 images only (fewer than the 10 of a multi-shot draw).
FOLDERS = {}
for pid in TEST_IDS:
    for cam in (1, 2, 3, 4, 5, 6):
        FOLDERS[(cam, pid)] = 12 + (pid + cam) % 5
del FOLDERS[(4, 12)], FOLDERS[(5, 12)], FOLDERS[(2, 7)]
FOLDERS[(1, 3)] = 4


def make_sysu(root, with_mat=False, trials=10):
    for (cam, pid), count in FOLDERS.items():
        folder = root / f"cam{cam}" / f"{pid:04d}"
        folder.mkdir(parents=True)
        for number in range(1, count + 1):
            (folder / f"{number:04d}.jpg").write_bytes(b"")  # image content is never read
    for cam in range(1, 7):
        (root / f"cam{cam}").mkdir(exist_ok=True)
    (root / "exp").mkdir()
    (root / "exp" / "test_id.txt").write_text(",".join(str(i) for i in TEST_IDS) + "\n")
    (root / "exp" / "train_id.txt").write_text("2,4\n")
    (root / "exp" / "val_id.txt").write_text("5\n")
    if with_mat:
        write_rand_perm_cam(root / "exp" / "rand_perm_cam.mat", trials)
    return root


def write_rand_perm_cam(path, trials, num_ids=12):
    """The MATLAB layout: a 6x1 cell of 1xN cells, each a (trials x images) matrix of image numbers."""
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    cams = np.empty((6, 1), dtype=object)
    for cam in range(1, 7):
        per_id = np.empty((1, num_ids), dtype=object)
        for pid in range(1, num_ids + 1):
            count = FOLDERS.get((cam, pid), 0)
            if count == 0:
                per_id[0, pid - 1] = np.zeros((0, 0))
            else:
                per_id[0, pid - 1] = np.stack([rng.permutation(count) + 1 for _ in range(trials)]).astype(np.float64)
        cams[cam - 1, 0] = per_id
    savemat(str(path), {"rand_perm_cam": cams})
    return path


# ----------------------------------------------------------------------------------------
# References: the community procedures, written plainly against the folder tree.
# ----------------------------------------------------------------------------------------
def agw_query(root):
    ids = sorted("%04d" % int(x) for x in open(os.path.join(root, "exp/test_id.txt")).read().splitlines()[0].split(","))
    files = []
    for pid in ids:
        for cam in ("cam3", "cam6"):
            d = os.path.join(root, cam, pid)
            if os.path.isdir(d):
                files.extend(sorted(d + "/" + f for f in os.listdir(d)))
    return files


def agw_gallery(root, mode, trial, shot):
    random.seed(trial)
    np.random.seed(trial)
    cams = ["cam1", "cam2", "cam4", "cam5"] if mode == "all" else ["cam1", "cam2"]
    ids = sorted("%04d" % int(x) for x in open(os.path.join(root, "exp/test_id.txt")).read().splitlines()[0].split(","))
    files = []
    for pid in ids:
        for cam in cams:
            d = os.path.join(root, cam, pid)
            if os.path.isdir(d):
                new = sorted(d + "/" + f for f in os.listdir(d))
                if shot == "single":
                    files.append(random.choice(new))
                elif len(new) >= 10:
                    files.extend(str(x) for x in np.random.choice(new, 10, replace=False))
                else:
                    files.extend(new)  # the AGW code raises here; we document taking them all
    return files


def matlab_gallery(root, mode, trial, shots):
    from scipy.io import loadmat

    perm = loadmat(os.path.join(root, "exp/rand_perm_cam.mat"))["rand_perm_cam"]
    cams = [1, 2] if mode == "indoor" else [1, 2, 4, 5]
    names = []
    for cam in cams:
        cam_perm = perm[cam - 1][0].squeeze()
        for pid in sorted(TEST_IDS):
            if not os.path.isdir(os.path.join(root, f"cam{cam}", f"{pid:04d}")):
                continue
            for number in cam_perm[pid - 1][trial][:shots].tolist():
                names.append(f"cam{cam}/{pid:04d}/{int(number):04d}.jpg")
    return sorted(names)


def rel(root, paths):
    return [os.path.relpath(p, root).replace(os.sep, "/") for p in paths]


@pytest.fixture
def sysu_root(tmp_path):
    return make_sysu(tmp_path / "SYSU-MM01", with_mat=True)


def test_query_list_matches_community_order(sysu_root):
    dataset = SYSUMM01(sysu_root)
    query = dataset.query("all")
    assert list(query.paths) == rel(sysu_root, agw_query(str(sysu_root)))
    assert dataset.test_ids == sorted(TEST_IDS)
    assert set(query.cams.tolist()) == {3, 6}
    assert query.pids.tolist() == [int(p.split("/")[1]) for p in query.paths]
    assert list(dataset.query("indoor").paths) == list(query.paths)  # both modes query cams 3 and 6


@pytest.mark.parametrize("mode", ["all", "indoor"])
@pytest.mark.parametrize("shot", ["single", "multi"])
def test_agw_draws_match_the_community_procedure(sysu_root, mode, shot):
    dataset = SYSUMM01(sysu_root)
    for trial in (0, 3, 9):
        gallery = dataset.gallery(mode, shot, trial, draw="agw")
        assert list(gallery.paths) == rel(sysu_root, agw_gallery(str(sysu_root), mode, trial, shot))
        assert gallery.cams.tolist() == [int(p[3]) for p in gallery.paths]
    folders = [k for k in FOLDERS if k[0] in ((1, 2) if mode == "indoor" else (1, 2, 4, 5))]
    expected = len(folders) if shot == "single" else sum(min(10, FOLDERS[k]) for k in folders)
    assert len(dataset.gallery(mode, shot, 0)) == expected
    # different trials draw different galleries
    assert dataset.gallery(mode, shot, 0).paths != dataset.gallery(mode, shot, 1).paths


def test_agw_sample_draw_uses_python_random_sample(sysu_root):
    dataset = SYSUMM01(sysu_root)
    gallery = dataset.gallery("indoor", "multi", 2, draw="agw-sample")
    rng = random.Random(2)
    expected = []
    for pid in sorted(TEST_IDS):
        for cam in (1, 2):
            entries = dataset.folder_entries(cam, pid)
            if entries:
                chosen = rng.sample(entries, 10) if len(entries) >= 10 else entries
                expected += [f"cam{cam}/{pid:04d}/{n}" for n in chosen]
    assert list(gallery.paths) == expected


@pytest.mark.parametrize("mode", ["all", "indoor"])
@pytest.mark.parametrize("shot, shots", [("single", 1), ("multi", 10)])
def test_matlab_draws_follow_rand_perm_cam(sysu_root, mode, shot, shots):
    dataset = SYSUMM01(sysu_root)
    for trial in (0, 7):
        gallery = dataset.gallery(mode, shot, trial, draw="matlab")
        assert list(gallery.paths) == matlab_gallery(str(sysu_root), mode, trial, shots)


def test_folder_validation_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        SYSUMM01(tmp_path / "nowhere")
    root = make_sysu(tmp_path / "a")
    (root / "exp" / "test_id.txt").unlink()
    with pytest.raises(FileNotFoundError, match="exp/test_id.txt"):
        SYSUMM01(root)
    root = make_sysu(tmp_path / "b")
    os.rename(root / "cam4", root / "cam4_")
    with pytest.raises(FileNotFoundError, match="'cam4'"):
        SYSUMM01(root)
    root = make_sysu(tmp_path / "c")  # no rand_perm_cam.mat
    with pytest.raises(FileNotFoundError, match="rand_perm_cam.mat"):
        SYSUMM01(root).gallery("all", "single", 0, draw="matlab")
    root = make_sysu(tmp_path / "d", with_mat=True)
    (root / "cam1" / "0003" / "0002.jpg").unlink()
    dataset = SYSUMM01(root)
    with pytest.raises(FileNotFoundError, match="cam1/0003/0002.jpg"):
        for trial in range(10):
            dataset.gallery("all", "multi", trial, draw="matlab")
    with pytest.raises(ValueError, match="trial"):
        dataset.gallery("all", "multi", 10, draw="matlab")  # the .mat has 10 trials
    with pytest.raises(ValueError, match="draw"):
        dataset.gallery("all", "single", 0, draw="bogus")
    (root / "exp" / "test_id.txt").write_text("a,b\n")
    with pytest.raises(ValueError, match="comma-separated"):
        SYSUMM01(root)


def synthetic_features(paths, dim=8, noise=0.9):
    """Identity-dependent features with noise, deterministic per image (keyed on its last 3 path parts)."""
    feats = []
    for path in paths:
        parts = path.replace(os.sep, "/").split("/")
        pid = int(parts[-2])
        centre = np.random.default_rng(pid).standard_normal(dim)
        jitter = np.random.default_rng(zlib.crc32("/".join(parts[-3:]).encode())).standard_normal(dim)
        feats.append(centre + noise * jitter)
    return np.asarray(feats, dtype=np.float32)


def test_evaluate_sysu_matches_per_trial_reference(sysu_root):
    calls = []

    def extractor(paths):
        calls.append(len(paths))
        return torch.from_numpy(synthetic_features(paths))

    table = evaluate_sysu(sysu_root, extractor, trials=3, max_rank=5)
    assert len(calls) == 2  # queries once, the union of all drawn gallery images once
    assert [s.name for s in table.settings] == ["all / single-shot", "all / multi-shot",
                                                 "indoor / single-shot", "indoor / multi-shot"]
    query_files = agw_query(str(sysu_root))
    qf = synthetic_features(query_files)
    q_pids = np.array([int(p.split("/")[-2]) for p in query_files])
    q_cams = np.array([int(p.split("/")[-3][3]) for p in query_files])
    for setting, (mode, shot) in zip(table.settings, [("all", "single"), ("all", "multi"),
                                                        ("indoor", "single"), ("indoor", "multi")]):
        assert len(setting.trials) == 3
        for trial, result in enumerate(setting.trials):
            files = agw_gallery(str(sysu_root), mode, trial, shot)
            gf = synthetic_features(files)
            qn = qf / np.linalg.norm(qf, axis=1, keepdims=True)
            gn = gf / np.linalg.norm(gf, axis=1, keepdims=True)
            expected = evaluate_ranking(1 - qn @ gn.T, q_pids, np.array([int(p.split("/")[-2]) for p in files]),
                                        q_cams, np.array([int(p.split("/")[-3][3]) for p in files]), max_rank=5)
            assert np.allclose(result.cmc, expected.cmc) and result.mAP == pytest.approx(expected.mAP, rel=1e-6)
        assert setting.mean("R1") == pytest.approx(np.mean([t.rank(1) for t in setting.trials]))
    text = str(table)
    assert "all / single-shot" in text and "±" in text and "mINP" in text
    md = table.to_markdown()
    assert md.splitlines()[0].startswith("| setting | trials | R1 | R5 | mAP | mINP |")
    rows = table.rows()
    assert rows[0]["trials"] == 3 and 0 <= rows[0]["R1_mean"] <= 1
    assert table["indoor / multi-shot"] is table.settings[3]


def test_evaluate_sysu_with_precomputed_features_and_aim(sysu_root):
    dataset = SYSUMM01(sysu_root)
    everything = [p for p in dataset.query().paths]
    for cam in (1, 2, 4, 5):
        for pid in dataset.test_ids:
            everything += [f"cam{cam}/{pid:04d}/{n}" for n in dataset.folder_entries(cam, pid) or []]
    table = FeatureTable(everything, synthetic_features(everything))
    plain = evaluate_sysu(dataset, table, trials=[0, 1], modes=("all",), shots=("single",), max_rank=5)
    via_call = evaluate_sysu(dataset, lambda paths: synthetic_features(paths), trials=[0, 1], modes=("all",),
                             shots=("single",), max_rank=5)
    assert np.array_equal(plain.settings[0].trials[1].cmc, via_call.settings[0].trials[1].cmc)
    aimed = evaluate_sysu(dataset, table, trials=[0], modes=("all",), shots=("multi",), postprocess="aim",
                          max_rank=5)
    assert 0 <= aimed.settings[0].mean("mAP") <= 1
    with pytest.raises(KeyError, match="no feature for image"):
        evaluate_sysu(dataset, FeatureTable(everything[:5], synthetic_features(everything[:5])), trials=1)
    with pytest.raises(ValueError, match="expected a"):
        evaluate_sysu(dataset, lambda paths: np.zeros((3, 4), np.float32), trials=1)
    with pytest.raises(ValueError, match="finite"):
        evaluate_sysu(dataset, lambda paths: np.full((len(paths), 4), np.nan, np.float32), trials=1)
    with pytest.raises(ValueError, match="modes"):
        evaluate_sysu(dataset, table, modes=("outdoor",))


# ----------------------------------------------------------------------------------------
# RegDB
# ----------------------------------------------------------------------------------------
def make_regdb(root, trials=(1, 2), ids_per_trial=5, images=3):
    (root / "idx").mkdir(parents=True)
    for trial in trials:
        ids = list(range(trial * 100, trial * 100 + ids_per_trial))
        for modality, folder in (("visible", "Visible"), ("thermal", "Thermal")):
            lines = [f"{folder}/{pid}/img_{n}.bmp {pid}" for pid in ids for n in range(images)]
            (root / "idx" / f"test_{modality}_{trial}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_regdb_both_directions_and_per_trial_features(tmp_path):
    root = make_regdb(tmp_path / "RegDB")
    split = RegDB(root).split(1, "visible")
    assert split.paths[0] == "Visible/100/img_0.bmp" and split.pids[0] == 100 and len(split) == 15

    def source(trial):
        return lambda paths: synthetic_features(paths, noise=0.5 + trial)

    table = evaluate_regdb(root, {1: source(1), 2: source(2)}, trials=[1, 2], max_rank=5)
    assert [s.name for s in table.settings] == ["visible->thermal", "thermal->visible"]
    vis, th = RegDB(root).split(2, "visible"), RegDB(root).split(2, "thermal")
    qf, gf = synthetic_features(vis.absolute_paths(), noise=2.5), synthetic_features(th.absolute_paths(), noise=2.5)
    qn, gn = qf / np.linalg.norm(qf, axis=1, keepdims=True), gf / np.linalg.norm(gf, axis=1, keepdims=True)
    expected = evaluate_ranking(1 - qn @ gn.T, vis.pids, th.pids, max_rank=5, protocol="regdb")
    got = table.settings[0].trials[1]
    assert np.allclose(got.cmc, expected.cmc) and got.mAP == pytest.approx(expected.mAP, rel=1e-6)
    reverse = evaluate_ranking(1 - gn @ qn.T, th.pids, vis.pids, max_rank=5, protocol="regdb")
    assert table.settings[1].trials[1].mAP == pytest.approx(reverse.mAP, rel=1e-6)


def test_regdb_missing_trial_or_file_fails_loudly(tmp_path):
    root = make_regdb(tmp_path / "RegDB", trials=(1, 2))
    model = lambda paths: synthetic_features(paths)  # noqa: E731
    with pytest.raises(KeyError, match="no model/features for RegDB trial 2"):
        evaluate_regdb(root, {1: model}, trials=[1, 2])
    with pytest.raises(FileNotFoundError, match="idx/test_visible_3.txt"):
        evaluate_regdb(root, {3: model}, trials=[3])
    with pytest.raises(FileNotFoundError, match="'idx'"):
        RegDB(tmp_path)
    with pytest.raises(TypeError, match="mapping trial"):
        evaluate_regdb(root, model, trials=[1])
    (root / "idx" / "test_thermal_1.txt").write_text("Thermal/1/a.bmp\n")
    with pytest.raises(ValueError, match="line 1"):
        RegDB(root).split(1, "thermal")
