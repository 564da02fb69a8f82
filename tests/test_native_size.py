"""`predict` (PyTorch) and `infer` (the exported ONNX) of the default model preprocess a user's photos to
the model's native size, so they agree on photos of any size."""

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from qvggt_export.cli import main
from qvggt_export.export.onnx_export import export_onnx
from qvggt_export.export.spec import ExportConfig
from qvggt_export.model import load_model

# (width, height): landscape 4:3 (the native aspect), wide 16:9, portrait 3:4
PHOTO_SIZES = [(400, 300), (640, 360), (300, 400)]


def write_photos(folder) -> list[str]:
    """Smooth colour gradients with a checker pattern: photo-like enough for bicubic resizing."""
    paths = []
    for index, (width, height) in enumerate(PHOTO_SIZES):
        ys, xs = np.mgrid[0:height, 0:width] / max(width, height)
        checker = ((np.floor(xs * 12 + index) + np.floor(ys * 12)) % 2) * 60
        rgb = np.stack([xs * 180 + checker, ys * 180 + checker, (1 - xs) * 150 + 40], -1)
        paths.append(str(folder / f"photo{index}.jpg"))
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(paths[-1], quality=95)
    return paths


def run(args) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow  # one export of the default model (~20 s on 2 busy cores)
def test_infer_and_predict_agree_on_photos_of_different_sizes(tmp_path):
    model = load_model(None)
    native = model.config.default_image_size
    assert native == (84, 112)
    onnx_path = export_onnx(model, tmp_path / "model.onnx", ExportConfig(
        precision="fp32", image_size=native, min_frames=1, opt_frames=3, max_frames=4, validate=False))
    photos = write_photos(tmp_path)
    run(["predict", *photos, "--out", str(tmp_path / "predict.npz")])
    run(["infer", str(onnx_path), *photos, "--out", str(tmp_path / "infer.npz")])
    predicted, inferred = dict(np.load(tmp_path / "predict.npz")), dict(np.load(tmp_path / "infer.npz"))
    assert predicted["depth"].shape == (len(photos), *native, 1)
    assert set(predicted) == set(inferred)
    for key, value in predicted.items():
        assert inferred[key].shape == value.shape, key
        span = float(value.max() - value.min()) or 1.0
        np.testing.assert_allclose(inferred[key], value, rtol=0, atol=1e-4 * span, err_msg=key)


def test_image_size_overrides_the_native_size(tmp_path):
    photos = write_photos(tmp_path)[:2]
    run(["predict", *photos, "--image-size", "56x84", "--out", str(tmp_path / "small.npz")])
    assert np.load(tmp_path / "small.npz")["depth"].shape == (2, 56, 84, 1)
