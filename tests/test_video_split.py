"""The synthetic-video split (video-like cameras) through the reader, `eval --dataset` and `predict --scene`."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from qvggt_export.cli import main
from qvggt_export.data.readers import open_dataset
from qvggt_export.data.synthetic import SYNTHETIC_VIDEO, render_scene
from qvggt_export.errors import InputError
from qvggt_export.metrics import camera_pose_metrics
from qvggt_export.predict import parse_scene

TINY_MODEL = Path(__file__).parent / "fixtures" / "vggt_tiny"


def test_reader_renders_the_split_with_video_cameras():
    (sequence,) = list(open_dataset("synthetic-video", frames=3, max_scenes=1, image_size=(28, 42)))
    truth = render_scene(SYNTHETIC_VIDEO.seeds[0], 3, (28, 42), "video")
    assert sequence.name == f"seed-{SYNTHETIC_VIDEO.seeds[0]}" and sequence.group == "synthetic-video"
    np.testing.assert_array_equal(sequence.images.numpy(), truth.images)
    np.testing.assert_array_equal(sequence.extrinsics, truth.extrinsics.astype(np.float64))
    arc = render_scene(SYNTHETIC_VIDEO.seeds[0], 3, (28, 42))
    assert np.abs(sequence.extrinsics - arc.extrinsics).max() > 0.1
    assert len(open_dataset("synthetic-video").sources) == len(SYNTHETIC_VIDEO.seeds)


def test_eval_command_on_synthetic_video(tmp_path):
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["eval", "-c", str(TINY_MODEL), "--dataset", "synthetic-video", "--max-scenes",
                                       "1", "--frames", "2", "--image-size", "56x84", "--json", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["dataset"] == "synthetic-video" and [s["name"] for s in saved["scenes"]] == ["seed-1000100"]


@pytest.mark.parametrize("spec, expected", [("synthetic:5", (5, "arc")), ("synthetic-video:1000100", (1000100, "video")),
                                            ("synthetic-pan:3", (3, "pan"))])
def test_scene_spec(spec, expected):
    assert parse_scene(spec) == expected


@pytest.mark.parametrize("spec", ["synthetic-spiral:3", "synthetic-:3", "video:3", "synthetic-video:x"])
def test_bad_scene_spec(spec):
    with pytest.raises(InputError, match="synthetic-TRAJECTORY:SEED"):
        parse_scene(spec)


def test_predict_on_a_video_scene_prints_the_identity_baseline(tmp_path):
    out = tmp_path / "scene.npz"
    result = CliRunner().invoke(main, ["predict", "--scene", "synthetic-orbit:7", "--views", "3", "--image-size",
                                       "28x42", "-c", str(TINY_MODEL), "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "(orbit cameras)" in result.output
    scene = render_scene(7, 3, (28, 42), "orbit").in_first_camera_frame()
    identity = camera_pose_metrics(np.tile(np.eye(3, 4), (3, 1, 1)), scene.extrinsics)
    line = next(line for line in result.output.splitlines() if "identity-pose baseline" in line)
    assert f"rotation_error_deg {identity['rotation_error_deg']:.4f}" in line and identity["rotation_error_deg"] > 3
    np.testing.assert_allclose(np.load(out)["gt_extrinsic"], scene.extrinsics)
