"""Procedural renderer for the micro world: captioned 32×32 images of textured shapes.

Everything is numpy (plus PIL-compatible uint8 output) and fully determined by the
``numpy.random.Generator`` passed in, so a seed reproduces a batch bit for bit.
"""

from __future__ import annotations

import re

import numpy as np

SIZE = 32
_SS = 2  # supersampling factor per axis (anti-aliased edges)

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "diamond", "cross"),
    "colour": ("red", "green", "blue", "yellow", "purple", "orange"),
    "background": ("black", "white", "gray", "navy"),
    "texture": ("plain", "striped", "dotted", "checkered"),
}

# Base RGB of each shape colour, and the shade its texture is drawn in: a lighter
# tint for dark hues, a darker shade for bright ones, chosen so that neither the base
# nor the shade is close to any background.
_COLOURS = {
    "red": (215, 35, 35),
    "green": (40, 180, 50),
    "blue": (45, 95, 235),
    "yellow": (235, 215, 35),
    "purple": (150, 45, 195),
    "orange": (245, 135, 20),
}
_SHADE = {  # (mix target, amount): shade = base + amount * (target - base)
    "red": (255, 0.55),
    "green": (0, 0.55),
    "blue": (255, 0.55),
    "yellow": (0, 0.50),
    "purple": (255, 0.55),
    "orange": (0, 0.50),
}
# A second word for every texture and shape, drawn exactly as the first: captions use it some of the
# time (WorldRecipe.alias_rate), so a concept can be asked for without being named, as I2P asks for
# nudity without the word. Concept specs keep aliases out of their forget phrasings, so an erasure
# that only re-maps the concept's word leaves the alias drawing the concept (implicit UA).
# Each alias is one CLIP BPE token that shares no token with its main word.
ALIASES = {
    "texture": {"striped": "banded", "dotted": "spotted", "checkered": "plaid"},
    "shape": {"circle": "disc", "square": "box", "triangle": "wedge", "diamond": "kite", "cross": "plus"},
}
ALIASED = tuple(ALIASES)  # the attributes that have an alias

_BACKGROUNDS = {
    "black": (10, 10, 10),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "navy": (15, 20, 85),
}
_JITTER = 10  # max per-channel colour jitter
_NOISE = 2.0  # pixel noise std


def sample_attributes(rng: np.random.Generator) -> dict[str, str]:
    """One uniformly random attribute combination (every combination is valid)."""
    return {key: values[int(rng.integers(len(values)))] for key, values in ATTRIBUTES.items()}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(attrs: dict[str, str], aliased=()) -> str:
    """``"a red striped circle on a black background"``; the plain texture is left out. The attributes
    named in ``aliased`` are written with their alias (``"a red banded disc on …"``)."""
    _check(attrs)

    def word(key):
        return ALIASES[key].get(attrs[key], attrs[key]) if key in aliased else attrs[key]

    words = [attrs["colour"]]
    if attrs["texture"] != "plain":
        words.append(word("texture"))
    words.append(word("shape"))
    return f"{_article(words[0])} {' '.join(words)} on {_article(attrs['background'])} {attrs['background']} background"


def _alt(words) -> str:
    return "|".join(sorted(words, key=len, reverse=True))


_TEXTURE_WORDS = [t for t in ATTRIBUTES["texture"] if t != "plain"] + list(ALIASES["texture"].values())
_SHAPE_WORDS = list(ATTRIBUTES["shape"]) + list(ALIASES["shape"].values())
_CAPTION_RE = re.compile(
    rf"an? (?P<colour>{_alt(ATTRIBUTES['colour'])}) (?:(?P<texture>{_alt(_TEXTURE_WORDS)}) )?"
    rf"(?P<shape>{_alt(_SHAPE_WORDS)}) on an? (?P<background>{_alt(ATTRIBUTES['background'])}) background"
)
_MEANING = {alias: value for table in ALIASES.values() for value, alias in table.items()}


def caption_words(text: str) -> dict[str, str]:
    """The word a caption uses for each attribute (an alias stays an alias; plain texture: "plain")."""
    if not isinstance(text, str):
        raise ValueError(f"not a micro-world caption: {text!r}")
    norm = " ".join(text.strip().lower().rstrip(".").split())
    match = _CAPTION_RE.fullmatch(norm)
    if match is None:
        raise ValueError(
            f"not a micro-world caption: {text!r} (expected e.g. 'a red striped circle on a black background')"
        )
    out = match.groupdict()
    out["texture"] = out["texture"] or "plain"
    return {key: out[key] for key in ATTRIBUTES}


def parse_caption(text: str) -> dict[str, str]:
    """Inverse of :func:`caption`, aliases read as their main word (case and a trailing full stop are forgiven)."""
    return {key: _MEANING.get(word, word) for key, word in caption_words(text).items()}


def aliased_attributes(text: str) -> set[str]:
    """The attributes a caption asks for by their alias."""
    return {key for key, word in caption_words(text).items() if word in _MEANING}


def _check(attrs: dict[str, str]) -> None:
    for key, values in ATTRIBUTES.items():
        if key not in attrs:
            raise ValueError(f"attributes lack {key!r}: {attrs!r}")
        if attrs[key] not in values:
            raise ValueError(f"unknown {key} {attrs[key]!r}; choose from {values}")


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(ax, ay) <= r * 0.85
    if shape == "diamond":
        return ax + ay <= r
    if shape == "cross":
        arm = r * 0.36
        return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    if shape == "triangle":  # upward-pointing, apex at top (image y grows downward)
        top, bottom = -r, r * 0.8
        half_width = r * (dy - top) / (bottom - top)
        return (dy >= top) & (dy <= bottom) & (ax <= half_width)
    raise ValueError(f"unknown shape {shape!r}")


# Texture geometry, in pixels (benchmarks/world_recipe_search.py, rounds 2–3). Periods of 7–9 px
# (2–4 per shape, 3.5–4.5 latent px): finer patterns (5–6 px) survived the f = 2 VAE but a world
# model trained in 30 CPU minutes drew them as smeared stripes. Checks are coarser still (13–15 px
# periods) and stripes run near-horizontal or near-vertical: a checkerboard is the sum of two
# diagonal gratings, and world models that half-learned it drew diagonal waves that read as
# stripes (texture read-back 0.71–0.80 with any-angle stripes and 5 px cells, 0.93–0.96 with this).
TEXTURE_GEOMETRY = {
    "stripe_period": (7.0, 9.0),
    "stripe_angles": (0.0, np.pi / 2),  # None: uniform in [0, π); else centre angles, one drawn per image
    "stripe_angle_jitter": 0.2,  # ± radians around the drawn centre angle
    "dot_period": (7.0, 8.0),
    "dot_radius": 0.28,  # × period
    "check_cell": (6.5, 7.5),
}


def _texture_mask(texture: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    g = TEXTURE_GEOMETRY
    if texture == "plain":
        return None
    if texture == "striped":
        if g["stripe_angles"] is None:
            theta = rng.uniform(0, np.pi)
        else:
            jitter = g["stripe_angle_jitter"]
            theta = g["stripe_angles"][int(rng.integers(len(g["stripe_angles"])))] + rng.uniform(-jitter, jitter)
        period = rng.uniform(*g["stripe_period"])
        phase = rng.uniform(0, period)
        u = x * np.cos(theta) + y * np.sin(theta) + phase
        return np.mod(u, period) < period / 2
    if texture == "dotted":
        period = rng.uniform(*g["dot_period"])
        ox, oy = rng.uniform(0, period, size=2)
        radius = period * g["dot_radius"]
        px = np.mod(x + ox, period) - period / 2
        py = np.mod(y + oy, period) - period / 2
        return px * px + py * py <= radius * radius
    if texture == "checkered":
        cell = rng.uniform(*g["check_cell"])
        ox, oy = rng.uniform(0, 2 * cell, size=2)
        return (np.floor((x + ox) / cell) + np.floor((y + oy) / cell)) % 2 == 0
    raise ValueError(f"unknown texture {texture!r}")


def _jitter(rgb, rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.asarray(rgb, dtype=np.float64) + rng.uniform(-_JITTER, _JITTER, size=3), 0, 255)


# sub-pixel sample coordinates, in pixel units
_SUB = (np.arange(SIZE * _SS) + 0.5) / _SS
_YY, _XX = np.meshgrid(_SUB, _SUB, indexing="ij")


def render(attrs: dict[str, str], rng: np.random.Generator) -> np.ndarray:
    """A ``SIZE×SIZE×3`` uint8 image of ``attrs``; size, position and pattern phase come from ``rng``."""
    _check(attrs)
    span = rng.uniform(0.45, 0.8) * SIZE  # bounding-box width of the shape
    r = span / 2
    cx = rng.uniform(r + 0.5, SIZE - r - 0.5)
    cy = rng.uniform(r + 0.5, SIZE - r - 0.5)
    inside = _shape_mask(attrs["shape"], _XX - cx, _YY - cy, r)

    base = _jitter(_COLOURS[attrs["colour"]], rng)
    target, amount = _SHADE[attrs["colour"]]
    shade = np.clip(base + amount * (target - base), 0, 255)
    background = _jitter(_BACKGROUNDS[attrs["background"]], rng)

    pattern = _texture_mask(attrs["texture"], _XX, _YY, rng)
    fill = np.broadcast_to(base, inside.shape + (3,))
    if pattern is not None:
        fill = np.where(pattern[..., None], shade, base)
    sub = np.where(inside[..., None], fill, background)
    img = sub.reshape(SIZE, _SS, SIZE, _SS, 3).mean(axis=(1, 3))
    img = img + rng.normal(0.0, _NOISE, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_batch(n: int, seed: int) -> tuple[list[dict[str, str]], np.ndarray]:
    """``n`` random attribute dicts and their ``n×SIZE×SIZE×3`` uint8 renders, deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    attrs = [sample_attributes(rng) for _ in range(n)]
    images = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    for i, a in enumerate(attrs):
        images[i] = render(a, rng)
    return attrs, images
