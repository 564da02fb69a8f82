"""scripts/train_tiny.py: a run cut and resumed from its saved state equals the uninterrupted run; SIGTERM saves
the state; curves are written; the curriculum and resume arguments are checked."""

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_tiny.py"
spec = importlib.util.spec_from_file_location("train_tiny", SCRIPT)
train_tiny = importlib.util.module_from_spec(spec)
sys.modules["train_tiny"] = train_tiny  # so that --prerender's worker processes find its functions
spec.loader.exec_module(train_tiny)

SMALL = json.dumps({"depth": 2, "intermediate_layer_idx": [0, 1, 0, 1], "camera_trunk_depth": 1})


def small_run(tmp_path, *extra):
    return ["--config", SMALL, "--height", "28", "--width", "42", "--num-scenes", "3", "--threads", "1",
            "--warmup", "2", "--steps", "6", "--cache-dir", str(tmp_path / "cache"), "--eval-scenes", "1",
            "--stages", "0:video:2:2,3:mix:3:1", *extra]


def test_resumed_run_equals_the_uninterrupted_run(tmp_path):
    train_tiny.main(small_run(tmp_path, "--prerender", "0:3", "--workers", "2"))  # every run reads the same files
    cached = sorted(p.relative_to(tmp_path / "cache").as_posix() for p in (tmp_path / "cache").rglob("*.npz"))
    # video seeds 0-2, mix adds the odd seed 1 as an arc; one dev scene per dev trajectory.
    assert cached == ["28x42/1.npz", "28x42/999984.npz", "28x42/video/0.npz", "28x42/video/1.npz",
                      "28x42/video/2.npz", "28x42/video/999984.npz"]
    whole = train_tiny.main(small_run(tmp_path, "--out", str(tmp_path / "whole.safetensors")))
    state = str(tmp_path / "state.pt")
    train_tiny.main(small_run(tmp_path, "--stop-step", "4", "--state", state, "--eval-every", "2",
                              "--curves", str(tmp_path / "curves.json")))
    part = json.loads((tmp_path / "curves.json").read_text())
    assert [e["step"] for e in part["evals"]] == [2, 4] and (tmp_path / "curves.png").stat().st_size > 10_000
    assert set(part["evals"][0]) >= {"video", "arc"} and part["evals"][0]["video"]["id_rot_err"] > 0
    resumed = train_tiny.main(["--resume", "--state", state, "--threads", "1",
                               "--out", str(tmp_path / "resumed.safetensors")])
    assert resumed["steps_done"] == whole["steps_done"] == 6
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"]]
    a, b = load_file(tmp_path / "whole.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(resumed["sessions"]) == 2 and resumed["sessions"][1]["start_step"] == 4


def test_resume_refuses_a_changed_recipe(tmp_path, capsys):
    state = str(tmp_path / "state.pt")
    train_tiny.main(small_run(tmp_path, "--stop-step", "1", "--state", state))
    with pytest.raises(SystemExit) as exc:
        train_tiny.main(["--resume", "--state", state, "--lr", "0.1"])
    assert exc.value.code == 2 and "error: --lr 0.1 differs" in capsys.readouterr().err


@pytest.mark.parametrize("stages", ["0:video:2", "5:arc:2:2", "0:spiral:2:2", "0:arc:1:2"])
def test_bad_stages_are_one_line_errors(stages, capsys):
    with pytest.raises(SystemExit) as exc:
        train_tiny.main(["--stages", stages])
    assert exc.value.code == 2 and capsys.readouterr().err.startswith("error: --stages")


def test_sigterm_saves_the_state(tmp_path):
    state = tmp_path / "state.pt"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *small_run(tmp_path, "--state", str(state), "--steps",
                                                                      "100000", "--state-every", "100000")],
                            stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step "):
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0 and "signal" in output
    saved = torch.load(state, weights_only=False)
    assert saved["step"] >= 1 and saved["log"]["steps_done"] == saved["step"]


def test_warm_start_moves_the_conv_patchify_into_a_dinov2_encoder():
    from qvggt_export.model import VGGT
    from qvggt_export.model.presets import tiny_config

    small = json.loads(SMALL)
    torch.manual_seed(0)
    conv = VGGT(tiny_config(**small))
    dino = VGGT(tiny_config(**small, patch_embed="dinov2", dinov2_depth=1, dinov2_num_heads=4))
    train_tiny.init_encoder_embeddings(dino)
    assert float(dino.aggregator.patch_embed.pos_embed.detach().std()) > 0.01  # DINOv2's init, not the module's zeros
    loaded, fresh = train_tiny.warm_start(dino, conv)
    assert torch.equal(dino.aggregator.patch_embed.patch_embed.proj.weight, conv.aggregator.patch_embed.proj.weight)
    assert torch.equal(dino.camera_head.state_dict()["trunk.0.attn.qkv.weight"],
                       conv.camera_head.state_dict()["trunk.0.attn.qkv.weight"])
    assert loaded == len(conv.state_dict()) and all(n.startswith("aggregator.patch_embed.") for n in fresh)
    assert "aggregator.patch_embed.pos_embed" in fresh
    with pytest.raises(SystemExit, match="another config"):
        train_tiny.warm_start(VGGT(tiny_config(**{**small, "embed_dim": 64})), conv)


def test_freeze_keeps_the_trunk_and_its_poses_and_trains_the_dense_heads(tmp_path):
    start = tmp_path / "start.safetensors"
    train_tiny.main(small_run(tmp_path, "--steps", "2", "--out", str(start)))
    out = tmp_path / "heads.safetensors"
    train_tiny.main(small_run(tmp_path, "--init", str(start), "--freeze", "aggregator,camera_head", "--lr", "1e-2",
                              "--out", str(out)))
    before, after = load_file(start), load_file(out)
    moved = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"depth_head", "point_head"}
    # Without --freeze the same run moves the trunk: the test above is not vacuous.
    train_tiny.main(small_run(tmp_path, "--init", str(start), "--lr", "1e-2", "--out", str(out)))
    after = load_file(out)
    assert {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])} >= {"aggregator", "camera_head"}


@pytest.mark.parametrize("names", ["aggregator,track_head", "aggregator,camera_head,depth_head,point_head"])
def test_bad_freeze_is_a_one_line_error(names, capsys):
    with pytest.raises(SystemExit) as exc:
        train_tiny.main(["--freeze", names])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: --freeze") and err.count("\n") == 1


def test_kind_report_reads_each_camera_path_on_the_dev_seeds(tmp_path):
    from scipy.spatial.transform import Rotation

    checkpoint = str(tmp_path / "model.safetensors")
    train_tiny.main(small_run(tmp_path, "--steps", "1", "--out", checkpoint))
    size = ["--height", "28", "--width", "42", "--cache-dir", str(tmp_path / "cache"), "--threads", "1"]
    report = train_tiny.main(["--kind-report", checkpoint, "--eval-scenes", "2", *size])
    rows = report["rows"][checkpoint]
    assert list(rows) == ["pan", "orbit", "forward", "arc"] and report["scenes"] == [999984, 999985]
    # The identity predictor's error is each path's mean relative rotation over its pairs, recomputed here from
    # the dev scenes' own cameras: the read-out uses that kind, those seeds and the first `views` frames.
    for kind, views in train_tiny.KIND_READOUT.items():
        cache = train_tiny.SceneCache((28, 42), str(tmp_path / "cache"), kind)
        angles = []
        for seed in train_tiny.DEV_SEEDS[:2]:
            extr = train_tiny.make_sample(cache.get(seed), np.arange(views))[4]
            angles += [np.degrees(Rotation.from_matrix(extr[j, :, :3] @ extr[i, :, :3].T).magnitude())
                       for i in range(views) for j in range(i + 1, views)]
        assert rows[kind]["id_rot_err"] == pytest.approx(np.mean(angles), abs=1e-3), kind
    assert rows["arc"]["id_rot_err"] > 2 * rows["forward"]["id_rot_err"]
    for bad in (["--eval-scenes", "17"], ["--eval-scenes", "2", "--kind-report", str(tmp_path / "none")]):
        with pytest.raises(SystemExit) as exc:
            train_tiny.main(["--kind-report", checkpoint, *size, *bad])
        assert exc.value.code == 2
