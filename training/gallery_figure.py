"""The ranked-results picture of ``training.search``: one row per query -- the query, then its
top-k, each framed green when its person id matches the query's, red when it does not, grey when
either id is unknown (torchreid's convention) -- drawn with PIL like :mod:`training.visualize`."""
from __future__ import annotations

import os
from typing import Dict, List

from PIL import Image, ImageDraw

from .engine.durable import atomic_write

FRAME = {True: (40, 170, 60), False: (215, 40, 40), None: (150, 150, 150)}
QUERY_FRAME = (30, 90, 200)


def _thumbnail(path: str, height: int) -> Image.Image:
    from .data import load_image

    image = load_image(path)
    width = max(1, round(image.size[0] * height / image.size[1]))
    return image.resize((width, height), Image.BILINEAR)


def _framed(image: Image.Image, colour, border: int) -> Image.Image:
    out = Image.new("RGB", (image.size[0] + 2 * border, image.size[1] + 2 * border), colour)
    out.paste(image, (border, border))
    return out


def draw_rankings(results: List[Dict[str, object]], out_path: str, height: int = 128, border: int = 4,
                  gap: int = 8, caption: int = 30) -> str:
    """Write the PNG of ``results`` (training.search's JSON ``queries`` list) to ``out_path``."""
    rows = []
    for result in results:
        tiles = [(_framed(_thumbnail(result["query"], height), QUERY_FRAME, border),
                  ["query", f"{result['modality'][:3]}" + ("" if result["person_id"] < 0
                                                          else f" id {result['person_id']}")])]
        for r in result["results"]:
            label = [f"#{r['rank']} d={r['distance']:.3f}", f"cam {r['camera']} {r['modality'][:3]}"
                     + ("" if r["person_id"] < 0 else f" id {r['person_id']}")]
            tiles.append((_framed(_thumbnail(r["path"], height), FRAME[r["match"]], border), label))
        width = sum(max(t.size[0], 84) for t, _ in tiles) + gap * (len(tiles) + 2)
        row = Image.new("RGB", (width, height + 2 * border + caption), "white")
        draw = ImageDraw.Draw(row)
        x = gap
        for k, (tile, label) in enumerate(tiles):
            row.paste(tile, (x, 0))
            for line, text in enumerate(label):
                draw.text((x, height + 2 * border + 2 + 12 * line), text, fill="black")
            x += max(tile.size[0], 84) + gap * (2 if k == 0 else 1)  # a wider gap after the query
        rows.append(row)
    canvas = Image.new("RGB", (max(r.size[0] for r in rows), sum(r.size[1] for r in rows) + gap * (len(rows) - 1)),
                       "white")
    y = 0
    for row in rows:
        canvas.paste(row, (0, y))
        y += row.size[1] + gap
    directory = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(directory, exist_ok=True)
    atomic_write(out_path, lambda tmp: canvas.save(tmp, format="PNG"))
    return out_path
