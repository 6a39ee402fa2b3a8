"""Correspondence visualisation in the style of LbA Figs. 1 and 4.

For a visible and an infrared image of the same person, draws (PNG, with PIL):

1. the strongest dense matches (RGB position -> its most probable IR position under
   LbA's matching probability, eqs. 1-2, at the chosen CMAlign site), kept inside the
   person (weighted by the RGB person mask, eqs. 5-7);
2. the person masks of both images as heat overlays;
3. the co-attention maps (eq. 9) of both images as heat overlays.

``python -m training.visualize --checkpoint run/final.pt [--data-root DIR] [--pid N] [--out fig.png]``
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from reid_kernels import reference

from .data import ImageCache, normalize


def _heat(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB 'jet'-like colours (blue -> green -> red)."""
    v = np.clip(values, 0, 1)[..., None]
    blue = np.array([0.1, 0.2, 0.9])
    green = np.array([0.1, 0.9, 0.2])
    red = np.array([0.95, 0.15, 0.1])
    low = blue * (1 - 2 * v) + green * (2 * v)
    high = green * (2 - 2 * v) + red * (2 * v - 1)
    return np.where(v < 0.5, low, high)


def _overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.55) -> Image.Image:
    size = image.size
    heat_img = Image.fromarray((_heat(heat) * 255).astype(np.uint8)).resize(size, Image.BILINEAR)
    return Image.blend(image.convert("RGB"), heat_img, alpha)


@torch.no_grad()
def correspondence_maps(model, x_rgb: torch.Tensor, x_ir: torch.Tensor, site: int = 5, beta: float = 50.0):
    """Masks, co-attention and RGB->IR probabilities for one pair at CMAlign site 4 or 5."""
    model = model.module if hasattr(model, "module") else model
    model.eval()
    f3_r, f4_r = model.feature_maps(x_rgb[None], "visible")
    f3_i, f4_i = model.feature_maps(x_ir[None], "infrared")
    f_rgb, f_ir = (f3_r, f3_i) if site == 4 else (f4_r, f4_i)
    feat = torch.cat([f_rgb, f_ir]).float()
    out = reference.cmalign(feat, torch.tensor([1, 0]), torch.tensor([1, 0]), beta, 0.3)
    mask = reference.person_mask(feat)
    prob = reference.matching_probability(f_rgb.float(), f_ir.float(), beta)[0]  # (n_rgb, n_ir)
    return {"mask_rgb": mask[0].numpy(), "mask_ir": mask[1].numpy(), "coatt_rgb": out.comask[0].numpy(),
            "coatt_ir": out.comask[1].numpy(), "prob": prob.numpy(), "grid": tuple(f_rgb.shape[-2:])}


def draw_correspondence(rgb: Image.Image, ir: Image.Image, maps: dict, top: int = 12, scale: int = 4,
                        title: str = "") -> Image.Image:
    """Compose the three panels into one image."""
    w, h = rgb.size[0] * scale, rgb.size[1] * scale
    rgb_big, ir_big = rgb.resize((w, h), Image.NEAREST), ir.resize((w, h), Image.NEAREST)
    gh, gw = maps["grid"]
    gap, header = 12, 22
    canvas = Image.new("RGB", (3 * (2 * w + gap) + 2 * gap, h + header), "white")
    draw = ImageDraw.Draw(canvas)

    def centre(index: int, x_offset: int) -> Tuple[float, float]:
        r, c = divmod(index, gw)
        return x_offset + (c + 0.5) * w / gw, header + (r + 0.5) * h / gh

    # panel 1: matches
    canvas.paste(rgb_big, (0, header))
    canvas.paste(ir_big, (w + gap, header))
    prob = maps["prob"]
    confidence = prob.max(1) * maps["mask_rgb"].reshape(-1)
    palette = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
               (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]
    for k, p in enumerate(np.argsort(-confidence)[:top]):
        q = int(prob[p].argmax())
        a, b = centre(int(p), 0), centre(q, w + gap)
        colour = palette[k % len(palette)]
        draw.line([a, b], fill=colour, width=2)
        for x, y in (a, b):
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], outline=colour, width=2)
    # panels 2 and 3: masks and co-attention
    x0 = 2 * w + gap + 2 * gap
    canvas.paste(_overlay(rgb_big, maps["mask_rgb"]), (x0, header))
    canvas.paste(_overlay(ir_big, maps["mask_ir"]), (x0 + w + gap, header))
    x1 = x0 + 2 * w + 2 * gap
    canvas.paste(_overlay(rgb_big, maps["coatt_rgb"]), (x1, header))
    canvas.paste(_overlay(ir_big, maps["coatt_ir"]), (x1 + w + gap, header))
    for x, label in ((0, f"top-{top} matches {title}"), (x0, "person masks M"), (x1, "co-attention A")):
        draw.text((x + 2, 4), label, fill="black")
    return canvas


def pick_pair(root: str, pid: Optional[int] = None, seed: int = 0) -> Tuple[str, str, int]:
    """A visible and an infrared image of one test identity of a SYSU-layout folder."""
    from .data.sysu import read_id_file

    rng = np.random.default_rng(seed)
    ids = [pid] if pid is not None else read_id_file(root, "test_id.txt")
    for candidate in rng.permutation(ids):
        def images(cams):
            found = []
            for cam in cams:
                folder = os.path.join(root, f"cam{cam}", f"{int(candidate):04d}")
                if os.path.isdir(folder):
                    found += [os.path.join(folder, f) for f in sorted(os.listdir(folder))]
            return found
        rgb, ir = images((1, 2, 4, 5)), images((3, 6))
        if rgb and ir:
            return rgb[int(rng.integers(len(rgb)))], ir[int(rng.integers(len(ir)))], int(candidate)
    from .data import DatasetError

    raise DatasetError(f"--pid: no test identity {'' if pid is None else f'{pid} '}with both visible and infrared "
                       f"images under {root}")


def visualize(model, root: str, cfg: dict, out_path: str, pid: Optional[int] = None, pairs: int = 3,
              site: int = 5, seed: int = 0) -> str:
    """Write a PNG with ``pairs`` rows of :func:`draw_correspondence`; returns its path."""
    height, width = cfg["data"]["height"], cfg["data"]["width"]
    cache = ImageCache(height, width, keep=False)
    rows: List[Image.Image] = []
    for k in range(pairs):
        rgb_path, ir_path, chosen = pick_pair(root, pid, seed + k)
        x_rgb, x_ir = cache.get(rgb_path), cache.get(ir_path)
        maps = correspondence_maps(model, normalize(x_rgb), normalize(x_ir), site, cfg["loss"]["beta"])
        to_pil = lambda t: Image.fromarray(t.permute(1, 2, 0).numpy())
        rows.append(draw_correspondence(to_pil(x_rgb), to_pil(x_ir), maps, title=f"(id {chosen}, site {site})"))
    canvas = Image.new("RGB", (rows[0].size[0], sum(r.size[1] for r in rows) + 6 * (len(rows) - 1)), "white")
    y = 0
    for row in rows:
        canvas.paste(row, (0, y))
        y += row.size[1] + 6
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    canvas.save(out_path)
    return out_path


def main(argv: Optional[List[str]] = None) -> int:
    from .cli import one_line_failures, parser as cli_parser

    parser = cli_parser("visualize", description="Draw LbA-style correspondences of a trained model.")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--pid", type=int, default=None, help="test identity (default: random ones)")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--site", type=int, default=5, choices=(4, 5))
    parser.add_argument("--out", default="correspondence.png")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error(f"--pairs: expected at least 1 pair to draw, got {args.pairs}")
    return one_line_failures(lambda: _draw_and_report(args))


def _draw_and_report(args) -> int:
    print(f"wrote {_draw(args)}")
    return 0


def _draw(args) -> str:
    from .config import flatten, load_config
    from .data import resolve_data_root
    from .engine.checkpoint import load_model_from_checkpoint, read_checkpoint

    state = read_checkpoint(args.checkpoint)
    cfg = load_config(None, updates=flatten(state["config"]))
    if args.data_root:
        cfg["data"]["root"] = args.data_root
    model = load_model_from_checkpoint(state, cfg)
    return visualize(model, resolve_data_root(cfg, generate=False), cfg, args.out, args.pid, args.pairs, args.site)


if __name__ == "__main__":
    sys.exit(main())
