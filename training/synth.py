"""Synthetic visible-infrared person re-identification data in the SYSU-MM01 on-disk layout.

``python -m training.synth --out DIR --ids N --seed S`` writes::

    DIR/cam1..cam6/<4-digit id>/<4-digit image>.jpg
    DIR/exp/train_id.txt, val_id.txt, test_id.txt     (comma-separated ids, as SYSU-MM01)

so the real SYSU-MM01 loader and evaluation protocol are the ones exercised.

People are drawn procedurally: head, hair, optional hat, torso and arms, legs or skirt,
shoes, optional bag; each garment has a colour pair and a texture (plain, stripes,
checks, dots, split, logo). Each image jitters pose (arm and leg swing), scale and
position (misaligned crops), and adds background clutter and occasional occluders.

Cameras 1, 2, 4, 5 are visible (colour, with a per-camera colour cast); cameras 3 and 6
are "infrared": colour is lost and the intensity of a surface follows a per-camera
mapping of a hidden per-garment *material* value mixed with a per-camera projection of
its colour. Colour alone therefore cannot be matched across modalities; texture, shape
and layout carry the identity -- the discrepancy VI-ReID methods exist to bridge.
Everything is a deterministic function of ``--seed``.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image, ImageFilter

RGB_CAMS = (1, 2, 4, 5)
IR_CAMS = (3, 6)
TEXTURES = ("plain", "hstripes", "vstripes", "checks", "dots", "split", "logo")
# A small palette, so that identities share colours and only combinations identify them.
PALETTE = np.array(
    [
        [0.85, 0.10, 0.10], [0.10, 0.25, 0.80], [0.10, 0.60, 0.20], [0.95, 0.85, 0.15],
        [0.95, 0.95, 0.95], [0.08, 0.08, 0.08], [0.50, 0.50, 0.52], [0.55, 0.30, 0.10],
        [0.90, 0.45, 0.70], [0.45, 0.15, 0.55], [0.95, 0.55, 0.10], [0.20, 0.70, 0.75],
    ],
    dtype=np.float32,
)
SKIN = np.array([[0.96, 0.80, 0.69], [0.87, 0.67, 0.52], [0.62, 0.44, 0.30], [0.40, 0.27, 0.18]], np.float32)
HAIR = np.array([[0.05, 0.04, 0.03], [0.35, 0.22, 0.10], [0.75, 0.60, 0.30], [0.55, 0.55, 0.55]], np.float32)


@dataclass
class Garment:
    """One piece of clothing: two colours, a texture, and its hidden infrared material values."""

    colour_a: np.ndarray
    colour_b: np.ndarray
    texture: str
    period: float  # texture period in person-height units
    material_a: float
    material_b: float


@dataclass
class Identity:
    """Everything that stays fixed for a person across images and cameras."""

    pid: int
    height: float  # fraction of the image height at scale 1
    build: float  # torso width / person height
    leg_ratio: float
    skin: np.ndarray
    hair: np.ndarray
    long_hair: bool
    hat: Optional[Garment]
    top: Garment
    long_sleeves: bool
    bottom: Garment
    skirt: bool
    shoes: np.ndarray
    bag: Optional[Garment]
    bag_side: int  # -1 left, +1 right
    skin_material: float
    hair_material: float
    shoe_material: float


@dataclass
class Camera:
    """Per-camera rendering: colour cast and brightness (visible) or intensity mapping (infrared)."""

    cam: int
    infrared: bool
    cast: np.ndarray  # (3,) multiplicative colour cast (visible)
    brightness: float
    colour_weights: np.ndarray  # (3,) projection of colour onto intensity (infrared)
    material_weight: float  # share of the hidden material in the infrared intensity
    gamma: float
    invert: bool  # infrared: a camera whose colour projection is reversed


def _garment(rng: np.random.Generator, palette_size: int) -> Garment:
    a, b = rng.choice(palette_size, 2, replace=False)
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    return Garment(PALETTE[a], PALETTE[b], texture, float(rng.uniform(0.04, 0.10)),
                   float(rng.uniform(0, 1)), float(rng.uniform(0, 1)))


def make_identity(pid: int, rng: np.random.Generator, palette_size: int = len(PALETTE)) -> Identity:
    """Draw one person's fixed attributes."""
    return Identity(
        pid=pid,
        height=float(rng.uniform(0.78, 0.95)),
        build=float(rng.uniform(0.22, 0.34)),
        leg_ratio=float(rng.uniform(0.42, 0.52)),
        skin=SKIN[rng.integers(len(SKIN))],
        hair=HAIR[rng.integers(len(HAIR))],
        long_hair=bool(rng.random() < 0.35),
        hat=_garment(rng, palette_size) if rng.random() < 0.2 else None,
        top=_garment(rng, palette_size),
        long_sleeves=bool(rng.random() < 0.5),
        bottom=_garment(rng, palette_size),
        skirt=bool(rng.random() < 0.2),
        shoes=PALETTE[rng.integers(palette_size)],
        bag=_garment(rng, palette_size) if rng.random() < 0.4 else None,
        bag_side=int(rng.choice([-1, 1])),
        skin_material=float(rng.uniform(0.6, 0.9)),
        hair_material=float(rng.uniform(0.0, 0.3)),
        shoe_material=float(rng.uniform(0, 1)),
    )


def make_camera(cam: int, rng: np.random.Generator, ir_material: float = 0.35,
                ir_invert: bool = False) -> Camera:
    infrared = cam in IR_CAMS
    weights = rng.dirichlet(np.ones(3)).astype(np.float32)
    return Camera(
        cam=cam,
        infrared=infrared,
        cast=rng.uniform(0.75, 1.15, 3).astype(np.float32),
        brightness=float(rng.uniform(0.75, 1.1)),
        colour_weights=weights,
        material_weight=float(np.clip(ir_material + rng.uniform(-0.1, 0.1), 0, 1)),
        gamma=float(rng.uniform(0.7, 1.4)),
        invert=bool(ir_invert and cam == IR_CAMS[1]),
    )


# ---------------------------------------------------------------------------------------
# Rendering: every part is a layer (coverage mask in [0, 1]) painted over the canvas with
# a per-pixel "surface" value: an RGB colour (visible) or an intensity (infrared).
# ---------------------------------------------------------------------------------------
class Canvas:
    def __init__(self, height: int, width: int, infrared: bool):
        self.h, self.w = height, width
        self.yy, self.xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
        self.channels = 1 if infrared else 3
        self.image = np.zeros((height, width, self.channels), np.float32)

    def paint(self, mask: np.ndarray, surface: np.ndarray) -> None:
        m = np.clip(mask, 0, 1)[..., None]
        self.image = self.image * (1 - m) + surface * m


def _soft(d: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from a signed distance in pixels (negative = inside)."""
    return np.clip(0.5 - d, 0, 1)


def ellipse(c: Canvas, cx, cy, rx, ry) -> np.ndarray:
    r = np.sqrt(((c.xx - cx) / max(rx, 1e-3)) ** 2 + ((c.yy - cy) / max(ry, 1e-3)) ** 2)
    return _soft((r - 1) * min(rx, ry))


def rect(c: Canvas, x0, y0, x1, y1) -> np.ndarray:
    dx = np.maximum(x0 - c.xx, c.xx - x1)
    dy = np.maximum(y0 - c.yy, c.yy - y1)
    return _soft(np.maximum(dx, dy))


def limb(c: Canvas, x0, y0, x1, y1, half_width) -> np.ndarray:
    """A capsule from (x0, y0) to (x1, y1)."""
    px, py = c.xx - x0, c.yy - y0
    vx, vy = x1 - x0, y1 - y0
    t = np.clip((px * vx + py * vy) / max(vx * vx + vy * vy, 1e-6), 0, 1)
    d = np.sqrt((px - t * vx) ** 2 + (py - t * vy) ** 2)
    return _soft(d - half_width)


def trapezoid(c: Canvas, cx, y0, y1, half_top, half_bottom) -> np.ndarray:
    t = np.clip((c.yy - y0) / max(y1 - y0, 1e-3), 0, 1)
    half = half_top + t * (half_bottom - half_top)
    return rect(c, -1e9, y0, 1e9, y1) * _soft(np.abs(c.xx - cx) - half)


def texture_pattern(c: Canvas, garment: Garment, origin_x: float, origin_y: float, unit: float,
                    region: Sequence[float]) -> np.ndarray:
    """0/1 map choosing colour a or b at every pixel, in person-relative coordinates."""
    u = (c.xx - origin_x) / unit
    v = (c.yy - origin_y) / unit
    p = garment.period
    kind = garment.texture
    if kind == "plain":
        return np.zeros_like(u)
    if kind == "hstripes":
        return (np.floor(v / p) % 2).astype(np.float32)
    if kind == "vstripes":
        return (np.floor(u / p) % 2).astype(np.float32)
    if kind == "checks":
        return ((np.floor(u / p) + np.floor(v / p)) % 2).astype(np.float32)
    if kind == "dots":
        fu = (u / p) % 2 - 1
        fv = (v / p) % 2 - 1
        return ((fu * fu + fv * fv) < 0.35).astype(np.float32)
    y0, y1 = region
    if kind == "split":
        return (v > (y0 + y1) / 2).astype(np.float32)
    # logo: a block in the middle of the region
    mid = (y0 + y1) / 2
    return ((np.abs(u) < 0.06) & (np.abs(v - mid) < 0.05)).astype(np.float32)


class Surfaces:
    """Maps colours and materials to what a camera records."""

    def __init__(self, camera: Camera, rng: np.random.Generator):
        self.camera = camera
        self.rng = rng
        self.light = float(rng.uniform(0.8, 1.15))  # per-image lighting

    def solid(self, colour: np.ndarray, material: float) -> np.ndarray:
        cam = self.camera
        if not cam.infrared:
            return np.clip(colour * cam.cast * cam.brightness * self.light, 0, 1).astype(np.float32)
        projected = float(np.dot(cam.colour_weights, colour))
        if cam.invert:
            projected = 1.0 - projected
        value = cam.material_weight * material + (1 - cam.material_weight) * projected
        value = np.clip(value, 0, 1) ** cam.gamma * self.light
        return np.array([value], np.float32)

    def garment(self, g: Garment, pattern: np.ndarray) -> np.ndarray:
        a = self.solid(g.colour_a, g.material_a)
        b = self.solid(g.colour_b, g.material_b)
        return a[None, None, :] * (1 - pattern[..., None]) + b[None, None, :] * pattern[..., None]


def _background(c: Canvas, s: Surfaces, rng: np.random.Generator, clutter: int) -> None:
    base = rng.uniform(0.15, 0.85, 3).astype(np.float32)
    c.paint(np.ones((c.h, c.w), np.float32), s.solid(base, float(rng.uniform(0, 0.6)))[None, None, :])
    # A floor/wall split and a few random objects.
    floor = rect(c, -1, c.h * rng.uniform(0.55, 0.9), c.w + 1, c.h + 1)
    c.paint(floor, s.solid(rng.uniform(0.1, 0.9, 3).astype(np.float32), float(rng.uniform(0, 0.6)))[None, None, :])
    for _ in range(rng.integers(0, clutter + 1)):
        x0, y0 = rng.uniform(-0.2, 1.0) * c.w, rng.uniform(-0.2, 1.0) * c.h
        w, h = rng.uniform(0.1, 0.5) * c.w, rng.uniform(0.05, 0.4) * c.h
        colour = PALETTE[rng.integers(len(PALETTE))] * rng.uniform(0.5, 1.0)
        c.paint(rect(c, x0, y0, x0 + w, y0 + h) * 0.9, s.solid(colour, float(rng.uniform(0, 1)))[None, None, :])


def _person(c: Canvas, s: Surfaces, ident: Identity, rng: np.random.Generator, jitter: float) -> None:
    scale = ident.height * rng.uniform(1 - 0.12 * jitter, 1 + 0.06 * jitter)
    H = c.h * scale  # person height in pixels
    cx = c.w / 2 + rng.uniform(-0.16, 0.16) * jitter * c.w
    top = (c.h - H) / 2 + rng.uniform(-0.08, 0.08) * jitter * c.h
    facing = 1 if rng.random() < 0.5 else -1  # mirrored asymmetric parts (bag side)
    swing = rng.uniform(-1, 1) * jitter  # walking phase

    head_r = 0.065 * H
    head_cy = top + head_r * 1.1
    neck_y = top + 0.14 * H
    hip_y = top + (1 - ident.leg_ratio) * H
    foot_y = top + 0.97 * H
    half_torso = ident.build * H / 2

    # bag behind the body when on the far side
    bag_x = cx + facing * ident.bag_side * (half_torso + 0.03 * H)
    if ident.bag is not None:
        bag = rect(c, bag_x - 0.06 * H, neck_y + 0.12 * H, bag_x + 0.06 * H, hip_y + 0.02 * H)
        pattern = texture_pattern(c, ident.bag, bag_x, neck_y, H, (0.1, 0.3))
        c.paint(bag, s.garment(ident.bag, pattern))

    # legs / skirt
    leg_w = 0.055 * H
    bottom_pattern = texture_pattern(c, ident.bottom, cx, top, H, (1 - ident.leg_ratio, 0.97))
    bottom_surface = s.garment(ident.bottom, bottom_pattern)
    skin = s.solid(ident.skin, ident.skin_material)[None, None, :]
    for side in (-1, 1):
        foot_x = cx + side * (0.07 * H) + side * swing * 0.06 * H
        leg = limb(c, cx + side * 0.05 * H, hip_y, foot_x, foot_y - 0.03 * H, leg_w)
        c.paint(leg, skin if ident.skirt else bottom_surface)
        shoe = ellipse(c, foot_x + facing * 0.02 * H, foot_y - 0.01 * H, 0.05 * H, 0.025 * H)
        c.paint(shoe, s.solid(ident.shoes, ident.shoe_material)[None, None, :])
    if ident.skirt:
        skirt = trapezoid(c, cx, hip_y - 0.02 * H, hip_y + 0.22 * H, half_torso * 0.9, half_torso * 1.4)
        c.paint(skirt, bottom_surface)
    else:
        c.paint(rect(c, cx - half_torso * 0.85, hip_y - 0.02 * H, cx + half_torso * 0.85, hip_y + 0.05 * H),
                bottom_surface)

    # torso and arms
    top_pattern = texture_pattern(c, ident.top, cx, top, H, (0.14, 1 - ident.leg_ratio))
    top_surface = s.garment(ident.top, top_pattern)
    torso = trapezoid(c, cx, neck_y, hip_y + 0.02 * H, half_torso, half_torso * 0.85)
    c.paint(torso, top_surface)
    for side in (-1, 1):
        shoulder_x = cx + side * half_torso * 0.95
        hand_x = shoulder_x + side * 0.03 * H - side * swing * 0.05 * H * side
        hand_y = hip_y + 0.03 * H
        arm = limb(c, shoulder_x, neck_y + 0.03 * H, hand_x, hand_y, 0.035 * H)
        c.paint(arm, top_surface if ident.long_sleeves else skin)
        sleeve = limb(c, shoulder_x, neck_y + 0.03 * H, shoulder_x + (hand_x - shoulder_x) * 0.35,
                      neck_y + 0.03 * H + (hand_y - neck_y) * 0.35, 0.04 * H)
        c.paint(sleeve, top_surface)
        c.paint(ellipse(c, hand_x, hand_y + 0.01 * H, 0.022 * H, 0.025 * H), skin)

    # head, hair, hat
    hair = s.solid(ident.hair, ident.hair_material)[None, None, :]
    if ident.long_hair:
        c.paint(rect(c, cx - head_r * 1.1, head_cy, cx + head_r * 1.1, neck_y + 0.08 * H), hair)
    c.paint(ellipse(c, cx, head_cy, head_r * 0.85, head_r), skin)
    c.paint(ellipse(c, cx, head_cy - head_r * 0.45, head_r * 0.9, head_r * 0.6), hair)
    if ident.hat is not None:
        c.paint(rect(c, cx - head_r, head_cy - head_r * 1.2, cx + head_r, head_cy - head_r * 0.3),
                s.solid(ident.hat.colour_a, ident.hat.material_a)[None, None, :])


def _occluder(c: Canvas, s: Surfaces, rng: np.random.Generator) -> None:
    """A passer-by object or pole covering part of the person."""
    colour = PALETTE[rng.integers(len(PALETTE))] * rng.uniform(0.4, 1.0)
    if rng.random() < 0.5:  # a low object in front of the legs
        y0 = c.h * rng.uniform(0.6, 0.8)
        mask = rect(c, -1, y0, c.w + 1, c.h + 1)
    else:  # a vertical pole or person edge
        x0 = c.w * rng.uniform(-0.1, 0.8)
        mask = rect(c, x0, -1, x0 + c.w * rng.uniform(0.15, 0.3), c.h + 1)
    c.paint(mask, s.solid(colour.astype(np.float32), float(rng.uniform(0, 1)))[None, None, :])


def render(ident: Identity, camera: Camera, rng: np.random.Generator, height: int, width: int,
           supersample: int = 1, jitter: float = 1.0, occlusion: float = 0.25, clutter: int = 4,
           noise: float = 0.03) -> Image.Image:
    """One image of ``ident`` seen by ``camera`` (PIL RGB image; infrared is grey in 3 channels)."""
    c = Canvas(height * supersample, width * supersample, camera.infrared)
    s = Surfaces(camera, rng)
    _background(c, s, rng, clutter)
    _person(c, s, ident, rng, jitter)
    if rng.random() < occlusion:
        _occluder(c, s, rng)
    image = c.image
    image = image + rng.normal(0, noise, image.shape).astype(np.float32)
    array = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    if camera.infrared:
        array = np.repeat(array, 3, axis=2)
    picture = Image.fromarray(array, "RGB")
    if picture.size != (width, height):
        picture = picture.resize((width, height), Image.LANCZOS)
    if camera.infrared:  # infrared sensors are blurrier
        picture = picture.filter(ImageFilter.GaussianBlur(0.6))
    return picture


# ---------------------------------------------------------------------------------------
# Dataset layout
# ---------------------------------------------------------------------------------------
@dataclass
class SynthConfig:
    ids: int = 150
    test_ids: int = 48
    val_ids: int = 0
    seed: int = 0
    height: int = 64
    width: int = 32
    images_per_cam: int = 4
    jitter: float = 0.8
    occlusion: float = 0.15
    clutter: int = 3
    noise: float = 0.03
    palette: int = len(PALETTE)
    ir_material: float = 0.35
    ir_invert: bool = False
    quality: int = 92


def _camera_visits(rng: np.random.Generator) -> Dict[int, int]:
    """Which cameras see an identity and how many images each takes: >= 2 visible, >= 1 IR."""
    rgb = rng.choice(RGB_CAMS, int(rng.integers(2, 5)), replace=False)
    ir = rng.choice(IR_CAMS, int(rng.integers(1, 3)), replace=False)
    return {int(c): 0 for c in list(rgb) + list(ir)}


def generate(out: str, cfg: SynthConfig, progress: bool = False) -> Dict[str, int]:
    """Write a synthetic dataset to ``out``; returns counts of written images per modality."""
    if cfg.ids < 4 or cfg.test_ids < 2 or cfg.test_ids + cfg.val_ids > cfg.ids - 2:
        raise ValueError(f"ids/test_ids/val_ids: need ids >= 4, test_ids >= 2 and at least 2 training ids, "
                         f"got ids={cfg.ids}, test_ids={cfg.test_ids}, val_ids={cfg.val_ids}")
    if not 1 <= cfg.palette <= len(PALETTE):
        raise ValueError(f"palette: expected 2..{len(PALETTE)}, got {cfg.palette}")
    root = np.random.SeedSequence(cfg.seed)
    world_seed, *id_seeds = root.spawn(cfg.ids + 1)
    world = np.random.default_rng(world_seed)
    cameras = {cam: make_camera(cam, world, cfg.ir_material, cfg.ir_invert) for cam in RGB_CAMS + IR_CAMS}
    order = world.permutation(np.arange(1, cfg.ids + 1))
    test = sorted(int(i) for i in order[: cfg.test_ids])
    val = sorted(int(i) for i in order[cfg.test_ids: cfg.test_ids + cfg.val_ids])
    train = sorted(int(i) for i in order[cfg.test_ids + cfg.val_ids:])

    os.makedirs(os.path.join(out, "exp"), exist_ok=True)
    for name, ids in (("train_id.txt", train), ("val_id.txt", val), ("test_id.txt", test)):
        with open(os.path.join(out, "exp", name), "wt") as handle:
            handle.write(",".join(str(i) for i in ids) + "\n")
    counts = {"rgb": 0, "ir": 0}
    start = time.time()
    for pid in range(1, cfg.ids + 1):
        rng = np.random.default_rng(id_seeds[pid - 1])  # per identity: order-independent
        ident = make_identity(pid, rng, cfg.palette)
        for cam in sorted(_camera_visits(rng)):
            folder = os.path.join(out, f"cam{cam}", f"{pid:04d}")
            os.makedirs(folder, exist_ok=True)
            n = max(1, cfg.images_per_cam + int(rng.integers(-1, 2)))
            for k in range(1, n + 1):
                image = render(ident, cameras[cam], rng, cfg.height, cfg.width, jitter=cfg.jitter,
                               occlusion=cfg.occlusion, clutter=cfg.clutter, noise=cfg.noise)
                image.save(os.path.join(folder, f"{k:04d}.jpg"), quality=cfg.quality)
                counts["ir" if cam in IR_CAMS else "rgb"] += 1
        if progress and pid % 50 == 0:
            print(f"  {pid}/{cfg.ids} identities ({time.time() - start:.1f}s)", file=sys.stderr)
    for cam in RGB_CAMS + IR_CAMS:  # every camera folder exists, as in SYSU-MM01
        os.makedirs(os.path.join(out, f"cam{cam}"), exist_ok=True)
    return counts


def main(argv: Optional[List[str]] = None) -> int:
    from .cli import parser as cli_parser

    parser = cli_parser("synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (SYSU-MM01 layout)")
    defaults = SynthConfig()
    parser.add_argument("--ids", type=int, default=defaults.ids, help="number of identities")
    parser.add_argument("--test-ids", type=int, default=None,
                        help=f"identities held out for testing (default: a third of --ids, {defaults.test_ids} "
                             f"of the default {defaults.ids})")
    parser.add_argument("--val-ids", type=int, default=defaults.val_ids, help="identities listed in val_id.txt")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--height", type=int, default=defaults.height)
    parser.add_argument("--width", type=int, default=defaults.width)
    parser.add_argument("--images-per-cam", type=int, default=defaults.images_per_cam,
                        help="mean images per identity and camera (+-1)")
    parser.add_argument("--jitter", type=float, default=defaults.jitter, help="pose/scale/position jitter (0..1+)")
    parser.add_argument("--occlusion", type=float, default=defaults.occlusion, help="probability of an occluder")
    parser.add_argument("--clutter", type=int, default=defaults.clutter, help="max background objects")
    parser.add_argument("--noise", type=float, default=defaults.noise, help="pixel noise std")
    parser.add_argument("--palette", type=int, default=defaults.palette, help="number of clothing colours")
    parser.add_argument("--ir-material", type=float, default=defaults.ir_material,
                        help="share of the hidden material (vs the colour projection) in infrared intensity")
    parser.add_argument("--ir-invert", action="store_true", help="camera 6 reverses its colour projection (harder)")
    args = parser.parse_args(argv)
    if args.test_ids is None:  # a default that fits any --ids: about a third, at least 2, leaving 2 to train
        args.test_ids = max(2, min(round(args.ids * defaults.test_ids / defaults.ids), args.ids - 2))
    if args.height < 16 or args.width < 8:
        parser.error(f"--height/--width: expected at least 16x8 pixels, got {args.height}x{args.width}")
    if args.ids < 4 or args.test_ids < 2 or args.test_ids + args.val_ids > args.ids - 2:
        parser.error(f"--ids/--test-ids/--val-ids: need ids >= 4, test ids >= 2 and at least 2 training ids, "
                     f"got {args.ids}/{args.test_ids}/{args.val_ids}")
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        parser.error(f"--out: {args.out} exists and is not empty; name a new or empty folder")
    cfg = SynthConfig(ids=args.ids, test_ids=args.test_ids, val_ids=args.val_ids, seed=args.seed,
                      height=args.height, width=args.width, images_per_cam=args.images_per_cam,
                      jitter=args.jitter, occlusion=args.occlusion, clutter=args.clutter, noise=args.noise,
                      palette=args.palette, ir_material=args.ir_material, ir_invert=args.ir_invert)
    start = time.time()
    counts = generate(args.out, cfg, progress=True)
    print(f"wrote {counts['rgb']} visible + {counts['ir']} infrared images of {cfg.ids} identities "
          f"to {args.out} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
