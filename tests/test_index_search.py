"""training.index / training.search: index -> search -> JSON and picture, resume after kill -9,
--add, another model refused, bad input in one line (exit 2, nothing written over)."""
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from reid_kernels.training import gallery
from reid_kernels.training.engine import checkpoint
from reid_kernels.training.index import extract_records, load_model
from reid_kernels.training.index import main as index_main
from reid_kernels.training.search import main as search_main
from reid_kernels.training.synth import SynthConfig, generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["data.height=32", "data.width=16", "data.pad=2", "model.width=8", "train.epochs=1",
         "train.max_steps_per_epoch=1", "train.progress=false", "eval.final=false", "train.tensorboard=false",
         "sampler.num_ids=4", "sampler.num_pos=2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 12-identity synthetic SYSU-layout tree (94 images of 32x16) and a one-step checkpoint."""
    from reid_kernels.training.train import main as train_main

    base = tmp_path_factory.mktemp("retrieval")
    root = str(base / "synth")
    generate(root, SynthConfig(ids=12, test_ids=4, height=32, width=16, images_per_cam=2, seed=1, occlusion=0.0,
                               clutter=1, jitter=0.5, ir_material=0.2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert train_main(["--config", "lba_synth", "--data-root", root, "--out", str(base / "run"), *SMALL]) == 0
    checkpoint = str(base / "run" / "final.pt")
    index_dir = str(base / "index")
    assert index_main(["--checkpoint", checkpoint, "--images", root, "--out", index_dir, "--shard-size", "32"]) == 0
    return {"root": root, "checkpoint": checkpoint, "index": index_dir, "base": base}


def ir_query(root):
    return os.path.join(root, "cam3", sorted(os.listdir(os.path.join(root, "cam3")))[0], "0001.jpg")


def query_feature(world, path, modality):
    model, cfg, descriptor, _ = load_model(world["checkpoint"], "cpu")
    return extract_records(model, cfg, descriptor, [gallery.ImageRecord(path, 3, modality, -1)], 64)[0]


def brute_force(features, query, allowed, k):
    """Rows and 1 - cosine of the k nearest allowed rows, in float64; asserts the (k+1)-th is no near tie."""
    g = features.astype(np.float64)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = query.astype(np.float64) / np.linalg.norm(query)
    distance = 1 - g @ q
    distance[~allowed] = np.inf
    order = np.argsort(distance, kind="stable")
    gaps = np.diff(distance[order[: k + 1]])
    assert gaps.min() > 1e-5, "near-tied test data: the expected ranking is not defined"  # float32 error ~1e-7
    return order[:k], distance[order[:k]]


def search_json(args, path):
    assert search_main([*args, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_index_then_search_prints_writes_json_and_draws(world, tmp_path, capsys):
    manifest = gallery.read_manifest(world["index"])
    records = gallery.records_of(manifest)
    assert manifest["state"] == "complete" and manifest["index"]["kind"] == "flat" and len(records) == 94
    assert [s["count"] for s in manifest["shards"]] == [32, 32, 30]
    assert {r.modality for r in records if r.camera in (3, 6)} == {"infrared"}
    assert {r.modality for r in records if r.camera not in (3, 6)} == {"visible"}
    assert records[0].person_id == int(os.path.basename(os.path.dirname(records[0].path)))
    features = gallery.load_features(world["index"], manifest)
    # the shards hold the model's features of each image through its modality's stem (another batching:
    # float32 summation-order differences, measured max 2e-6 here)
    model, cfg, descriptor, _ = load_model(world["checkpoint"], "cpu")
    direct = extract_records(model, cfg, descriptor, records[::-1], batch_size=7)[::-1]
    assert np.allclose(features, direct, atol=1e-4, rtol=1e-4)
    query = ir_query(world["root"])
    capsys.readouterr()
    result = search_json(["--index", world["index"], "--query", query, "--k", "5", "--figure",
                          str(tmp_path / "ranked.png")], tmp_path / "out.json")
    printed = capsys.readouterr().out
    (entry,) = result["queries"]
    assert entry["query"] == query and entry["modality"] == "infrared"
    assert entry["person_id"] == int(os.path.basename(os.path.dirname(query)))
    rows = [r["path"] for r in entry["results"]]
    assert query not in rows and len(rows) == 5  # the query itself is left out
    allowed = np.array([r.path != query for r in records])
    ref_rows, ref_distance = brute_force(features, query_feature(world, query, "infrared"), allowed, 5)
    assert rows == [records[i].path for i in ref_rows]
    assert np.allclose([r["distance"] for r in entry["results"]], ref_distance, atol=1e-5)
    assert [r["match"] for r in entry["results"]] == [records[i].person_id == entry["person_id"] for i in ref_rows]
    assert rows[0] in printed and ("match" in printed or "other" in printed)
    with Image.open(tmp_path / "ranked.png") as picture:
        assert picture.size[1] == 128 + 2 * 4 + 30  # one query row: thumbnails 128 px high, frames, captions
        pixels = np.asarray(picture.convert("RGB"))
    green, red = np.array([40, 170, 60]), np.array([215, 40, 40])
    framed = [(pixels[2] == c).all(1).any() for c in (green, red)]  # the frames' top border row
    expected = [any(r["match"] for r in entry["results"]), not all(r["match"] for r in entry["results"])]
    assert framed == expected


def test_cross_modality_keeps_the_other_modality_only(world, tmp_path):
    manifest = gallery.read_manifest(world["index"])
    records, features = gallery.records_of(manifest), gallery.load_features(world["index"], manifest)
    query = ir_query(world["root"])
    plain = search_json(["--index", world["index"], "--query", query, "--k", "20"], tmp_path / "a.json")
    cross = search_json(["--index", world["index"], "--query", query, "--k", "20", "--cross-modality"],
                        tmp_path / "b.json")
    # without the flag both modalities come back, so the test below means something
    assert {r["modality"] for r in plain["queries"][0]["results"]} == {"visible", "infrared"}
    assert {r["modality"] for r in cross["queries"][0]["results"]} == {"visible"}
    allowed = np.array([r.modality == "visible" for r in records])
    ref_rows, _ = brute_force(features, query_feature(world, query, "infrared"), allowed, 20)
    assert [r["path"] for r in cross["queries"][0]["results"]] == [records[i].path for i in ref_rows]


@pytest.mark.parametrize("method", ["k_reciprocal", "aim"])
def test_rerank_reorders_the_candidates_by_the_rerank_distance(world, tmp_path, method):
    from reid_kernels.rerank import aim, k_reciprocal_rerank

    manifest = gallery.read_manifest(world["index"])
    records, features = gallery.records_of(manifest), gallery.load_features(world["index"], manifest)
    query = ir_query(world["root"])
    out = search_json(["--index", world["index"], "--query", query, "--k", "8", "--rerank", method,
                       "--cross-modality"], tmp_path / "r.json")
    got = out["queries"][0]["results"]
    # the whole allowed gallery (64 visible images) is the candidate pool here (pool = max(100, 5k))
    pool = [i for i, r in enumerate(records) if r.modality == "visible"]
    q = torch.from_numpy(query_feature(world, query, "infrared"))[None]
    g = torch.from_numpy(features[pool])
    d = (k_reciprocal_rerank(q, g, k1=20, k2=6) if method == "k_reciprocal" else aim(q, g))[0].numpy()
    order = np.argsort(d, kind="stable")[:8]
    assert np.all(np.diff(np.sort(d)[:9]) > 1e-6)  # no near tie decides the expected order
    assert [r["path"] for r in got] == [records[pool[i]].path for i in order]
    assert np.allclose([r["distance"] for r in got], d[order], atol=1e-5)


def test_other_index_kinds_and_the_torch_fallback(world, tmp_path, monkeypatch):
    query = ir_query(world["root"])
    flat = search_json(["--index", world["index"], "--query", query, "--k", "10"], tmp_path / "flat.json")
    flat_paths = [r["path"] for r in flat["queries"][0]["results"]]
    for kind in ("ivf", "hnsw"):
        out = str(tmp_path / kind)
        assert index_main(["--checkpoint", world["checkpoint"], "--images", world["root"], "--out", out,
                           "--index-kind", kind]) == 0
        assert gallery.read_manifest(out)["index"]["kind"] == kind
        got = search_json(["--index", out, "--query", query, "--k", "10"], tmp_path / f"{kind}.json")
        paths = [r["path"] for r in got["queries"][0]["results"]]
        if kind == "ivf":  # 2 lists, both probed: exhaustive, so exact
            assert paths == flat_paths
            one = search_json(["--index", out, "--query", query, "--k", "10", "--nprobe", "1"],
                              tmp_path / "ivf1.json")  # one list of two: another (approximate) answer
            assert [r["path"] for r in one["queries"][0]["results"]] != flat_paths
        else:  # a graph search: approximate, but at 94 vectors with a beam of 64 nearly exact
            assert len(set(paths) & set(flat_paths)) >= 8
    monkeypatch.setitem(sys.modules, "faiss", None)  # no FAISS: exact search in torch over the shards
    out = str(tmp_path / "torch")
    assert index_main(["--checkpoint", world["checkpoint"], "--images", world["root"], "--out", out]) == 0
    manifest = gallery.read_manifest(out)
    assert manifest["index"]["backend"] == "torch" and not os.path.exists(os.path.join(out, gallery.INDEX_FILE))
    got = search_json(["--index", out, "--query", query, "--k", "10"], tmp_path / "torch.json")
    assert [r["path"] for r in got["queries"][0]["results"]] == flat_paths


def test_index_kind_policy_follows_the_measured_thresholds():
    assert gallery.choose_kind(1000, 2048) == "flat"
    assert gallery.choose_kind(gallery.FLAT_MAX_WORK // 2048, 2048) == "flat"
    assert gallery.choose_kind(gallery.FLAT_MAX_WORK // 2048 + 1, 2048) == "hnsw"
    assert gallery.choose_kind(gallery.HNSW_MAX_BYTES // (4 * 2048), 2048) == "hnsw"
    assert gallery.choose_kind(gallery.HNSW_MAX_BYTES // (4 * 2048) + 1, 2048) == "ivfpq"
    assert gallery.choose_kind(gallery.FLAT_MAX_WORK // 128, 128) == "flat"
    p = gallery.index_parameters("ivf", 1_000_000, 2048)
    assert p["nlist"] == 1000 and p["train_size"] == 40_000 and p["nprobe"] == gallery.DEFAULT_NPROBE
    assert gallery.index_parameters("ivf", 100, 64)["nlist"] == 2  # at least 39 training vectors per list


def _digest(folder):
    return {os.path.relpath(os.path.join(b, f), folder): open(os.path.join(b, f), "rb").read()
            for b, _, files in os.walk(folder) for f in files}


KILLABLE = """
import sys, time
sys.path.insert(0, {repo!r})
from reid_kernels.training import gallery
write = gallery.write_shard
def slow_write(*args):
    write(*args)
    time.sleep(30)  # the parent kills us here, after the first shard is on disk
gallery.write_shard = slow_write
from reid_kernels.training.index import main
sys.exit(main({argv!r}))
"""


def test_kill_9_loses_at_most_the_shard_in_progress_and_resume_finishes(world, tmp_path, capsys):
    out = str(tmp_path / "killed")
    argv = ["--checkpoint", world["checkpoint"], "--images", world["root"], "--out", out, "--shard-size", "32"]
    child = subprocess.Popen([sys.executable, "-c", KILLABLE.format(repo=REPO, argv=argv)], cwd=str(tmp_path),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = os.path.join(out, "shards", "00000.npy")
    deadline = time.time() + 120
    while not os.path.exists(first) and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert os.path.exists(first) and not os.path.exists(os.path.join(out, "shards", "00001.npy"))
    assert gallery.read_manifest(out)["state"] == "extracting"
    # an interrupted index is refused by search, in one line
    assert search_main(["--index", out, "--query", ir_query(world["root"])]) == 2
    assert "incomplete" in capsys.readouterr().err
    kept = os.stat(first).st_mtime_ns
    assert index_main(argv) == 0
    assert "resuming: 1 of 3 shards" in capsys.readouterr().out
    assert os.stat(first).st_mtime_ns == kept  # the finished shard was not extracted again
    # same images, same shards, same batches as the uninterrupted run: the same bits
    done = _digest(world["index"])
    again = _digest(out)
    shard_names = [n for n in done if n.startswith("shards")]
    assert shard_names and all(done[n] == again[n] for n in shard_names)
    assert not [n for n in again if ".tmp." in n]
    # a complete index run again does nothing
    assert index_main(argv) == 0 and "nothing to do" in capsys.readouterr().out


def test_add_extends_without_extracting_again(world, tmp_path, capsys):
    records = gallery.records_of(gallery.read_manifest(world["index"]))
    half = tmp_path / "half.csv"
    half.write_text("path,camera,modality,person_id\n" + "".join(
        f"{r.path},{r.camera},{r.modality},{r.person_id}\n" for r in records[:40]))
    out = str(tmp_path / "grown")
    base = ["--checkpoint", world["checkpoint"], "--out", out, "--shard-size", "16"]
    assert index_main([*base, "--images", str(half)]) == 0
    old = _digest(out)
    capsys.readouterr()
    assert index_main([*base, "--images", world["root"], "--add"]) == 0
    assert "--add: 54 new images (40 already indexed)" in capsys.readouterr().out
    new = _digest(out)
    assert all(new[n] == old[n] for n in old if n.startswith("shards"))  # earlier shards untouched
    manifest = gallery.read_manifest(out)
    grown = gallery.records_of(manifest)
    assert len(grown) == 94 and grown[:40] == records[:40] and {r.path for r in grown} == {r.path for r in records}
    by_path = dict(zip((r.path for r in records), gallery.load_features(world["index"],
                                                                         gallery.read_manifest(world["index"]))))
    features = gallery.load_features(out, manifest)
    assert np.allclose(features, np.stack([by_path[r.path] for r in grown]), atol=1e-4, rtol=1e-4)
    assert manifest["index"]["count"] == 94
    assert index_main([*base, "--images", world["root"], "--add"]) == 0
    assert "--add: 0 new images" in capsys.readouterr().out


def test_another_model_is_refused_naming_both(world, tmp_path, capsys):
    state = torch.load(world["checkpoint"], map_location="cpu", weights_only=False)
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name] = state["model"][name] + 0.01
    other = str(tmp_path / "other.pt")
    torch.save(checkpoint.seal(state), other)  # a valid checkpoint of another model (fresh digest)
    before = _digest(world["index"])
    assert index_main(["--checkpoint", other, "--images", world["root"], "--out", world["index"], "--add"]) == 2
    err = capsys.readouterr().err.strip()
    assert other in err and world["checkpoint"] in err and len(err.splitlines()) == 1
    assert search_main(["--index", world["index"], "--query", ir_query(world["root"]), "--checkpoint", other]) == 2
    err = capsys.readouterr().err.strip()
    assert other in err and world["checkpoint"] in err and len(err.splitlines()) == 1
    assert _digest(world["index"]) == before


def bad_cases(world, tmp):
    """(name, argv of index or search, text the one-line error must contain)."""
    garbage = tmp / "broken.jpg"
    garbage.write_bytes(b"not a jpeg at all")
    empty = tmp / "empty"
    empty.mkdir()
    plain = tmp / "plain"
    plain.mkdir()
    Image.new("RGB", (16, 32)).save(plain / "a.png")
    mine = tmp / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    bad_csv = tmp / "bad.csv"
    bad_csv.write_text("path,camera,modality\nx.jpg,1,thermal\n")
    incomplete = tmp / "incomplete"
    incomplete.mkdir()
    manifest = gallery.read_manifest(world["index"])
    gallery.write_manifest(str(incomplete), dict(manifest, state="extracting", index=None))
    no_faiss = tmp / "nofile"
    no_faiss.mkdir()
    gallery.write_manifest(str(no_faiss), manifest)
    existing = tmp / "existing.json"
    existing.write_text("mine")
    ckpt, root, index, query = world["checkpoint"], world["root"], world["index"], ir_query(world["root"])
    idx = lambda *a: ("index", ["--checkpoint", ckpt, *a])  # noqa: E731
    srch = lambda *a: ("search", ["--index", index, "--query", query, *a])  # noqa: E731
    return [
        ("undecodable query", ("search", ["--index", index, "--query", str(garbage)]), str(garbage)),
        ("missing query", ("search", ["--index", index, "--query", str(tmp / "nope.jpg")]), "nope.jpg"),
        ("incomplete index", ("search", ["--index", str(incomplete), "--query", query]), "incomplete"),
        ("index file missing", ("search", ["--index", str(no_faiss), "--query", query]), "index.faiss"),
        ("not an index folder", ("search", ["--index", str(mine), "--query", query]), "not an index folder"),
        ("k above the gallery", srch("--k", "94"), "--k: 94 is more than the 93"),
        ("k above the other modality", srch("--k", "65", "--cross-modality"), "--k: 65 is more than the 64"),
        ("k below 1", srch("--k", "0"), "--k"),
        ("nprobe below 1", srch("--nprobe", "0"), "--nprobe"),
        ("existing json", srch("--json", str(existing)), "--json"),
        ("figure not png", srch("--figure", str(tmp / "x.jpg")), "--figure"),
        ("empty gallery", idx("--images", str(empty), "--out", str(tmp / "o1"), "--modality", "visible"),
         "empty"),
        ("plain folder, no modality", idx("--images", str(plain), "--out", str(tmp / "o2")),
         "--modality visible|infrared"),
        ("bad csv", idx("--images", str(bad_csv), "--out", str(tmp / "o3")), "bad.csv line 2"),
        ("user folder as out", idx("--images", root, "--out", str(mine)), "is not an index folder"),
        ("add to nothing", idx("--images", root, "--out", str(tmp / "o4"), "--add"), "--add"),
        ("another image list", idx("--images", str(plain), "--modality", "visible", "--out", index),
         "another image list"),
        ("bad checkpoint", ("index", ["--checkpoint", str(existing), "--images", root, "--out", str(tmp / "o5")]),
         "--checkpoint"),
        ("modality on a tree", idx("--images", root, "--out", str(tmp / "o6"), "--modality", "visible"),
         "--modality"),
    ]


def test_bad_input_is_one_line_exit_2_and_nothing_is_written(world, tmp_path, capsys):
    cases = bad_cases(world, tmp_path)
    before = _digest(tmp_path), _digest(world["index"])
    for name, (command, argv), needle in cases:
        main = index_main if command == "index" else search_main
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse's own refusals (parser.error) exit 2 this way
            code = stop.code
        err = capsys.readouterr().err.strip()
        assert code == 2, name
        assert len(err.splitlines()) == 1 and needle in err, (name, err)
    assert (_digest(tmp_path), _digest(world["index"])) == before  # nothing written, nothing written over
