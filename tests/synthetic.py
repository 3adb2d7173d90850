"""Synthetic digits for the fast tests: each class drawn as its own pen strokes, randomly rotated, scaled, shifted,
jittered and inked, then written as the four MNIST raw files (IDX, torchvision's layout) so that `MNISTDataModule`
reads them like MNIST, with `data.verify=false` (they are not MNIST's bytes). A small CNN learns them in a few dozen
steps, so a test on them can still ask that learning happened.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from digit_lightning.data.mnist import idx_bytes

Stroke = list[tuple[float, float]]
TRAIN_IMAGES, TEST_IMAGES = 1_000, 300
# MNISTDataModule's arguments for them (200 of the 1,000 training images validate), and the same as overrides.
SYNTHETIC_DATA = {"verify": False, "val_size": 200}
SYNTHETIC_OVERRIDES = [f"data.{key}={str(value).lower()}" for key, value in SYNTHETIC_DATA.items()]


def arc(cx: float, cy: float, rx: float, ry: float, start: float, end: float, n: int = 16) -> Stroke:
    """Points on an ellipse from `start` to `end` degrees (0 = right, 90 = down: image coordinates)."""
    angles = np.deg2rad(np.linspace(start, end, n))
    return [(cx + rx * np.cos(a), cy + ry * np.sin(a)) for a in angles]


# Each digit as strokes in a unit box (x right, y down), roughly as a person writes it.
STROKES: dict[int, list[Stroke]] = {
    0: [arc(0.5, 0.5, 0.33, 0.48, 0, 360, 24)],
    1: [[(0.35, 0.2), (0.58, 0.0), (0.5, 1.0)]],
    2: [arc(0.5, 0.3, 0.34, 0.28, 190, 380) + [(0.12, 0.98), (0.9, 0.98)]],
    3: [arc(0.48, 0.27, 0.32, 0.25, 200, 450), arc(0.48, 0.74, 0.36, 0.26, -90, 160)],
    4: [[(0.62, 0.0), (0.08, 0.66), (0.92, 0.66)], [(0.66, 0.3), (0.66, 1.0)]],
    5: [[(0.85, 0.0), (0.28, 0.0), (0.22, 0.45)], arc(0.5, 0.7, 0.36, 0.3, -130, 160)],
    6: [[(0.72, 0.0), (0.22, 0.6)], arc(0.5, 0.72, 0.3, 0.27, 180, 540)],
    7: [[(0.1, 0.02), (0.9, 0.02), (0.38, 1.0)]],
    8: [arc(0.5, 0.26, 0.27, 0.25, 0, 360), arc(0.5, 0.74, 0.33, 0.26, 0, 360)],
    9: [arc(0.5, 0.3, 0.3, 0.28, 0, 360), [(0.8, 0.3), (0.7, 1.0)]],
}
SCALE = 4  # drawn at 4x and shrunk: anti-aliased edges, like MNIST's


def draw_digit(label: int, rng: np.random.Generator) -> np.ndarray:
    """One 28x28 uint8 image of `label` (white ink on black, in a 20x20 box near the centre, as MNIST's)."""
    angle = np.deg2rad(rng.uniform(-12, 12))
    sx, sy = rng.uniform(0.75, 1.1), rng.uniform(0.85, 1.1)
    rotate = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ np.diag([sx, sy])
    centre = 14 + rng.uniform(-2, 2, 2)
    canvas = Image.new("L", (28 * SCALE, 28 * SCALE))
    pen = ImageDraw.Draw(canvas)
    width = int(rng.uniform(1.8, 3.2) * SCALE)
    for stroke in STROKES[label]:
        points = np.asarray(stroke) + rng.normal(0, 0.03, (len(stroke), 2))  # a shaky hand
        xy = ((points - 0.5) * 20) @ rotate.T + centre
        pen.line([tuple(p) for p in xy * SCALE], fill=255, width=width, joint="curve")
    image = np.asarray(canvas.resize((28, 28), Image.BOX), dtype=np.float32)
    ink = rng.uniform(0.7, 1.0) * (1 + rng.normal(0, 0.1, image.shape))  # uneven ink; the background stays 0
    return np.clip(image * ink, 0, 255).astype(np.uint8)


def digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` images (Nx28x28 uint8) with balanced, shuffled labels (N uint8)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
    return np.stack([draw_digit(int(y), rng) for y in labels]), labels


def write_synthetic_mnist(data_dir: Path, seed: int = 0) -> Path:
    """Write the four raw files under `<data_dir>/MNIST/raw` (the train and test splits drawn apart); return it."""
    raw = data_dir / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n, split_seed in (("train", TRAIN_IMAGES, seed), ("t10k", TEST_IMAGES, seed + 1)):
        images, labels = digits(n, split_seed)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(idx_bytes(images))
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    return raw
