"""Image loading and preprocessing identical to the released `load_and_preprocess_images`.

"crop" (default): width -> 518, height keeps the aspect ratio rounded to a multiple of 14, then the
height is centre-cropped to 518 if larger. "pad": the longer side -> 518, the other side rounded to a
multiple of 14, then padded with white (1.0) to 518x518. Alpha is composited on white. Images of
different sizes in one batch are padded with 1.0 (centred) to the largest size.

With a `size` (H, W) — a model's native input, or the fixed size of an exported graph — the same rules
aim at H x W and every image comes out exactly H x W: "crop" makes the width W and centre-crops or
white-pads the height to H; "pad" fits the image inside H x W and pads with white. For (518, 518) "pad"
is the released rule; "crop" differs only in padding short images to 518 rows (what batch padding
does to a mixed batch).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import InputError, ResourceError
from ..log import logger

TARGET_SIZE = 518
PATCH_SIZE = 14
MODES = ("crop", "pad")
# The largest image (width x height) any command decodes or resizes to: 100 megapixels, 300 MB as 8-bit RGB.
# A larger file, or one that declares more pixels than it holds (a decompression bomb), is refused from its
# header, before any pixel is decoded; so is an aspect ratio whose resize would exceed it.
MAX_IMAGE_PIXELS = 100_000_000


@dataclass(frozen=True)
class ResizePlan:
    """Where the pixels of a source image end up after preprocessing (before batch padding)."""

    resized_hw: tuple[int, int]  # size after the bicubic resize
    crop_top: int  # rows removed from the top of the resized image ("crop" mode)
    pad_top: int  # white rows added above ("pad" mode)
    pad_left: int  # white columns added on the left ("pad" mode)
    output_hw: tuple[int, int]


def _round_to_patch(length: float) -> int:
    # Python's round (half to even), as the released code.
    return round(length / PATCH_SIZE) * PATCH_SIZE


def check_size(size: tuple[int, int]) -> tuple[int, int]:
    height, width = size
    if height <= 0 or width <= 0 or height % PATCH_SIZE or width % PATCH_SIZE:
        raise InputError(f"image size {height}x{width} must be positive multiples of {PATCH_SIZE}")
    return int(height), int(width)


def parse_image_size(text: str) -> tuple[int, int]:
    """"518", "518x518" or "294x518" -> (H, W)."""
    parts = text.lower().split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise InputError(f"image size must look like 518 or 294x518, got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise InputError(f"image size must look like 518 or 294x518, got {text!r}")
    return values


def plan_preprocessing(width: int, height: int, mode: str = "crop", size: tuple[int, int] | None = None) -> ResizePlan:
    """The resize / crop / pad that preprocessing applies to a width x height image; `size` (H, W): the
    exact output size (None: the released 518 rule)."""
    if mode not in MODES:
        raise InputError(f"preprocessing mode must be one of {MODES}, got {mode!r}")
    out_h, out_w = (TARGET_SIZE, TARGET_SIZE) if size is None else check_size(size)
    if width <= 0 or height <= 0:
        raise InputError(f"image size {width}x{height} has no pixels")
    # "pad" fits the whole image: the side that reaches the target first decides the scale.
    if mode == "crop" or width * out_h >= height * out_w:
        new_w, new_h = out_w, max(PATCH_SIZE, _round_to_patch(height * (out_w / width)))
    else:
        new_w, new_h = max(PATCH_SIZE, _round_to_patch(width * (out_h / height))), out_h
    if new_h * new_w > MAX_IMAGE_PIXELS:
        raise ResourceError(f"a {width}x{height} image would be resized to {new_w}x{new_h} before cropping, above "
                            f"the limit of {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels (its aspect ratio is too extreme; "
                            "crop it first, or use --mode pad)")
    crop_top = max(new_h - out_h, 0) // 2
    if mode == "crop" and size is None:
        return ResizePlan((new_h, new_w), crop_top, 0, 0, (min(new_h, out_h), new_w))
    pad_top, pad_left = max(out_h - new_h, 0) // 2, max(out_w - new_w, 0) // 2
    return ResizePlan((new_h, new_w), crop_top, pad_top, pad_left, (out_h, out_w))


def native_size(config) -> tuple[int, int] | None:
    """The (H, W) a model's images are preprocessed to: its config's native size; None (the released
    518 rule) for models that name none, e.g. VGGT-1B."""
    return tuple(config.image_size) if config.image_size else None


def _unreadable(path: Path, exc: Exception) -> InputError:
    return InputError(f"not a readable image: {path} ({type(exc).__name__})")


def _too_large(path: Path, pixels: int) -> ResourceError:
    return ResourceError(f"{path} declares {pixels / 1e6:.0f} megapixels, above the limit of "
                         f"{MAX_IMAGE_PIXELS / 1e6:.0f} (data.images.MAX_IMAGE_PIXELS; a decompression bomb, or a "
                         "picture to downscale first)")


def open_image(path) -> Image.Image:
    """An image file, opened (header read, pixels not decoded yet); InputError naming the file if it is
    unreadable, ResourceError if it declares more than MAX_IMAGE_PIXELS pixels."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    try:
        with warnings.catch_warnings():  # PIL warns from 89 M pixels; the limit here decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as exc:  # PIL's own limit, twice its warning threshold
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_large(path, int(declared.group(1)) if declared else 2 * Image.MAX_IMAGE_PIXELS) from None
    except (UnidentifiedImageError, OSError) as exc:
        raise _unreadable(path, exc) from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise _too_large(path, width * height)
    return image


def image_size(path) -> tuple[int, int]:
    """(width, height) of an image file, from its header; InputError naming the file if unreadable."""
    with open_image(path) as image:
        return image.size


def open_rgb(path) -> Image.Image:
    """An image file as RGB, alpha composited on white; InputError naming the file if unreadable."""
    image = open_image(path)
    try:
        image.load()
    except OSError as exc:  # e.g. a truncated file: the header was fine, the pixels are not
        raise _unreadable(Path(path), exc) from None
    if image.mode == "RGBA":
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    return image.convert("RGB")


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """torchvision's ToTensor for an RGB uint8 image: [3, H, W] float32 = value / 255."""
    array = np.asarray(image, dtype=np.uint8).astype(np.float32) / np.float32(255)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _pad_centered(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    pad_h, pad_w = height - image.shape[1], width - image.shape[2]
    if pad_h <= 0 and pad_w <= 0:
        return image
    top, left = pad_h // 2, pad_w // 2
    return torch.nn.functional.pad(image, (left, pad_w - left, top, pad_h - top), value=1.0)


def preprocess_image(image: Image.Image, mode: str = "crop", size: tuple[int, int] | None = None) -> torch.Tensor:
    """One RGB PIL image -> [3, H, W] in [0, 1] (before batch padding)."""
    plan = plan_preprocessing(image.width, image.height, mode, size)
    new_h, new_w = plan.resized_hw
    tensor = _to_tensor(image.resize((new_w, new_h), Image.Resampling.BICUBIC))
    if new_h > plan.output_hw[0]:
        tensor = tensor[:, plan.crop_top : plan.crop_top + plan.output_hw[0], :]
    return _pad_centered(tensor, *plan.output_hw)


def load_and_preprocess_images(image_path_list, mode: str = "crop", size: tuple[int, int] | None = None) -> torch.Tensor:
    """Image files -> [N, 3, H, W] float32 in [0, 1], as the released VGGT preprocessing; `size` (H, W):
    exactly that size (see the module docstring)."""
    paths = list(image_path_list)
    if not paths:
        raise InputError("no images given (at least one is required)")
    if mode not in MODES:
        raise InputError(f"preprocessing mode must be one of {MODES}, got {mode!r}")
    for path in paths:  # every size limit checked from the headers, before any pixel is decoded
        plan_preprocessing(*image_size(path), mode, size)
    images = [preprocess_image(open_rgb(path), mode, size) for path in paths]
    shapes = {tuple(image.shape[1:]) for image in images}
    if len(shapes) > 1:
        logger.warning("images have different sizes %s; padding with white to the largest", sorted(shapes))
        height = max(shape[0] for shape in shapes)
        width = max(shape[1] for shape in shapes)
        images = [_pad_centered(image, height, width) for image in images]
    return torch.stack(images)
