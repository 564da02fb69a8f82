"""report.html: what a comparison looks like, on one self-contained page (PNG images embedded as
`data:` URIs, plain HTML tables, no JavaScript, no server).

Sections: verdict; sensitivity figure and quantization plan; per scene, every view's input, the two
depth maps (one colour scale), their difference and both confidence maps, and a top view of both point
clouds with their cameras; the pose and geometry errors (compare.json's, and those of the drawn pair
when it is not compare.json's pair); Polygraphy's per-output summary; weight bytes per part and file
sizes. `compare.write_reports` fills it for `compare` and `build`.
"""

from __future__ import annotations

import base64
import html
import time
from dataclasses import dataclass, field
from pathlib import Path

from .io import atomic_output
from .log import logger
from .visualize import DEFAULT_CONF_PERCENTILE, depth_figure, reconstruction, top_view_figure

REPORT_NAME = "report.html"
# compare.json's geometry keys, in table order, with their column titles.
GEOMETRY_COLUMNS = (("rotation_error_deg", "rotation error (deg)"), ("translation_error_deg", "translation error (deg)"),
                    ("auc@30", "AUC@30"), ("depth_abs_rel", "depth AbsRel"), ("point_error", "point error (rel.)"))
STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1250px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 1.8em; }
h3 { font-size: 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th { background: #eee; } td.name, th.name { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; }
.pass { color: #176b17; font-weight: bold; } .fail { color: #b00; font-weight: bold; }
.note { color: #666; font-size: 0.9em; }
"""


@dataclass
class ReportScene:
    """One scene as drawn: its input views and two sets of scene predictions (no batch dim, with
    extrinsic and intrinsic: inference.run_model's / graph_predictions' keys)."""

    images: object  # [S, 3, H, W] in [0, 1]
    reference: dict
    candidate: dict


@dataclass
class ReportData:
    compare: dict  # compare.json's content
    scenes: list[ReportScene]
    labels: tuple[str, str]  # (reference, candidate) as drawn
    reference_name: str | None = None  # compare.json's reference in words (its "reference" says "pytorch")
    title: str = "qvggt-export compare report"
    sensitivity_png: Path | None = None
    sensitivity_note: str = "not available"
    plan: dict | None = None
    part_bytes: dict | None = None  # model.summary.deployable_bytes
    part_bytes_source: str = ""
    files: dict[str, int] = field(default_factory=dict)
    # Errors of the drawn pair per scene (compare.geometry_report) when it is not compare.json's pair.
    drawn_geometry: list[dict] | None = None
    conf_percentile: float = DEFAULT_CONF_PERCENTILE


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="{png_uri(data)}">'


def _number(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def _table(table_id: str, header: list[str], rows: list[list], name_columns: int = 1) -> str:
    def cell(tag, i, value):
        css = ' class="name"' if i < name_columns else ""
        text = value if isinstance(value, str) else _number(value)
        return f"<{tag}{css}>{html.escape(text)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _verdict(passed: bool) -> str:
    return '<span class="pass">PASSED</span>' if passed else '<span class="fail">FAILED</span>'


def _plan_section(data: ReportData) -> str:
    parts = ["<h2>Sensitivity and plan</h2>"]
    if data.sensitivity_png is not None and Path(data.sensitivity_png).is_file():
        parts.append(_img(Path(data.sensitivity_png).read_bytes(), "per-block sensitivity"))
    else:
        parts.append(f'<p class="note">Sensitivity figure: {html.escape(data.sensitivity_note)}.</p>')
    plan = data.plan
    if not plan:
        parts.append('<p class="note">Quantization plan: none (a full-precision model).</p>')
        return "\n".join(parts)
    counts: dict[str, int] = {}
    for precision in plan.get("layers", {}).values():
        counts[precision] = counts.get(precision, 0) + 1
    criterion = plan.get("criterion") or {}
    rows = [["source", str(plan.get("source", "-"))], ["scope", str(plan.get("scope", "-"))],
            ["default precision", str(plan.get("default_precision", "-"))],
            ["protected blocks (fp16)", ", ".join(plan.get("protected_blocks", [])) or "none"],
            ["linears", ", ".join(f"{n} {p}" for p, n in sorted(counts.items())) or "-"]]
    if criterion:
        rows.append(["criterion", ", ".join(f"{k} {v}" for k, v in criterion.items())])
    parts.append(_table("plan", ["plan", "value"], rows, name_columns=2))
    return "\n".join(parts)


def _scene_section(index: int, scene: ReportScene, data: ReportData) -> str:
    labels = data.labels
    clouds = tuple(reconstruction(p, scene.images, data.conf_percentile) for p in (scene.reference, scene.candidate))
    views = len(scene.reference["depth"])
    return "\n".join([
        f"<h3>Scene {index} ({views} views)</h3>",
        _img(depth_figure(scene.images, scene.reference, scene.candidate, labels),
             f"scene {index}: input, depth, difference and confidence per view"),
        f'<p class="note">Depth maps share one colour scale (2-98th percentile of both); the difference '
        f'({html.escape(labels[1])} - {html.escape(labels[0])}) one symmetric scale over the scene\'s views; '
        f'the confidence maps one scale.</p>',
        _img(top_view_figure(clouds, labels), f"scene {index}: top view of both point clouds and cameras"),
        f'<p class="note">Top view: depth unprojected through each model\'s own cameras, in the first camera\'s '
        f'frame; points below the {data.conf_percentile:g}th confidence percentile dropped.</p>',
    ])


def _geometry_table(table_id: str, scenes: list[dict]) -> str:
    rows = [[f"scene {s['scene']}", *(s["geometry"][k] for k, _ in GEOMETRY_COLUMNS),
             "; ".join(s.get("geometry_failures", [])) or "none"] for s in scenes]
    return _table(table_id, ["scene", *(t for _, t in GEOMETRY_COLUMNS), "failures"], rows)


def _errors_section(data: ReportData) -> str:
    result = data.compare
    parts = ["<h2>Pose and geometry errors</h2>",
             f"<p>compare.json: {html.escape(Path(str(result['candidate'])).name)} measured against "
             f"{html.escape(data.reference_name or Path(str(result['reference'])).name)} (the reference's "
             f"predictions taken as ground "
             f"truth). Geometry {_verdict(result['geometry_passed'])}.</p>",
             _geometry_table("pose-errors", result["scenes"])]
    if data.drawn_geometry is not None:
        parts += [f"<p>The pair drawn above: {html.escape(data.labels[1])} measured against "
                  f"{html.escape(data.labels[0])} (no thresholds: what quantization changed).</p>",
                  _geometry_table("drawn-errors", [{"scene": i, "geometry": g}
                                                   for i, g in enumerate(data.drawn_geometry)])]
    return "\n".join(parts)


def _polygraphy_section(data: ReportData) -> str:
    result = data.compare
    per_output = result.get("polygraphy_outputs", {})
    names = list(result["atol"])
    rows = []
    for name in names:
        stats = per_output.get(name, {})
        worst = max(s["relative_error"][name] for s in result["scenes"]) if result["scenes"] else None
        rows.append([name, result["atol"][name], stats.get("max_absdiff"), stats.get("mean_absdiff"), worst,
                     ("yes" if stats["passed"] else "no") if "passed" in stats else "-"])
    tolerance = result.get("tolerance")
    told = "" if tolerance is None else (
        f", atol = {'/'.join(f'{v:g}' for v in sorted(set(tolerance['rel_tol'].values())))} x the reference "
        f"output's range ({html.escape(tolerance['source'])})")
    return "\n".join([
        "<h2>Polygraphy</h2>",
        f"<p>Comparator over {len(result['scenes'])} scene(s), check_error_stat {html.escape(result['error_stat'])}, "
        f"rtol 0{told}: {_verdict(result['polygraphy_passed'])}.</p>",
        _table("polygraphy", ["output", "atol", "max |diff|", "mean |diff|", "max |diff| / range", "passed"], rows),
    ])


def _sizes_section(data: ReportData) -> str:
    parts = ["<h2>Sizes</h2>"]
    if data.part_bytes:
        rows = [[part, e["deployed"] / 1e6, e["fp16"] / 1e6, e["deployed"] / e["fp16"] if e["fp16"] else 1.0]
                for part, e in data.part_bytes.items()]
        parts += [f"<p>Deployable weights per part{html.escape(data.part_bytes_source)} (float tensors in fp16, "
                  f"quantized linears as packed codes + fp16 scales; the track head is not deployed).</p>",
                  _table("sizes", ["part", "deployed MB", "fp16 MB", "ratio"], rows)]
    else:
        parts.append('<p class="note">Weights per part: not available (no checkpoint).</p>')
    if data.files:
        parts.append(_table("files", ["file", "MB"], [[n, b / 1e6] for n, b in data.files.items()]))
    return "\n".join(parts)


def render_html(data: ReportData) -> str:
    result = data.compare
    body = [
        f"<h1>{html.escape(data.title)}</h1>",
        f"<p>Candidate <b>{html.escape(str(result['candidate']))}</b> against reference "
        f"<b>{html.escape(data.reference_name or str(result['reference']))}</b>: {_verdict(result['passed'])} "
        f"(Polygraphy {_verdict(result['polygraphy_passed'])}, geometry {_verdict(result['geometry_passed'])}). "
        f"Pictures: {html.escape(data.labels[0])} vs {html.escape(data.labels[1])}.</p>",
        _plan_section(data),
        "<h2>Views</h2>",
        *(_scene_section(i, scene, data) for i, scene in enumerate(data.scenes)),
        _errors_section(data),
        _polygraphy_section(data),
        _sizes_section(data),
    ]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(data.title)}</title>'
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(path: str | Path, data: ReportData) -> Path:
    start = time.perf_counter()
    text = render_html(data)
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    logger.info("wrote %s (%.0f KB) in %.1f s", path, len(text.encode()) / 1e3, time.perf_counter() - start)
    return Path(path)
