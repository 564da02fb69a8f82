"""Preprocessing parity with the released `load_and_preprocess_images`, and bad-input errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qvggt_export.data.images import load_and_preprocess_images, plan_preprocessing
from qvggt_export.errors import InputError

FIXTURES = Path(__file__).parent / "fixtures" / "preprocess"
IMAGES = [FIXTURES / f"img{i}.png" for i in range(3)]  # RGB 400x300, RGBA 360x480, L 200x200


@pytest.fixture(scope="module")
def expected():
    stored = np.load(FIXTURES / "expected_uint8.npz")
    return {key: stored[key].astype(np.float32) / np.float32(255) for key in stored}


@pytest.mark.parametrize(
    "key, paths, mode",
    [("crop_single0", IMAGES[:1], "crop"), ("crop_batch", IMAGES, "crop"), ("pad_batch", IMAGES, "pad")],
)
def test_matches_released_preprocessing(expected, key, paths, mode):
    images = load_and_preprocess_images([str(p) for p in paths], mode=mode)
    assert images.dtype == torch.float32
    assert images.shape == expected[key].shape
    # Same PIL bicubic resize and ToTensor arithmetic: the outputs are bit-identical.
    assert np.abs(images.numpy() - expected[key]).max() <= 1e-6


@pytest.mark.parametrize(
    "size, mode, resized_hw, output_hw",
    [
        ((640, 480), "crop", (392, 518), (392, 518)),  # 388.5 -> 392 (multiple of 14)
        ((300, 600), "crop", (1036, 518), (518, 518)),  # tall: centre crop
        # 259 / 14 = 18.5 rounds half to even (18), as Python's round in the released code.
        ((300, 600), "pad", (518, 252), (518, 518)),
        ((600, 300), "pad", (252, 518), (518, 518)),
    ],
)
def test_plan_sizes(size, mode, resized_hw, output_hw):
    plan = plan_preprocessing(*size, mode)
    assert plan.resized_hw == resized_hw and plan.output_hw == output_hw


def test_tall_image_is_centre_cropped(tmp_path):
    # Rows are coloured by their index so that the crop offset is visible in the output.
    rows = np.repeat(np.linspace(0, 255, 600).astype(np.uint8)[:, None], 300, 1)
    Image.fromarray(np.stack([rows] * 3, -1)).save(tmp_path / "tall.png")
    image = load_and_preprocess_images([tmp_path / "tall.png"])[0, 0]
    plan = plan_preprocessing(300, 600)
    assert plan.crop_top == (1036 - 518) // 2
    # The centre row of the output is the centre row of the source: value ~ 0.5.
    assert abs(float(image[259].mean()) - 0.5) < 0.01


@pytest.mark.parametrize("name", ["missing.png", "notes.txt"])
def test_bad_files_raise_one_line_input_error_naming_the_file(tmp_path, name):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError) as info:
        load_and_preprocess_images([tmp_path / name])
    message = str(info.value)
    assert name in message and "\n" not in message


def test_empty_list_and_bad_mode_raise_input_error():
    with pytest.raises(InputError):
        load_and_preprocess_images([])
    with pytest.raises(InputError):
        load_and_preprocess_images(IMAGES[:1], mode="stretch")
