"""The embedded visual question answering task: shapes on a background, rendered with
numpy, with questions whose one-word answers follow from the scene.

A **source** domain (plain light backgrounds, saturated colours) and **shifted** target
domains (textured or noisy backgrounds, dim or tinted lighting) let the demo reproduce the
CDCCA setting offline: the device model learned the source domain, its camera now sees
the shifted one. Everything is deterministic for a seed; numpy only (no torch), so the
device side can render its inputs too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import numpy as np

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle")
PALETTE = {  # RGB in [0, 1]
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.75, 0.15),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.9, 0.1),
}
COUNT_WORDS = ("zero", "one", "two", "three")
SceneDomain = Literal["source", "noise", "texture", "dim"]
DOMAINS: tuple[SceneDomain, ...] = ("source", "noise", "texture", "dim")
SHIFTED: tuple[SceneDomain, ...] = ("noise", "texture", "dim")


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    x: float  # centre, in [0, 1]
    y: float
    size: float  # radius / half side, as a fraction of the image


@dataclass(frozen=True)
class Question:
    text: str  # e.g. "what colour is the triangle?"
    answer: str  # one word


@dataclass(frozen=True)
class Example:
    image: np.ndarray  # (H, W, 3) uint8
    question: Question
    things: tuple[Thing, ...]
    domain: str


def make_scene(rng: random.Random) -> tuple[Thing, ...]:
    """One to three shapes, not overlapping too much."""
    things: list[Thing] = []
    for _ in range(rng.randint(1, 3)):
        for _attempt in range(20):
            size = rng.uniform(0.1, 0.16)
            x, y = rng.uniform(size + 0.02, 1 - size - 0.02), rng.uniform(size + 0.02, 1 - size - 0.02)
            if all(abs(x - t.x) > size + t.size or abs(y - t.y) > size + t.size for t in things):
                things.append(Thing(rng.choice(SHAPES), rng.choice(list(PALETTE)), x, y, size))
                break
    return tuple(things)


def render(things: tuple[Thing, ...], domain: str, rng: random.Random, size: int = IMAGE_SIZE) -> np.ndarray:
    """The scene as an (H, W, 3) uint8 image in the given domain's look."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # (H, W)
    nrng = np.random.default_rng(rng.randrange(2**32))
    if domain == "source":
        img = np.full((size, size, 3), 0.93, np.float32)
    elif domain == "noise":
        img = np.clip(0.6 + 0.25 * nrng.standard_normal((size, size, 3)), 0, 1).astype(np.float32)
    elif domain == "texture":
        f1, f2 = rng.uniform(8, 20), rng.uniform(8, 20)
        base = 0.55 + 0.3 * np.sin(f1 * xx * np.pi) * np.cos(f2 * yy * np.pi)
        tint = np.array([rng.uniform(0.6, 1.0) for _ in range(3)], np.float32)
        img = (base[..., None] * tint).astype(np.float32)
    elif domain == "dim":
        img = np.full((size, size, 3), 0.35, np.float32)
    else:
        raise ValueError(f"unknown domain {domain!r}; choose one of {DOMAINS}")
    for t in things:
        if t.shape == "circle":
            mask = (xx - t.x) ** 2 + (yy - t.y) ** 2 <= t.size**2
        elif t.shape == "square":
            mask = (np.abs(xx - t.x) <= t.size) & (np.abs(yy - t.y) <= t.size)
        else:  # triangle pointing up
            dy = (yy - (t.y - t.size)) / (2 * t.size)
            mask = (dy >= 0) & (dy <= 1) & (np.abs(xx - t.x) <= dy * t.size)
        img[mask] = PALETTE[t.colour]
    if domain == "dim":  # a darker, bluish light on everything
        img = img * np.array([0.55, 0.6, 0.8], np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


QUESTION_KINDS = ("colour", "shape", "exists", "count", "left")


def questions(things: tuple[Thing, ...]) -> dict[str, list[Question]]:
    """Every question the scene answers unambiguously, by kind."""
    out: dict[str, list[Question]] = {k: [] for k in QUESTION_KINDS}
    by_shape = {s: [t for t in things if t.shape == s] for s in SHAPES}
    by_colour = {c: [t for t in things if t.colour == c] for c in PALETTE}
    for s, ts in by_shape.items():
        out["exists"].append(Question(f"is there a {s}?", "yes" if ts else "no"))
        if len(ts) == 1:
            out["colour"].append(Question(f"what colour is the {s}?", ts[0].colour))
    for c, ts in by_colour.items():
        if len(ts) == 1:
            out["shape"].append(Question(f"what shape is the {c} thing?", ts[0].shape))
    out["count"].append(Question("how many shapes are there?", COUNT_WORDS[len(things)]))
    singles = [ts[0] for ts in by_shape.values() if len(ts) == 1]
    for a in singles:
        for b in singles:
            if a is not b and abs(a.x - b.x) > 0.1:
                out["left"].append(Question(f"is the {a.shape} left of the {b.shape}?", "yes" if a.x < b.x else "no"))
    return out


def example(rng: random.Random, domain: str) -> Example:
    """A scene and one question about it, its kind drawn uniformly (among those it has)."""
    things = make_scene(rng)
    qs = {k: v for k, v in questions(things).items() if v}
    q = rng.choice(qs[rng.choice(sorted(qs))])
    return Example(render(things, domain, rng), q, things, domain)


def dataset(n: int, seed: int, domains: tuple[str, ...]) -> list[Example]:
    """``n`` examples, domains drawn uniformly from ``domains``; deterministic for a seed."""
    rng = random.Random(seed)
    return [example(rng, rng.choice(domains)) for _ in range(n)]


def prompt_for(question: Question | str, image_token: str) -> str:
    """The text around the image: the LLaVA-style prompt the models are trained on."""
    text = question.text if isinstance(question, Question) else question
    return f"{image_token}\nquestion: {text} answer:"


ANSWERS = sorted({*PALETTE, *SHAPES, *COUNT_WORDS, "yes", "no"})
