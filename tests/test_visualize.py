"""Reconstructions for 3D tools (`--ply`, `--glb` of predict, infer, eval) loaded back with trimesh, and
report.html (compare, build) parsed back: every image decodes, the tables hold the run's numbers."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from qvggt_export.cli import main
from qvggt_export.geometry import closed_form_inverse_se3, unproject_depth_map_to_point_map

from export_helpers import IMAGE_SIZE, exported_tiny, tiny_float_model

trimesh = pytest.importorskip("trimesh")


def _run(args):
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


def _expected_cloud(preds, images, percentile):
    """The released demo's filter written out: depth unprojected through the predicted cameras, kept where
    the depth confidence reaches the percentile (and exceeds 1e-5); colours are the input pixels."""
    points = unproject_depth_map_to_point_map(preds["depth"], preds["extrinsic"], preds["intrinsic"])
    conf = preds["depth_conf"]
    keep = (conf >= np.percentile(conf, percentile)) & (conf > 1e-5)
    colors = np.round(np.asarray(images).transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    return points[keep], colors[keep]


def _check_ply(path, points, colors):
    cloud = trimesh.load(path)
    assert isinstance(cloud, trimesh.PointCloud)
    assert len(cloud.vertices) == len(points) > 0
    np.testing.assert_allclose(cloud.vertices, points, atol=1e-4)
    for i in np.linspace(0, len(points) - 1, 7).astype(int):  # a few points: their input pixel's colour
        assert tuple(cloud.colors[i, :3]) == tuple(colors[i])


def _check_glb(path, points, preds):
    scene = trimesh.load(path)
    cameras = sorted(name for name in scene.geometry if name.startswith("camera_"))
    assert cameras == [f"camera_{i:03d}" for i in range(len(preds["extrinsic"]))]
    assert len(scene.geometry["points"].vertices) == len(points)
    centres = closed_form_inverse_se3(np.asarray(preds["extrinsic"], np.float64))[:, :3, 3]
    for name, centre in zip(cameras, centres):  # every frustum's apex is its camera's centre
        vertices = scene.geometry[name].vertices
        assert np.min(np.linalg.norm(vertices - centre, axis=1)) < 1e-4
        assert scene.graph[name][0][1, 1] == -1  # OpenCV -> glTF (y up) on the node, vertices untouched


def test_predict_writes_ply_and_glb(tmp_path):
    """The embedded model on a rendered scene: PLY and GLB hold the percentile-filtered points in their
    input colours, and the GLB one frustum per view, at the predicted camera centres."""
    out, ply, glb = tmp_path / "preds.npz", tmp_path / "scene.ply", tmp_path / "scene.glb"
    code, output = _run(["predict", "--scene", "synthetic:1000000", "--views", "3", "-o", str(out),
                         "--ply", str(ply), "--glb", str(glb), "--conf-percentile", "30"])
    assert code == 0, output
    preds = dict(np.load(out))
    points, colors = _expected_cloud(preds, preds["images"], 30)
    assert len(points) < preds["depth_conf"].size  # the filter dropped points
    _check_ply(ply, points, colors)
    _check_glb(glb, points, preds)


def test_eval_writes_one_file_per_scene(tmp_path):
    ply = tmp_path / "eval.ply"
    code, output = _run(["eval", "--dataset", "synthetic-val", "--max-scenes", "2", "--frames", "2",
                         "--ply", str(ply), "--conf-percentile", "0"])
    assert code == 0, output
    written = sorted(tmp_path.glob("eval-*.ply"))
    assert len(written) == 2 and not ply.exists()
    for path in written:  # percentile 0 keeps every point of 2 views
        assert len(trimesh.load(path).vertices) == 2 * 84 * 112


def test_a_missing_trimesh_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "trimesh", None)
    code, output = _run(["predict", "--scene", "synthetic:0", "-o", str(tmp_path / "p.npz"),
                         "--glb", str(tmp_path / "p.glb")])
    assert code == 2 and len(output.strip().splitlines()) == 1, output
    assert 'pip install "qvggt-export[viz]"' in output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, fragment", [
    (["predict", "--scene", "synthetic:0", "--ply", "x.ply", "--conf-percentile", "100"], "'--conf-percentile'"),
    (["predict", "--scene", "synthetic:0", "--glb", "x.glb", "--conf-percentile", "-1"], "'--conf-percentile'"),
    (["predict", "--scene", "synthetic:0", "--ply", "x.obj"], "--ply must name a .ply file"),
    (["predict", "--scene", "synthetic:0", "--glb", "blocker/x.glb"], "cannot write"),
    (["eval", "--ply", "blocker/x.ply"], "cannot write"),
    (["infer", "model.onnx", "view.png", "--glb", "x.ply"], "--glb must name a .glb file"),
    (["compare", "model.onnx", "--report", "blocker/compare.json"], "cannot write"),
])
def test_bad_reconstruction_options_are_one_error_line(tmp_path, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 48)).save(tmp_path / "view.png")
    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "blocker").write_text("a file where a folder should be")
    code, output = _run(args)
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "model.onnx", "view.png"]


class _Page(HTMLParser):
    """Images (their bytes) and tables (id -> rows of cell texts) of an HTML page."""

    def __init__(self):
        super().__init__()
        self.images, self.tables, self.scripts = [], {}, 0
        self._table = self._row = self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            prefix = "data:image/png;base64,"
            assert attrs["src"].startswith(prefix), attrs["src"][:40]
            self.images.append(base64.b64decode(attrs["src"][len(prefix):], validate=True))
        elif tag == "script":
            self.scripts += 1
        elif tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr":
            self._table.append(self._row)
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _parse(path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    for data in page.images:
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG"
            image.load()  # decodes every pixel
            assert min(image.size) >= 32
    assert page.scripts == 0
    return page


def _check_pose_table(page, result):
    from qvggt_export.report import GEOMETRY_COLUMNS

    rows = page.tables["pose-errors"]
    assert [r[0] for r in rows[1:]] == [f"scene {s['scene']}" for s in result["scenes"]]
    for row, scene in zip(rows[1:], result["scenes"]):
        for cell, (key, _) in zip(row[1:], GEOMETRY_COLUMNS):
            assert float(cell) == pytest.approx(scene["geometry"][key], rel=1e-3, abs=1e-9), key


def _check_polygraphy_table(page, result):
    rows = {r[0]: r for r in page.tables["polygraphy"][1:]}
    assert set(rows) == set(result["atol"])
    for name, row in rows.items():
        assert float(row[1]) == pytest.approx(result["atol"][name], rel=1e-3)
        assert row[-1] == ("yes" if result["polygraphy_outputs"][name]["passed"] else "no")


def test_compare_and_infer_on_an_exported_model(tmp_path_factory, tmp_path):
    """`compare --report`: report.html beside compare.json (no calibration: no sensitivity figure; two
    pictures per scene); `infer --glb` on the same graph."""
    from qvggt_export.model import save_quantized

    model, onnx_path = exported_tiny(tmp_path_factory)
    quantized = save_quantized(model, tmp_path / "q.safetensors")
    report = tmp_path / "out" / "compare.json"
    code, output = _run(["compare", str(onnx_path), "--checkpoint", str(quantized), "--scenes", "2", "--frames", "2",
                         "--report", str(report)])
    assert code == 0, output
    result = json.loads(report.read_text())
    page = _parse(report.with_name("report.html"))
    assert len(page.images) == 2 * len(result["scenes"])
    _check_pose_table(page, result)
    _check_polygraphy_table(page, result)
    plan = dict(page.tables["plan"][1:])
    assert plan["protected blocks (fp16)"] == ", ".join(model.quant_plan["protected_blocks"])
    assert "sizes" in page.tables and float(page.tables["files"][1][1]) == pytest.approx(
        onnx_path.stat().st_size / 1e6, rel=1e-3)

    rng = np.random.default_rng(0)
    views = []
    for i in range(2):
        views.append(tmp_path / f"view{i}.png")
        Image.fromarray(rng.integers(0, 255, (56, 1036, 3), dtype=np.uint8)).save(views[-1])
    preds_path, glb = tmp_path / "preds.npz", tmp_path / "infer.glb"
    code, output = _run(["infer", str(onnx_path), *map(str, views), "--out", str(preds_path), "--glb", str(glb)])
    assert code == 0, output
    from qvggt_export.data.images import load_and_preprocess_images

    preds = dict(np.load(preds_path))
    points, _ = _expected_cloud(preds, load_and_preprocess_images([str(p) for p in views]).numpy(), 50)
    _check_glb(glb, points, preds)


def test_build_report_is_a_compare_stage_output(tmp_path):
    """An fp16 build draws report.html (the torch reference is full precision: drawn as such); a lost
    report reruns the compare stage alone, and a rerun with everything present skips every stage."""
    from qvggt_export.build import BuildConfig, build
    from qvggt_export.model import save_vggt

    checkpoint = save_vggt(tiny_float_model(), tmp_path / "tiny.safetensors")
    config = BuildConfig(precision="fp16", checkpoint=str(checkpoint), out=str(tmp_path / "out"),
                         image_size=IMAGE_SIZE, max_frames=4, compare_scenes=1, compare_frames=2, backend="none")
    first = build(config)
    report = tmp_path / "out" / "report.html"
    assert first["report"] == str(report)
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    page = _parse(report)
    assert len(page.images) == 2
    _check_pose_table(page, result)
    _check_polygraphy_table(page, result)
    sizes = {r[0]: r for r in page.tables["sizes"][1:]}
    assert float(sizes["total"][1]) == pytest.approx(first["deployable_bytes"]["total"]["deployed"] / 1e6, rel=1e-3)
    files = dict(page.tables["files"][1:])
    assert float(files["model.onnx"]) == pytest.approx(first["files"]["model.onnx"] / 1e6, rel=1e-3)

    report.unlink()
    second = build(config)
    assert {k for k, v in second["stages"].items() if v.startswith("ran")} == {"compare"}
    assert _parse(report).tables["pose-errors"] == page.tables["pose-errors"]
    third = build(config)
    assert all(v.startswith("skipped") for v in third["stages"].values())


def test_build_report_draws_full_precision_against_the_deployed_model(tmp_path):
    """What `build` gives write_reports for a quantized model: the full-precision outputs are drawn and
    measured against the candidate in a table of their own; the sensitivity figure and plan are shown."""
    from qvggt_export.compare import compare, geometry_report, synthetic_inputs, write_reports
    from qvggt_export.export import spec
    from qvggt_export.inference import run_model

    from export_helpers import tiny_quantized_model

    import torch

    quantized, fp = tiny_quantized_model(), tiny_float_model()
    inputs = synthetic_inputs(IMAGE_SIZE, scenes=1, frames=3)
    outputs = []
    result = compare(quantized, quantized, inputs, outputs_out=outputs)
    fp_preds = run_model(fp, torch.from_numpy(inputs[0][spec.INPUT_NAME][0]))
    fp_outputs = [{k: fp_preds[k][None] for k in spec.OUTPUT_NAMES}]
    figure = tmp_path / "sensitivity.png"
    Image.new("RGB", (320, 200), (200, 40, 40)).save(figure)
    json_path, html_path = write_reports(tmp_path / "compare.json", result, inputs, outputs,
                                         ("full precision (PyTorch)", "w4a16"), fp_outputs,
                                         sensitivity_png=figure, plan=quantized.quant_plan)
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(result))
    page = _parse(html_path)
    assert page.images[0] == figure.read_bytes() and len(page.images) == 3
    drawn = geometry_report(outputs[0]["candidate"], fp_outputs[0])
    row = page.tables["drawn-errors"][1]
    assert float(row[1]) == pytest.approx(drawn["rotation_error_deg"], rel=1e-3)
    assert drawn["rotation_error_deg"] > 1e-2 > result["scenes"][0]["geometry"]["rotation_error_deg"]
