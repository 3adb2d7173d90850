"""Turn a photo or scan of one handwritten digit into the normalized 1x28x28 tensor the model was trained on.

It redoes what was done to make MNIST: grayscale, light ink on a dark background, the digit cropped and scaled to
fit a 20x20 box (aspect kept), placed in a 28x28 frame so that its centre of mass is the centre, then normalized
with the training set's mean and std.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from digit_lightning.data.mnist import MNIST_MEAN, MNIST_STD

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
BOX, FRAME = 20, 28  # MNIST: the digit fits a 20x20 box inside the 28x28 image
MIN_CONTRAST = 0.15  # ink must differ from the background by this much (of the 0..1 range) to count as a digit


class PreprocessError(ValueError):
    """An image that cannot be turned into a digit; its message is one line naming the file and the problem."""


def load_gray(image: str | Path | Image.Image | bytes, max_pixels: int | None = None) -> np.ndarray:
    """Open an image file (or take a PIL image, or an encoded image's bytes) and return its gray levels in [0, 1] as
    a float32 HxW array.

    Transparent pixels count as white paper; EXIF rotation (phone photos) is applied. `max_pixels` refuses larger
    images before decoding them (PIL's own limit, `Image.MAX_IMAGE_PIXELS`, applies in any case).
    """
    name = image_name(image)
    try:
        with warnings.catch_warnings():
            # Above Image.MAX_IMAGE_PIXELS PIL only warns; a digit never needs that many pixels, so refuse.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(image, Image.Image):
                img = image.copy()
            elif isinstance(image, bytes):
                if not image:
                    raise PreprocessError(f"{name}: empty (0 bytes)")
                with Image.open(io.BytesIO(image)) as opened:
                    check_size(opened, name, max_pixels)
                    img = opened.copy()
            else:
                path = Path(image)
                if path.is_file() and path.stat().st_size == 0:
                    raise PreprocessError(f"{name}: empty file (0 bytes)")
                with Image.open(path) as opened:
                    check_size(opened, name, max_pixels)
                    img = opened.copy()  # copy() decodes the whole file now, while it is open
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(paper, rgba)
            if img.mode.startswith("I;16"):  # 16-bit gray: convert("L") would clip every level above 255 to white
                gray = np.asarray(img, dtype=np.float32) / 65535.0
            else:
                gray = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except PreprocessError:
        raise
    except FileNotFoundError:
        raise PreprocessError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise PreprocessError(f"{name}: is a directory") from None
    except PermissionError:
        raise PreprocessError(f"{name}: permission denied") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PreprocessError(
            f"{name}: too many pixels for a digit (over {Image.MAX_IMAGE_PIXELS:,}; a possible decompression bomb); "
            "resize it first"
        ) from None
    except UnidentifiedImageError:
        raise PreprocessError(f"{name}: not an image PIL can read (PNG, JPEG, BMP, ...)") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data in a recognized format
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise PreprocessError(f"{name}: cannot decode the image ({reason})") from None
    if gray.size == 0:
        raise PreprocessError(f"{name}: image has no pixels")
    return gray


def image_name(image: str | Path | Image.Image | bytes) -> str:
    """How error messages name an image: its path, or `image` for one given in memory."""
    return "image" if isinstance(image, (Image.Image, bytes)) else str(image)


def check_size(image: Image.Image, name: str, max_pixels: int | None) -> None:
    """Refuse an image with more than `max_pixels` pixels from its header alone, before it is decoded."""
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise PreprocessError(
            f"{name}: {width}x{height} is too many pixels for a digit (over {max_pixels:,}); resize it first"
        )


def to_mnist(gray: np.ndarray, name: str = "image") -> np.ndarray:
    """MNIST-style 28x28 float array in [0, 1] (ink bright, background 0) from a gray image of one digit."""
    h, w = gray.shape
    edge = max(1, round(0.02 * min(h, w)))  # the outer 2% of the image is taken to be paper
    border = np.concatenate(
        [gray[:edge].ravel(), gray[-edge:].ravel(), gray[:, :edge].ravel(), gray[:, -edge:].ravel()]
    )
    if np.median(border) > 0.5:  # light paper, dark ink: invert so that the ink is bright, as in MNIST
        gray, border = 1.0 - gray, 1.0 - border
    background = float(np.median(border))
    peak = float(np.percentile(gray, 99.9)) if gray.size > 1000 else float(gray.max())
    if peak - background < MIN_CONTRAST:
        raise PreprocessError(f"{name}: no ink found (the image is blank or too faint)")
    # Background to 0 and ink to 1; paper texture and faint noise below a quarter of the contrast become 0.
    floor = background + 0.25 * (peak - background)
    ink = np.clip((gray - floor) / (peak - floor), 0.0, 1.0)
    rows, cols = np.nonzero(ink > 0.1)
    if rows.size == 0:
        raise PreprocessError(f"{name}: no ink found (the image is blank or too faint)")
    digit = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]

    # Scale the longer side to 20 pixels; antialiasing averages the ink the way MNIST's downsampling did.
    dh, dw = digit.shape
    scale = BOX / max(dh, dw)
    size = (max(1, round(dh * scale)), max(1, round(dw * scale)))
    small = F.interpolate(torch.from_numpy(digit)[None, None], size=size, mode="bilinear", antialias=True)
    small = small[0, 0].clamp(0, 1).numpy()

    # Put the centre of mass at the frame's centre, keeping the whole digit inside the frame.
    total = small.sum()
    ys, xs = np.indices(small.shape)
    cy, cx = ((ys * small).sum() / total, (xs * small).sum() / total) if total > 0 else (size[0] / 2, size[1] / 2)
    top = int(np.clip(round(FRAME / 2 - cy), 0, FRAME - size[0]))
    left = int(np.clip(round(FRAME / 2 - cx), 0, FRAME - size[1]))
    frame = np.zeros((FRAME, FRAME), dtype=np.float32)
    frame[top : top + size[0], left : left + size[1]] = small
    return frame


def normalize(frame: np.ndarray) -> torch.Tensor:
    """A 28x28 MNIST-style frame (ink 1, background 0) as the model's input: the 1x28x28 tensor normalized with the
    training set's mean and std, as the data module normalizes the training images."""
    return ((torch.from_numpy(frame) - MNIST_MEAN) / MNIST_STD).unsqueeze(0)


def preprocess_image(image: str | Path | Image.Image | bytes, max_pixels: int | None = None) -> torch.Tensor:
    """The model's input for one image of a digit (a file, a PIL image or an encoded image's bytes): a normalized
    1x28x28 float tensor. Raises `PreprocessError`."""
    return normalize(to_mnist(load_gray(image, max_pixels), image_name(image)))


def find_images(inputs: list[str | Path]) -> list[Path]:
    """Files to predict: each input file as given, and the image files under each input directory (sorted)."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found.append(path)  # a missing or unreadable file is reported by preprocess_image, in order
    return found
