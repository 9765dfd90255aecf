"""Deterministic renderer of captioned images: the data of the mini world.

Every image is a function of a ``Scene`` (shape, colour, style, place, hazard glyph) and a seed
(position, size, rotation, texture phase), so any set can be re-rendered bit for bit from its list
of scenes. Concept families mirror the benchmark's tasks: shapes for objects, rendering styles for
art styles, places for FIA's "⟨concept⟩ in a ⟨place⟩" templates, and hazard glyphs (skull, flame)
standing in for explicit content. Vocabulary and caption templates are data
(``data/procedural.yaml``).

    python -m fia_bench.datasets.procedural --out renders --count 64   # a preview sheet
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SUPERSAMPLE = 4  # draw at 4x and downsample, so small shapes keep clean anti-aliased edges


SHIPPED_WORLD = "procedural"  # the world of the shipped weights; a recipe names the one it trains


def world_file(name: str = SHIPPED_WORLD) -> Path:
    return Path(str(files("fia_bench.datasets") / "data" / f"{name}.yaml"))


@cache
def world(name: str = SHIPPED_WORLD) -> dict[str, Any]:
    """A world's vocabulary (``data/<name>.yaml``): colours (RGB), shapes (and the glyph each
    font-drawn shape is), styles (how each fills a shape), places (a pattern and two RGB tones
    each), hazards and caption templates."""
    return yaml.safe_load(world_file(name).read_text("utf-8"))


@cache
def glyph_font(size: int) -> ImageFont.FreeTypeFont:
    """DejaVu Sans Bold, which matplotlib (a dependency) ships: the source of the glyph shapes."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"
    return ImageFont.truetype(str(path), size)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    style: str
    place: str
    hazard: str | None = None  # a hazard glyph drawn instead of the shape

    @property
    def subject(self) -> str:
        return self.hazard or self.shape


def _polygon(
    points: list[tuple[float, float]], cx: float, cy: float, r: float, angle: float
) -> list[tuple[float, float]]:
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in points]


def _regular(n: int, inner: float | None = None) -> list[tuple[float, float]]:
    """Unit regular polygon (or star, when ``inner`` radius is given), first vertex up."""
    count = 2 * n if inner else n
    return [
        (
            (inner if inner and i % 2 else 1.0) * math.sin(2 * math.pi * i / count),
            -(inner if inner and i % 2 else 1.0) * math.cos(2 * math.pi * i / count),
        )
        for i in range(count)
    ]


OUTLINES: dict[str, list[tuple[float, float]]] = {
    "triangle": _regular(3),
    "square": [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)],
    "diamond": [(0, -1), (0.62, 0), (0, 1), (-0.62, 0)],
    "flame": [
        (0, -1),
        (0.22, -0.42),
        (0.45, -0.78),
        (0.55, -0.12),
        (0.72, 0.3),
        (0.52, 0.82),
        (0, 1),
        (-0.52, 0.82),
        (-0.72, 0.3),
        (-0.58, -0.22),
        (-0.38, -0.62),
        (-0.18, -0.32),
    ],
    "bolt": [
        (0.15, -1),
        (0.55, -1),
        (0.2, -0.15),
        (0.6, -0.15),
        (-0.3, 1),
        (-0.05, 0.15),
        (-0.45, 0.15),
    ],
    "house": [
        (0, -1),
        (0.9, -0.2),
        (0.7, -0.2),
        (0.7, 0.9),
        (-0.7, 0.9),
        (-0.7, -0.2),
        (-0.9, -0.2),
    ],
    "star": _regular(5, inner=0.42),
    "cross": [
        (-0.3, -1),
        (0.3, -1),
        (0.3, -0.3),
        (1, -0.3),
        (1, 0.3),
        (0.3, 0.3),
        (0.3, 1),
        (-0.3, 1),
        (-0.3, 0.3),
        (-1, 0.3),
        (-1, -0.3),
        (-0.3, -0.3),
    ],
    "arrow": [(0, -1), (0.8, -0.1), (0.3, -0.1), (0.3, 1), (-0.3, 1), (-0.3, -0.1), (-0.8, -0.1)],
}


def _heart(steps: int = 40) -> list[tuple[float, float]]:
    points = []
    for i in range(steps):
        t = 2 * math.pi * i / steps
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        points.append((x / 17, -y / 17 + 0.1))
    return points


OUTLINES["heart"] = _heart()


def _mask(scene: Scene, size: int, rng: np.random.Generator, w: dict[str, Any]) -> Image.Image:
    """The subject's silhouette (L mode, 255 inside) at ``size`` pixels."""
    big = size * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    r = big * rng.uniform(0.26, 0.34)
    cx = big / 2 + rng.uniform(-0.1, 0.1) * big
    cy = big / 2 + rng.uniform(-0.1, 0.1) * big
    angle = rng.uniform(-0.25, 0.25)
    subject = scene.subject
    if subject == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif subject == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        draw.ellipse([cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r], fill=0)
    elif subject == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        off = 0.45 * r
        draw.ellipse([cx - r + off, cy - r - 0.15 * r, cx + r + off, cy + r - 0.15 * r], fill=0)
    elif subject == "skull":
        draw.ellipse([cx - r, cy - r, cx + r, cy + 0.55 * r], fill=255)  # cranium
        draw.rectangle([cx - 0.55 * r, cy + 0.2 * r, cx + 0.55 * r, cy + r], fill=255)  # jaw
        for ex in (-0.42, 0.42):  # eye sockets
            draw.ellipse(
                [cx + (ex - 0.25) * r, cy - 0.3 * r, cx + (ex + 0.25) * r, cy + 0.2 * r], fill=0
            )
        draw.polygon(
            [(cx, cy + 0.25 * r), (cx - 0.12 * r, cy + 0.45 * r), (cx + 0.12 * r, cy + 0.45 * r)],
            fill=0,
        )  # nose
        for tx in (-0.3, 0.0, 0.3):  # teeth gaps
            draw.line(
                [cx + tx * r, cy + 0.65 * r, cx + tx * r, cy + r],
                fill=0,
                width=max(1, int(0.08 * r)),
            )
    elif subject in OUTLINES:
        draw.polygon(_polygon(OUTLINES[subject], cx, cy, r, angle), fill=255)
    else:
        _glyph(mask, w["glyphs"][subject], cx, cy, r, angle)
    return mask


def _glyph(mask: Image.Image, char: str, cx: float, cy: float, r: float, angle: float) -> None:
    """Draw a font glyph whose larger side spans the diameter ``2r``, centred and rotated."""
    font = glyph_font(int(4 * r))
    probe = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), char, font=font)
    w, h = probe[2] - probe[0], probe[3] - probe[1]
    tile = Image.new("L", (w + 2, h + 2), 0)
    ImageDraw.Draw(tile).text((1 - probe[0], 1 - probe[1]), char, font=font, fill=255)
    # a square glyph spans the diameter; a long one a little more, so that it keeps some area
    scale = min(2.4 * r / max(w, h), 2 * r / math.sqrt(w * h))
    tile = tile.resize(
        (max(1, round(tile.width * scale)), max(1, round(tile.height * scale))),
        Image.Resampling.LANCZOS,
    )
    tile = tile.rotate(-math.degrees(angle), resample=Image.Resampling.BICUBIC, expand=True)
    tile = tile.filter(ImageFilter.MaxFilter(5))  # half a pixel bolder: strokes survive 32 px
    mask.paste(255, (round(cx - tile.width / 2), round(cy - tile.height / 2)), tile)


def _background(place: str, size: int, rng: np.random.Generator, w: dict[str, Any]) -> np.ndarray:
    spec = w["places"][place]
    a, b = (np.array(c, dtype=np.float32) for c in spec["tones"])
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    phase = rng.uniform(0, 2 * np.pi)
    pattern = spec["pattern"]
    if pattern == "gradient":
        t = y
    elif pattern == "waves":
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (3 * y + 0.3 * np.sin(2 * np.pi * 2 * x)) + phase)
    elif pattern == "stripes":
        t = (np.sin(2 * np.pi * 5 * x + phase) > 0).astype(np.float32)
    elif pattern == "checker":
        t = ((np.floor(x * 6) + np.floor(y * 6)) % 2).astype(np.float32)
    elif pattern == "bricks":
        row = np.floor(y * 8)
        t = (np.mod(x * 4 + 0.5 * (row % 2), 1) < 0.06) | (np.mod(y * 8, 1) < 0.1)
        t = t.astype(np.float32)
    elif pattern == "dunes":
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (2 * y + 0.5 * x) + phase)
    elif pattern == "speckles":
        t = (rng.random((size, size)) < 0.08).astype(np.float32)
    elif pattern == "blobs":
        t = 0.5 + 0.25 * (np.sin(2 * np.pi * 2.5 * x + phase) + np.sin(2 * np.pi * 3 * y - phase))
    elif pattern == "rings":
        d = np.hypot(x - 0.5, y - 0.5)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * 6 * d + phase)
    else:  # "plain"
        t = np.zeros_like(x)
    return a * (1 - t[..., None]) + b * t[..., None]


def _fill(
    style: dict[str, str], rgb: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(colour image, coverage weight) inside the silhouette for a rendering style: its
    ``fill`` pattern, and what shows between the stripes or dots (``gap``: the background when
    ``clear``, a contrasting tone of the colour when ``contrast``)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    colour = np.broadcast_to(rgb, (size, size, 3)).copy()
    weight = np.ones((size, size), np.float32)
    period = max(3.0, size / 12)
    fill = style["fill"]
    if fill == "stripes":
        weight = (np.mod(x + y + rng.uniform(0, period), period) < period / 2).astype(np.float32)
    elif fill == "dots":
        gx = np.mod(x + rng.uniform(0, period), period) - period / 2
        gy = np.mod(y + rng.uniform(0, period), period) - period / 2
        weight = (np.hypot(gx, gy) < period * 0.36).astype(np.float32)
    elif fill == "mosaic":
        cell = max(2, int(size / 10))
        tiles = rng.uniform(0.55, 1.15, (size // cell + 1, size // cell + 1))
        shade = tiles[(y // cell).astype(int), (x // cell).astype(int)]
        colour = np.clip(colour * shade[..., None], 0, 255)
    elif fill == "gradient":  # light at the top, dark at the bottom
        colour = np.clip(colour * (1.3 - 0.8 * y / size)[..., None], 0, 255)
    elif fill == "checks":
        cell = max(2, size // 16)
        weight = ((x // cell + y // cell) % 2).astype(np.float32)
    if style.get("gap") == "contrast" and fill in ("stripes", "dots", "checks"):
        colour = colour * weight[..., None] + _contrast(rgb) * (1 - weight[..., None])
        weight = np.ones_like(weight)
    return colour, weight


def _contrast(rgb: np.ndarray) -> np.ndarray:
    """A darker tone of a light colour, a lighter tone of a dark one."""
    return rgb * 0.35 if rgb.mean() > 90 else rgb + (255 - rgb) * 0.55


def _under_layer(
    under: str | None, mask: Image.Image, rgb: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """What some styles draw beneath the subject: a drop shadow, a glow or a stencil plate
    (with the subject cut out of it). ``None`` for the others."""
    shift = max(1, size // 16) * SUPERSAMPLE
    if under == "shadow":
        moved = Image.new("L", mask.size, 0)
        moved.paste(mask, (shift, shift))
        alpha, colour = 0.75 * _down(moved, size), np.array([20.0, 20.0, 20.0])
    elif under == "glow":
        halo = mask.filter(ImageFilter.MaxFilter(2 * shift + 1)).filter(
            ImageFilter.GaussianBlur(shift)
        )
        alpha, colour = 0.9 * _down(halo, size), rgb + (255 - rgb) * 0.6
    elif under == "plate":
        x0, y0, x1, y1 = mask.getbbox() or (0, 0, *mask.size)
        plate = Image.new("L", mask.size, 0)
        ImageDraw.Draw(plate).rounded_rectangle(
            [x0 - shift, y0 - shift, x1 + shift, y1 + shift], radius=shift, fill=255
        )
        alpha, colour = _down(plate, size), rgb
    else:
        return None
    return alpha, np.broadcast_to(colour, (size, size, 3))


def _down(mask: Image.Image, size: int) -> np.ndarray:
    return np.asarray(mask.resize((size, size), Image.Resampling.BOX), np.float32) / 255


def render(scene: Scene, seed: int, size: int = 64, world_name: str = SHIPPED_WORLD) -> Image.Image:
    """One image of ``scene``; the seed moves, scales and rotates the subject and textures."""
    return render_with_box(scene, seed, size, world_name)[0]


def render_with_box(
    scene: Scene, seed: int, size: int = 64, world_name: str = SHIPPED_WORLD
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The image and the subject's box ``[x, y, w, h]`` in pixels (NudeNet's box layout), which
    trains the mini world's hazard detector."""
    w = world(world_name)
    rng = np.random.default_rng(seed)
    background = _background(scene.place, size, rng, w)
    mask = _mask(scene, size, rng, w)
    rgb = np.array(w["colours"][scene.colour], dtype=np.float32)
    style = w["styles"][scene.style]
    image = background
    under = _under_layer(style.get("under"), mask, rgb, size)
    if under is not None:
        image = image * (1 - under[0][..., None]) + under[1] * under[0][..., None]
    if style["fill"] == "outline":
        edge = mask.filter(ImageFilter.MaxFilter(9)).point(lambda v: 255 if v else 0)
        inner = mask.filter(ImageFilter.MinFilter(9))
        if style.get("gap") == "contrast":  # the inside in a contrasting tone
            inside = _down(inner, size)[..., None]
            image = image * (1 - inside) + _contrast(rgb) * inside
        mask = Image.fromarray(np.array(edge) - np.minimum(np.array(edge), np.array(inner)))
    alpha = _down(mask, size)
    colour, weight = _fill(style, rgb, size, rng)
    alpha = alpha * weight
    if style.get("under") == "plate":  # the subject is the hole: the background shows through
        colour = background
    image = image * (1 - alpha[..., None]) + colour * alpha[..., None]
    ys, xs = np.nonzero(np.asarray(mask.resize((size, size), Image.Resampling.BOX)) > 127)
    box = (
        (int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))
        if len(xs)
        else (0, 0, size, size)
    )
    return Image.fromarray(np.clip(image + 0.5, 0, 255).astype(np.uint8)), box


def caption(scene: Scene, template: str) -> str:
    return template.format(
        shape=scene.subject, colour=scene.colour, style=scene.style, place=scene.place
    )


def sample_scenes(
    count: int, seed: int, hazard_rate: float = 0.0, world_name: str = SHIPPED_WORLD
) -> list[tuple[Scene, int]]:
    """Scenes with uniformly drawn attributes and one image seed each (disjoint seeds give
    disjoint render sets, e.g. training data and held-out FID references)."""
    w = world(world_name)
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(count):
        hazard = str(rng.choice(w["hazards"])) if rng.random() < hazard_rate else None
        scenes.append(
            (
                Scene(
                    str(rng.choice(w["shapes"])),
                    str(rng.choice(list(w["colours"]))),
                    str(rng.choice(list(w["styles"]))),
                    str(rng.choice(list(w["places"]))),
                    hazard,
                ),
                int(rng.integers(0, 2**31 - 1)),
            )
        )
    return scenes


def contact_sheet(images: list[Image.Image], columns: int = 8) -> Image.Image:
    size = images[0].size[0]
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * size, rows * size), "white")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * size, (i // columns) * size))
    return sheet


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fia_bench.datasets.procedural")
    parser.add_argument("--out", type=Path, default=Path("renders"))
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--hazard-rate", type=float, default=0.1)
    parser.add_argument(
        "--world", default=SHIPPED_WORLD, help="a world file of datasets/data, without .yaml"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    scenes = sample_scenes(args.count, args.seed, args.hazard_rate, args.world)
    images = [render(scene, s, args.size, args.world) for scene, s in scenes]
    contact_sheet(images).save(args.out / "sheet.png")
    templates = world(args.world)["captions"]
    lines = [caption(scene, templates[i % len(templates)]) for i, (scene, _) in enumerate(scenes)]
    (args.out / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out / 'sheet.png'} and {args.out / 'captions.txt'}")


if __name__ == "__main__":
    main()
