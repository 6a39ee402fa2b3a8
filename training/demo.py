"""The synthetic demo: data -> ablation rows -> results table (-> correspondence figure).

    python -m training.demo [--out runs/demo] [--seeds 0,1,2] [--epochs N] [--threads T]
    python -m training.demo --config mce_synth --out runs/demo_mce --seeds 0,1,2   # MCE's Table 3 rows

With ``--config mce_synth`` (any config of the ``mce`` recipe) the rows are MCE's Table 3
ablation (``--rows`` among :data:`MCE_ROWS`) and there is no correspondence figure; the
steps below describe the default LbA demo. With several seeds the table also gives each
row's paired difference to the first trained row (same seed, same data, same
initialisation), mean ± std over seeds.

1. generates a synthetic VI-ReID set (SYSU-MM01 layout, :mod:`training.synth`) in
   ``<out>/data`` (deterministic from ``--data-seed``; reused when already there);
2. trains on the CPU, from scratch (or, with ``--pretrain DIR``, from the backbone
   :mod:`training.pretrain` trained on a separate synthetic set), the rows of LbA's Table 3 ablation with the same seeds:
   baseline (ID loss only), +IC (ID-consistency), +IC+DT (full LbA: dense triplet with
   co-attention, CMAlign at layer3 and layer4); the untrained network is evaluated too,
   as the floor;
3. evaluates each on held-out identities with the SYSU-MM01 protocol (IR queries ->
   visible gallery, all-search single-shot, mean over gallery draws) and prints
   mAP / Rank-1 / mINP and the wall time of each row;
4. draws LbA-style correspondences of the full model (``<out>/correspondence.png``).

``--out`` must be new, empty or a folder an earlier demo wrote (only ``data/``, ``<row>_seed<N>/``
run folders and the results files in it): the demo never writes into a folder of the user's.
A known failure (a bad argument, a foreign ``--out``, a bad config key, a dataset problem) is
one line on stderr and exit status 2; an unexpected one keeps its traceback.
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before anything loads torch: its CPU kernels are chosen then
    from .reproducible import pin_from_argv

    pin_from_argv()

import json
import os
import re
import sys
import time
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from . import reproducible
from .recipes.peca import ablation_updates

LBA_ROWS = {
    "baseline": ("baseline (ID loss only)", {"loss.ic": False, "loss.dt": False}),
    "ic": ("+IC", {"loss.ic": True, "loss.dt": False}),
    "ic_dt": ("+IC +DT (full LbA)", {"loss.ic": True, "loss.dt": True, "loss.coattention": True}),
    "ic_dt_noatt": ("+IC +DT, no co-attention", {"loss.ic": True, "loss.dt": True, "loss.coattention": False}),
    "dt": ("+DT", {"loss.ic": False, "loss.dt": True, "loss.coattention": True}),
}
MCE_ROWS = {  # MCE's Table 3 (3 input modalities unless "2 ch")
    "ce": ("CE", {"loss.ce": True, "loss.memory_agnostic": False, "loss.memory_aware": False, "loss.mi": False,
                  "loss.gc": False}),
    "lu": ("L^u", {"loss.memory_aware": False, "loss.mi": False, "loss.gc": False}),
    "lw": ("L_W", {"loss.mi": False, "loss.gc": False}),
    "lw_dmi": ("L_W + L^D_MI", {"loss.gc": False, "loss.mi_centroids": "bank"}),
    "lw_mi": ("L_W + L_MI", {"loss.gc": False}),
    "full_d": ("L_W + L^D_MI + L^D_GC", {"loss.mi_centroids": "bank", "loss.gc_centroids": "bank"}),
    "full": ("L_W + L_MI + L_GC (full MCE)", {}),
    "lw_2ch": ("L_W, 2 ch", {"loss.channels": 2, "loss.mi": False, "loss.gc": False}),
    "full_2ch": ("L_W + L_MI + L_GC, 2 ch", {"loss.channels": 2}),
}
SAAI_ROWS = {  # SAAI's Tables 3-4 (every row is also evaluated with and without AIM)
    "baseline": ("baseline (global feature, L_id)", {"loss.parts": False, "loss.pd": False, "loss.cs": False}),
    "parts": ("+parts (SAFL)", {"loss.pd": False, "loss.cs": False}),
    "parts_pd": ("+parts +L_pd", {"loss.cs": False}),
    "parts_cs": ("+parts +L_cs", {"loss.pd": False}),
    "all": ("+parts +L_pd +L_cs (full SAAI)", {}),
}
PEA_ROWS = {  # our design's three terms (PEA's paper has no ablation we could read)
    "baseline": ("baseline (CE + triplet)", {"loss.intra": False, "loss.inter": False, "loss.cycle": False}),
    "intra": ("+intra", {"loss.inter": False, "loss.cycle": False}),
    "inter": ("+inter", {"loss.intra": False, "loss.cycle": False}),
    "cycle": ("+cycle", {"loss.intra": False, "loss.inter": False}),
    "intra_inter": ("+intra +inter", {"loss.cycle": False}),
    "all": ("+intra +inter +cycle (full PEA design)", {}),
}
PECA_ROWS = {  # PECA's Table 3, built up as the paper does (M6 = PECA)
    "m1": ("M1 (CE + triplet)", ablation_updates("M1")),
    "m2": ("M2 (CE + L_ins)", ablation_updates("M2")),
    "m3": ("M3 (+L_mod)", ablation_updates("M3")),
    "m4": ("M4 (M3 +GSL)", ablation_updates("M4")),
    "m5": ("M5 (M3 +ICAL)", ablation_updates("M5")),
    "m6": ("M6 (full PECA)", ablation_updates("M6")),
}
ROWS_BY_RECIPE = {"lba": LBA_ROWS, "mce": MCE_ROWS, "saai": SAAI_ROWS, "pea": PEA_ROWS, "peca": PECA_ROWS}
DEFAULT_ROWS_BY_RECIPE = {"lba": ("baseline", "ic", "ic_dt"), "mce": ("lw", "lw_mi", "full"),
                          "saai": ("baseline", "parts", "all"), "pea": ("baseline", "all"), "peca": ("m1", "m6")}
ROWS = LBA_ROWS  # the LbA demo's rows (kept under their old name)
DEFAULT_ROWS = DEFAULT_ROWS_BY_RECIPE["lba"]
# What a demo writes into --out; a folder holding anything else is the user's.
DEMO_ENTRIES = ("data", "results.md", "results.json", "correspondence.png")
ROW_FOLDER = re.compile(r"[A-Za-z0-9_]+_seed[0-9]+")


class DemoError(ValueError):
    """A demo argument or output folder the demo refuses; the message names it."""


def check_out_folder(out: str) -> None:
    """``out`` is new, empty or a previous demo's output; raises :class:`DemoError` otherwise."""
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise DemoError(f"--out: {out} exists and is not a folder")
    foreign = [name for name in sorted(os.listdir(out))
               if name not in DEMO_ENTRIES and not (ROW_FOLDER.fullmatch(name) and os.path.isdir(os.path.join(out, name)))]
    if foreign:
        raise DemoError(f"--out: {out} is not empty and not a demo folder (it holds {foreign[0]!r}, which the demo "
                        "does not write); name a new or empty folder")


def run_demo(out: str, rows=None, config: str = "lba_synth", overrides: Optional[List[str]] = None,
             updates: Optional[Dict[str, object]] = None, visualise: bool = True, seeds: Sequence[int] = (),
             log=print) -> Dict[str, object]:
    """Train and evaluate every row for every training seed (default: the config's seed)."""
    from .config import load_config
    from .data import load_trainset, resolve_data_root
    from .data.check import check_dataset
    from .engine.loop import Trainer
    from .evaluate import evaluate
    from .recipes import build_model
    from .visualize import visualize

    check_out_folder(out)
    start_all = time.time()
    base_updates = {"data.root": os.path.join(out, "data"), "train.eval_every": 0, "eval.final": True}
    base_updates.update(updates or {})
    cfg0 = load_config(config, overrides or [], updates=base_updates)
    table_rows = ROWS_BY_RECIPE[cfg0["recipe"]]
    rows = tuple(rows or DEFAULT_ROWS_BY_RECIPE[cfg0["recipe"]])
    unknown = [r for r in rows if r not in table_rows]
    if unknown:
        raise DemoError(f"rows: unknown {unknown} for recipe {cfg0['recipe']!r}; expected among {list(table_rows)}")
    visualise = visualise and cfg0["recipe"] == "lba"  # the figure draws CMAlign's correspondences
    seeds = list(seeds) or [cfg0["seed"]]
    torch.set_num_threads(cfg0["train"]["threads"] or torch.get_num_threads())
    setting = reproducible.state()  # the CPU kernels every row computes with
    log(reproducible.describe(setting))
    t = time.time()
    root = resolve_data_root(cfg0, generate=True, log=log)
    data_seconds = time.time() - t
    trainset = load_trainset("synth", root)
    log(check_dataset("synth", root, trainset, cfg0["eval"]["modes"]))  # once: every row reads the same data
    num_classes = trainset.num_classes
    runs: List[Dict[str, object]] = []
    full_model = None
    for seed in seeds:
        # the floor: the untrained network, initialised exactly as every row of this seed
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # with model.pretrained, the floor is the pretrained network before any fine-tuning
            untrained = build_model(cfg0, num_classes, log=lambda *_: None)
        t = time.time()
        floor = evaluate(untrained, root, cfg0)["summary"]
        floor_name = "pretrained network, not fine-tuned" if cfg0["model"]["pretrained"] else "untrained network"
        runs.append({"row": floor_name, "key": "untrained", "seed": seed, **floor,
                     "seconds": time.time() - t})
        log(f"[seed {seed}] {floor_name}: mAP {100 * floor['mAP']:.2f}")
        for key in rows:
            name, switches = table_rows[key]
            cfg = load_config(config, overrides or [], updates={**base_updates, **switches, "seed": seed})
            t = time.time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer = Trainer(cfg, out=os.path.join(out, f"{key}_seed{seed}"), quiet=False, check_data=False)
            try:
                result = trainer.fit()
            finally:
                trainer.close()
            seconds = time.time() - t
            summary = result["eval"]["summary"]
            shares = [h["epoch_start_share"] for h in result["history"] if "epoch_start_share" in h]
            runs.append({"row": name, "key": key, "seed": seed, **summary, "seconds": seconds,
                         "final_loss": result["history"][-1].get("loss"),
                         "eval_rows": result["eval"]["rows"],
                         # the epoch-start hook's share of each epoch (MCE's centroid refresh)
                         "epoch_start_share": float(np.mean(shares)) if shares else None})
            log(f"[seed {seed}] {name}: mAP {100 * summary['mAP']:.2f}  R1 {100 * summary['R1']:.2f}  "
                f"mINP {100 * summary['mINP']:.2f}  ({seconds:.0f}s)")
            if visualise and (full_model is None or (key == "ic_dt" and seed == seeds[0])):
                full_model = trainer.model
    figure = None
    if visualise and full_model is not None:
        figure = visualize(full_model, root, cfg0, os.path.join(out, "correspondence.png"), pairs=3, site=5)
    total = time.time() - start_all
    table = format_table(runs, cfg0, seeds, total, data_seconds, setting)
    with open(os.path.join(out, "results.md"), "wt") as handle:
        handle.write(table + "\n")
    with open(os.path.join(out, "results.json"), "wt") as handle:
        json.dump({"runs": runs, "seeds": seeds, "total_seconds": total, "data_seconds": data_seconds,
                   "reproducible": setting}, handle, indent=1, default=float)
    return {"runs": runs, "table": table, "figure": figure, "total_seconds": total}


def start_of(cfg) -> str:
    """Where the rows' backbone starts: a random initialisation, or a pretrained file."""
    path = cfg["model"].get("pretrained")
    return f"from the backbone pretrained in {os.path.dirname(path) or '.'}" if path else "from scratch"


def format_table(runs, cfg, seeds, total: float, data_seconds: float,
                 setting: Optional[Dict[str, object]] = None) -> str:
    """One line per row: mean (and std over training seeds when there are several), time per run;
    ``setting``: the :func:`training.reproducible.state` the rows ran with (said under the table)."""
    s = cfg["data"]["synth"]
    several = len(seeds) > 1
    lines = [
        f"Synthetic VI-ReID ({s['ids']} ids, {s['test_ids']} held out; IR query -> visible gallery, all-search "
        f"single-shot, mean of {cfg['eval']['trials']} gallery draws), {cfg['data']['height']}x{cfg['data']['width']}, "
        f"ResNet-{cfg['model']['depth']} width {cfg['model']['width']} {start_of(cfg)}, {cfg['train']['epochs']} epochs, "
        f"training seed{'s' if several else ''} {', '.join(map(str, seeds))} (same for every row), "
        f"{torch.get_num_threads()} thread(s)",
        "",
        "| row | mAP | R1 | mINP | time per run |",
        "|---|---|---|---|---|",
    ]
    keys = list(dict.fromkeys(r["key"] for r in runs))
    for key in keys:
        mine = [r for r in runs if r["key"] == key]

        def cell(metric):
            values = np.array([100 * r[metric] for r in mine])
            return f"{values.mean():.2f} ± {values.std():.2f}" if several else f"{values[0]:.2f}"

        seconds = np.mean([r["seconds"] for r in mine])
        lines.append(f"| {mine[0]['row']} | {cell('mAP')} | {cell('R1')} | {cell('mINP')} | {seconds:.0f} s |")
    lines.append("")
    if several:
        lines += paired_differences(runs, keys)
        lines.append("(mean ± std over training seeds)")
    else:
        lines.append("(one training seed: on this small set seed-to-seed differences reach several mAP points; "
                     "use --seeds 0,1,2 for mean ± std)")
    if setting is not None:
        lines.append(reproducible.describe(setting))
    lines.append(f"data generation {data_seconds:.0f} s; total {total:.0f} s")
    return "\n".join(lines)


def paired_differences(runs, keys) -> List[str]:
    """Per-seed differences of every trained row to the first trained row: mean ± std (and the
    number of seeds where the row is ahead), the seed-matched comparison the spread hides."""
    trained = [k for k in keys if k != "untrained"]
    if len(trained) < 2:
        return []
    first = trained[0]
    by_seed = {(r["key"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs if r["key"] == first})
    first_name = by_seed[(first, seeds[0])]["row"]
    lines = [f"| paired difference to {first_name} | Δ mAP | Δ R1 | seeds ahead |", "|---|---|---|---|"]
    for key in trained[1:]:
        common = [sd for sd in seeds if (key, sd) in by_seed]
        d_map = np.array([100 * (by_seed[(key, sd)]["mAP"] - by_seed[(first, sd)]["mAP"]) for sd in common])
        d_r1 = np.array([100 * (by_seed[(key, sd)]["R1"] - by_seed[(first, sd)]["R1"]) for sd in common])
        lines.append(f"| {by_seed[(key, common[0])]['row']} | {d_map.mean():+.2f} ± {d_map.std():.2f} | "
                     f"{d_r1.mean():+.2f} ± {d_r1.std():.2f} | {int((d_map > 0).sum())}/{len(common)} |")
    lines.append("")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    from .cli import one_line_failures, parser as cli_parser
    from .reproducible import add_argument as add_reproducible_flag
    from .data import DatasetError
    from .engine.checkpoint import CheckpointError
    from .pretrain import PretrainError, backbone_for_demo

    parser = cli_parser("demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="a new or empty folder, or an earlier demo's")
    parser.add_argument("--config", default="lba_synth", help="base config (default: lba_synth)")
    parser.add_argument("--rows", default=None,
                        help=f"comma-separated rows: LbA among {', '.join(LBA_ROWS)} (default "
                             f"{','.join(DEFAULT_ROWS)}); MCE among {', '.join(MCE_ROWS)} (default "
                             f"{','.join(DEFAULT_ROWS_BY_RECIPE['mce'])}); SAAI among {', '.join(SAAI_ROWS)}; "
                             f"PEA among {', '.join(PEA_ROWS)}; PECA among {', '.join(PECA_ROWS)}")
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the config's)")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated training seeds (same for every row); several give mean ± std")
    parser.add_argument("--data-seed", type=int, default=None, help="synthetic data seed")
    parser.add_argument("--no-figure", action="store_true")
    parser.add_argument("--pretrain", default=None, metavar="DIR",
                        help="start every row from the backbone pretrained on a separate synthetic set "
                             "(python -m training.pretrain --out DIR; trained there first unless cached)")
    add_reproducible_flag(parser)
    parser.add_argument("overrides", nargs="*", help="config overrides key=value for every row")
    args = parser.parse_intermixed_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else None
    known = {**LBA_ROWS, **MCE_ROWS, **SAAI_ROWS, **PEA_ROWS, **PECA_ROWS}
    unknown = [r for r in rows or () if r not in known]
    if unknown:
        parser.error(f"--rows: unknown {unknown}; expected among {list(known)}")
    updates: Dict[str, object] = {}
    if args.epochs is not None:
        updates["train.epochs"] = args.epochs
    if args.threads is not None:
        updates["train.threads"] = args.threads
    if args.data_seed is not None:
        updates["data.synth.seed"] = args.data_seed
    try:
        seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else []
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")

    def run_and_report() -> int:
        if args.pretrain:
            updates["model.pretrained"] = backbone_for_demo(
                args.pretrain, updates={"train.threads": args.threads} if args.threads else None)
        result = run_demo(args.out, rows, args.config, args.overrides, updates, visualise=not args.no_figure,
                          seeds=seeds)
        print()
        print(result["table"])
        if result["figure"]:
            print(f"correspondence figure: {result['figure']}")
        return 0

    return one_line_failures(run_and_report, (CheckpointError, DatasetError, DemoError, PretrainError))


if __name__ == "__main__":
    sys.exit(main())
