"""`evaluate` on ground-truth and perturbed predictions, and the eval / show-scene commands."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from qvggt_export.cli import main
from qvggt_export.cli.data_cmds import DATASET_CHOICES
from qvggt_export.data.readers import DATASETS, SyntheticReader
from qvggt_export.evaluate import evaluate, format_report
from qvggt_export.geometry import to_first_camera_frame

TINY_MODEL = Path(__file__).parent / "fixtures" / "vggt_tiny"


def small_reader():
    return SyntheticReader(num_views=3, max_scenes=2, image_size=(56, 84))


def ground_truth_predictor(reader, rotate_last_camera_deg: float = 0.0):
    """A predict function answering each scene's images with its ground truth (as the model would:
    world at camera 0), optionally with the last camera turned about its centre."""
    answers = {}
    for sequence in reader:
        extrinsics, points = to_first_camera_frame(sequence.extrinsics, sequence.world_points)
        angle = np.radians(rotate_last_camera_deg)
        turn = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        extrinsics[-1] = turn @ extrinsics[-1]
        answers[sequence.images.numpy().tobytes()] = {
            "extrinsic": extrinsics, "depth": 2.0 * sequence.depth[..., None], "world_points": points,
            "depth_conf": np.ones(sequence.depth.shape), "world_points_conf": np.ones(sequence.depth.shape),
        }
    return lambda images: answers[images.numpy().tobytes()]


def test_ground_truth_predictions_score_perfectly():
    reader = small_reader()
    result = evaluate(ground_truth_predictor(reader), reader, progress=False)
    json.dumps(result, allow_nan=False)  # strictly JSON-serialisable
    aggregate = result["aggregate"]
    assert aggregate["scenes"] == 2 and aggregate["pairs"] == 6
    assert aggregate["auc@30"] == 100.0 and aggregate["auc@3"] == 100.0
    assert aggregate["abs_rel"] < 1e-6 and aggregate["delta<1.25"] == 100.0  # depth off by a scale of 2
    assert aggregate["acc_mean"] < 1e-5 and aggregate["comp_mean"] < 1e-5 and aggregate["nc_mean"] > 0.999
    assert [scene["name"] for scene in result["scenes"]] == ["seed-1000000", "seed-1000001"]
    assert "mean" in format_report(result)


def test_pose_pairs_are_pooled_hand_computed():
    # Per scene, pairs (0,2) and (1,2) err 10.5 degrees, (0,1) none: AUC@30 = (10/3 + 20) / 30.
    reader = small_reader()
    result = evaluate(ground_truth_predictor(reader, rotate_last_camera_deg=10.5), reader, progress=False)
    expected = 100 * (10 / 3 + 20) / 30
    assert result["groups"]["synthetic-val"]["auc@30"] == pytest.approx(expected)
    assert result["aggregate"]["auc@30"] == pytest.approx(expected)
    assert result["aggregate"]["rotation_error_deg"] == pytest.approx(7.0, abs=1e-3)


def test_eval_command_runs_a_model_on_synthetic_val(tmp_path):
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["eval", "--checkpoint", str(TINY_MODEL), "--max-scenes", "1", "--frames", "2",
                                       "--image-size", "56x84", "--json", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "seed-1000000" in result.output and "mean" in result.output
    saved = json.loads(out.read_text())
    assert saved["dataset"] == "synthetic-val" and len(saved["scenes"]) == 1
    assert 0.0 <= saved["aggregate"]["auc@30"] <= 100.0 and saved["aggregate"]["acc_mean"] > 0


def assert_one_line_error(result, fragment):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    # Log lines (e.g. a skipped sequence being reported) may precede it; the error itself is one line.
    errors = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], result.output


@pytest.mark.parametrize(
    "arguments, fragment",
    [
        (["--dataset", "7scenes", "--root", "{tmp}/missing"], "root not found"),
        (["--dataset", "co3d", "--root", "{tmp}"], "frame_annotations.jgz"),
        (["--dataset", "nrgbd"], "--root is required"),
        (["--dataset", "folder", "--root", "{tmp}", "--frames", "5"], "no usable sequence"),
        (["--frames", "0"], "--frames must be at least 1"),
        (["--image-size", "50x84"], "multiples of 14"),
    ],
)
def test_eval_bad_input_is_one_line_exit_2(tmp_path, arguments, fragment):
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(tmp_path / "only.png")
    arguments = [a.replace("{tmp}", str(tmp_path)) for a in arguments]
    # The dataset is checked before the model loads: a missing checkpoint is never reached.
    result = CliRunner().invoke(main, ["eval", "--checkpoint", str(tmp_path / "none.safetensors"), *arguments])
    assert_one_line_error(result, fragment)


def test_cli_dataset_choices_match_the_readers():
    assert DATASET_CHOICES == DATASETS


def test_show_scene_writes_a_png_of_views_and_depth(tmp_path):
    out = tmp_path / "figures" / "scene.png"
    result = CliRunner().invoke(main, ["show-scene", "--seed", "3", "--views", "3", "--image-size", "56x84",
                                       "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        width, height = image.size
    assert image.format == "PNG" and width > 2 * height  # three views side by side, two rows
