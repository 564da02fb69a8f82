"""Commands about data: evaluate a model on a dataset, look at a synthetic scene."""

from __future__ import annotations

import click

from . import check_device, main
from .model_cmds import CHECKPOINT_HELP, reconstruction_options

# Mirrors qvggt_export.data.readers.DATASETS (kept here so that --help does not import torch).
DATASET_CHOICES = ("synthetic-val", "synthetic-video", "folder", "co3d", "re10k", "7scenes", "nrgbd")


@main.command("eval")
@click.option("--checkpoint", "-c", default=None, help=CHECKPOINT_HELP)
@click.option("--dataset", type=click.Choice(DATASET_CHOICES), default="synthetic-val", show_default=True,
              help="Dataset to evaluate on.")
@click.option("--root", type=click.Path(), default=None, help="Dataset root (not for the synthetic sets).")
@click.option("--frames", type=int, default=None,
              help="Frames per scene. Default: 10 (synthetic-val, co3d, re10k), 8 (synthetic-video), every keyframe (7scenes, "
                   "nrgbd), every image (folder).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the frame sampling.")
@click.option("--max-scenes", type=int, default=None, help="Evaluate at most this many scenes.")
@click.option("--image-size", default=None, metavar="HxW",
              help="Size the images are preprocessed to, or a synthetic set is rendered at (multiples of 14; "
                   "default: the model's native size, VGGT-1B: the released 518-wide rule).")
@click.option("--json", "json_path", type=click.Path(), default=None, help="Write the full results as JSON here.")
@click.option("--device", default="cpu", show_default=True, callback=check_device, help="cpu or cuda.")
@reconstruction_options(per_scene=True)
def eval_command(checkpoint, dataset, root, frames, seed, max_scenes, image_size, json_path, device, ply, glb,
                 conf_percentile) -> None:
    """Evaluate a model: camera pose AUC, depth and point-map errors, per scene and overall."""
    from ..data.readers import open_dataset
    from ..evaluate import evaluate, format_report
    from ..io import write_json
    from ..model import load_model
    from ..data.images import parse_image_size
    from ..visualize import ReconstructionOutputs

    # The dataset and the outputs are checked before the (slow) model load so that a wrong --root fails at once.
    reconstruction = ReconstructionOutputs(ply, glb, conf_percentile)
    reconstruction.check()
    size = parse_image_size(image_size) if image_size else None
    reader = open_dataset(dataset, root, frames, seed, max_scenes, size)
    model = load_model(checkpoint, device=device)
    if size is None and dataset.startswith("synthetic-"):
        # Render at the model's native size: a small model is meaningless at synthetic-val's 392x518.
        reader = open_dataset(dataset, root, frames, seed, max_scenes, model.config.default_image_size)
    elif size is None:
        from ..data.images import native_size

        reader.image_size = native_size(model.config)
    result = evaluate(model, reader, root=root, frames=frames, seed=seed, device=device,
                      reconstruction=reconstruction)
    result["checkpoint"] = checkpoint or "default"
    click.echo(format_report(result))
    if json_path:
        write_json(json_path, result)
        click.echo(f"wrote {json_path}")


@main.command("show-scene")
@click.option("--seed", type=int, default=0, show_default=True, help="Scene seed.")
@click.option("--views", type=int, default=4, show_default=True, help="Number of views.")
@click.option("--image-size", default="392x518", show_default=True, metavar="HxW",
              help="Render size (multiples of 14).")
@click.option("--out", "-o", default="scene.png", show_default=True, type=click.Path(), help="Output PNG.")
def show_scene(seed, views, image_size, out) -> None:
    """Render a synthetic scene and save its views and depth maps as a PNG."""
    from ..data.synthetic import render_scene, save_scene_figure
    from ..data.images import parse_image_size

    scene = render_scene(seed, views, parse_image_size(image_size))
    click.echo(f"wrote {save_scene_figure(scene, out)}")
