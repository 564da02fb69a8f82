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


@pytest.mark.parametrize(
    "source, mode, resized_hw, crop_top, pad_top, pad_left",
    [
        ((400, 300), "crop", (84, 112), 0, 0, 0),  # the native 3:4 aspect: a plain resize
        ((640, 360), "crop", (56, 112), 0, 14, 0),  # 63 rows round (half to even) to 56: white-padded to 84
        ((300, 400), "crop", (154, 112), 35, 0, 0),  # portrait: centre-cropped to 84 rows
        ((300, 400), "pad", (84, 56), 0, 0, 28),  # portrait fitted inside 84x112
        ((640, 360), "pad", (56, 112), 0, 14, 0),
    ],
)
def test_plan_to_a_native_size_gives_exactly_that_size(source, mode, resized_hw, crop_top, pad_top, pad_left):
    plan = plan_preprocessing(*source, mode, size=(84, 112))
    assert (plan.resized_hw, plan.crop_top, plan.pad_top, plan.pad_left) == (resized_hw, crop_top, pad_top, pad_left)
    assert plan.output_hw == (84, 112)


def test_native_size_is_exact_and_518x518_pad_is_the_released_rule(expected, tmp_path):
    images = load_and_preprocess_images([str(p) for p in IMAGES], mode="pad", size=(518, 518))
    assert np.abs(images.numpy() - expected["pad_batch"]).max() <= 1e-6
    cropped = load_and_preprocess_images([str(p) for p in IMAGES], mode="crop", size=(84, 112))
    assert cropped.shape == (3, 3, 84, 112)
    # Exact-size "crop" of the 4:3 image is the released resize at width 112, nothing else.
    with Image.open(IMAGES[0]) as image:
        resized = np.asarray(image.convert("RGB").resize((112, 84), Image.Resampling.BICUBIC), np.float32) / 255
    assert np.abs(cropped[0].numpy().transpose(1, 2, 0) - resized).max() <= 1e-6
    with pytest.raises(InputError):
        load_and_preprocess_images(IMAGES[:1], size=(84, 100))


def test_models_without_a_native_size_keep_the_released_518_rule():
    from qvggt_export.data.images import native_size
    from qvggt_export.model import VGGTConfig
    from qvggt_export.model.presets import PRESETS

    assert native_size(VGGTConfig()) is None  # VGGT-1B
    assert plan_preprocessing(640, 480, "crop", native_size(VGGTConfig())).output_hw == (392, 518)
    assert native_size(VGGTConfig(**PRESETS["vggt-tiny"])) == (84, 112)
