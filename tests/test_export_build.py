"""`build` end to end on a small checkpoint: stages, skip when up to date, resume, summary; and the
one-line errors of the deployment commands."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from qvggt_export.build import BuildConfig, build
from qvggt_export.cli import main
from qvggt_export.model import save_vggt

from export_helpers import IMAGE_SIZE, exported_tiny, tiny_float_model


@pytest.mark.slow
def test_build_runs_skips_and_resumes(tmp_path):
    checkpoint = save_vggt(tiny_float_model(), tmp_path / "tiny.safetensors")
    config = BuildConfig(precision="w4a16", checkpoint=str(checkpoint), out=str(tmp_path / "out"), method="rtn",
                         calib_scenes=1, calib_frames=2, image_size=IMAGE_SIZE, max_frames=8, compare_scenes=1,
                         compare_frames=2, backend="tensorrt-rtx")
    pytest.importorskip("tensorrt_rtx")
    first = build(config)
    out = tmp_path / "out"
    assert first["compare"]["passed"]
    assert first["engine"]["built"] and (out / "model.qdq.engine").stat().st_size > 0
    assert set(first["files"]) == {"quantized.safetensors", "model.onnx", "model.ort.onnx", "model.qdq.onnx"}
    assert all(status.startswith("ran") for status in first["stages"].values())
    onnx_bytes = (out / "model.onnx").read_bytes()

    second = build(config)
    assert all(status.startswith("skipped") for status in second["stages"].values())

    # A lost artifact (or a run killed before writing it) is redone, and only what depends on it.
    (out / "model.ort.onnx").unlink()
    third = build(config)
    ran = {k for k, v in third["stages"].items() if v.startswith("ran")}
    assert ran == {"lower-ort"}
    assert (out / "model.onnx").read_bytes() == onnx_bytes
    assert json.loads((out / "summary.json").read_text())["stages"] == third["stages"]
    assert not list(out.glob(".*.tmp")) and not list(out.glob(".model.onnx.*"))


def _run(args):
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


def test_cli_one_line_errors(tmp_path_factory, tmp_path):
    _, onnx_path = exported_tiny(tmp_path_factory)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(onnx_path.read_bytes()[:5000])
    image = tmp_path / "view.png"
    from PIL import Image

    Image.new("RGB", (640, 480), (120, 30, 200)).save(image)
    cases = [
        (["compare", str(truncated)], "not a readable ONNX model"),
        (["engine", str(truncated), "--backend", "tensorrt-rtx"], "not a readable ONNX model"),
        # The model is fixed to 28x518 (its views are preprocessed to that unless --image-size says otherwise).
        (["infer", str(onnx_path), str(image), "--image-size", "392x518", "--out", str(tmp_path / "p.npz")],
         "is fixed to 28x518"),
        (["infer", str(onnx_path), str(image), "--out", str(tmp_path / "p.txt")], "must be an .npz"),
    ]
    for args, message in cases:
        code, output = _run(args)
        assert code == 2, (args, output)
        assert message in output and "Traceback" not in output
        assert len(output.strip().splitlines()) == 1, output
    assert not (tmp_path / "p.npz").exists()


def test_unwritable_output_dir_leaves_nothing(tmp_path_factory, tmp_path):
    _, onnx_path = exported_tiny(tmp_path_factory)
    # A file where the output folder should be: unwritable even for root (chmod is not).
    blocker = tmp_path / "engines"
    blocker.write_text("not a folder")
    code, output = _run(["engine", str(onnx_path), "--backend", "tensorrt-rtx", "--out",
                         str(blocker / "model.engine")])
    if "TensorRT for RTX is not installed" not in output:
        assert code == 2 and "cannot write" in output and len(output.strip().splitlines()) == 1, output
    assert blocker.read_text() == "not a folder" and list(tmp_path.iterdir()) == [blocker]


def test_missing_tensorrt_is_one_line(tmp_path_factory):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip(reason="standard TensorRT is installed here")
    _, onnx_path = exported_tiny(tmp_path_factory)
    code, output = _run(["engine", str(onnx_path), "--backend", "tensorrt"])
    assert code == 2 and "standard TensorRT is not installed" in output
    assert len(output.strip().splitlines()) == 1 and "Traceback" not in output
    assert not onnx_path.with_suffix(".engine").exists()


def test_infer_onnx_matches_predict(tmp_path_factory, tmp_path):
    """`infer` on the ONNX gives `predict`'s outputs (same preprocessing, extrinsic/intrinsic included)."""
    import numpy as np
    from PIL import Image

    from qvggt_export.data.images import load_and_preprocess_images
    from qvggt_export.inference import run_model

    model, onnx_path = exported_tiny(tmp_path_factory)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"view{i}.png")
        Image.fromarray(rng.integers(0, 255, (56, 1036, 3), dtype=np.uint8)).save(paths[-1])
    out = tmp_path / "preds.npz"
    code, output = _run(["infer", str(onnx_path), *map(str, paths), "--out", str(out)])
    assert code == 0, output
    got = dict(np.load(out))
    expected = run_model(model, load_and_preprocess_images([str(p) for p in paths]))
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].shape == value.shape, key
        finite = value[np.isfinite(value)]  # a random model can predict fov 0: focal inf in both
        span = float(finite.max() - finite.min()) or 1.0
        np.testing.assert_allclose(got[key], value, rtol=0, atol=1e-3 * span, err_msg=key)


def test_compare_cli_exit_codes(tmp_path_factory, tmp_path):
    """Exit 0 against the checkpoint the ONNX came from, 1 against another model (Polygraphy's convention)."""
    from qvggt_export.model import save_quantized

    model, onnx_path = exported_tiny(tmp_path_factory)
    quantized = save_quantized(model, tmp_path / "q.safetensors")
    other = save_vggt(tiny_float_model(seed=5), tmp_path / "other.safetensors")
    report = tmp_path / "compare.json"
    code, output = _run(["compare", str(onnx_path), "--reference", "torch-quantized", "--checkpoint", str(quantized),
                         "--scenes", "1", "--frames", "2", "--report", str(report)])
    assert code == 0, output
    assert json.loads(report.read_text())["passed"] is True
    code, output = _run(["compare", str(onnx_path), "--reference", "torch", "--checkpoint", str(other),
                         "--scenes", "1", "--frames", "2"])
    assert code == 1 and "compare FAILED" in output
