"""Commands that look at or run a model: info, predict."""

from __future__ import annotations

import click

from . import check_device, main

CHECKPOINT_SOURCES = (".safetensors/.pt file, a folder holding one, an embedded name (vggt-tiny) or a hub id. "
                      "Default: the embedded vggt-tiny model.")
CHECKPOINT_HELP = "Checkpoint (full precision or quantized): " + CHECKPOINT_SOURCES


def reconstruction_options(per_scene: bool = False):
    """--ply, --glb, --conf-percentile (predict, infer, eval): visualize.ReconstructionOutputs's fields."""
    from ..visualize import DEFAULT_CONF_PERCENTILE  # light: no numpy or torch at start-up

    each = " One file per scene: FILE's name + '-SCENE'." if per_scene else ""

    def decorate(fn):
        fn = click.option("--conf-percentile", default=DEFAULT_CONF_PERCENTILE, show_default=True,
                          type=click.FloatRange(0, 100, max_open=True),
                          help="--ply/--glb keep the points whose depth confidence is at least this percentile of "
                               "the scene's (0: all), as the released demo.")(fn)
        fn = click.option("--glb", default=None, type=click.Path(dir_okay=False),
                          help="Also write the points and one frustum per predicted camera as a GLB scene (needs "
                               "the viz extra)." + each)(fn)
        fn = click.option("--ply", default=None, type=click.Path(dir_okay=False),
                          help="Also write the reconstruction as a coloured point cloud (.ply): depth unprojected "
                               "through the predicted cameras, in the first camera's frame (needs the viz "
                               "extra)." + each)(fn)
        return fn

    return decorate


@main.command()
@click.argument("checkpoint")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(checkpoint: str, as_json: bool) -> None:
    """Parameters, config, dtypes and size of CHECKPOINT."""
    import json

    from ..model.summary import checkpoint_summary, format_deployable_bytes

    summary = checkpoint_summary(checkpoint)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"file        {summary['path']} ({summary['file_bytes'] / 2**20:.1f} MiB)")
    click.echo(f"format      {summary['format']}")
    click.echo(f"tensors     {summary['tensors']}  dtypes {', '.join(f'{k}:{v}' for k, v in summary['dtypes'].items())}")
    click.echo(f"parameters  {summary['parameters']:,}")
    for part, count in summary["parameters_by_part"].items():
        click.echo(f"  {part:<12}{count:>15,}")
    click.echo("deployable weights (track head not deployed)")
    for line in format_deployable_bytes(summary["deployable_bytes"]):
        click.echo(line)
    click.echo("config      " + json.dumps(summary["config"]))
    for key, value in summary.get("quantization", {}).items():
        click.echo(f"{key:<12}{value}")


@main.command()
@click.argument("images", nargs=-1, type=click.Path())
@click.option("--checkpoint", "-c", default=None, help=CHECKPOINT_HELP)
@click.option("--scene", default=None, metavar="synthetic:SEED",
              help="Run on a rendered synthetic scene with ground truth instead of IMAGES, and print errors; "
                   "synthetic-video:SEED (or -orbit, -forward, -pan) for video-like cameras, e.g. "
                   "synthetic-video:1000100 (the synthetic-video split's first scene).")
@click.option("--views", default=4, show_default=True, help="Views rendered for --scene.")
@click.option("--image-size", default=None, metavar="HxW", help="Size IMAGES are preprocessed to, or --scene is rendered at (default: the model's native size; "
                   "VGGT-1B: the released 518-wide rule).")
@click.option("--mode", type=click.Choice(["crop", "pad"]), default="crop", show_default=True,
              help="Preprocessing of IMAGES, as the released code.")
@click.option("--out", "-o", default="preds.npz", show_default=True, type=click.Path(), help="Output .npz.")
@click.option("--device", default="cpu", show_default=True, callback=check_device, help="cpu or cuda.")
@reconstruction_options()
def predict(images, checkpoint, scene, views, image_size, mode, out, device, ply, glb, conf_percentile) -> None:
    """Run the model on IMAGES (views of one scene) and write its predictions to an .npz.

    Writes pose_enc, extrinsic, intrinsic, depth, depth_conf, world_points, world_points_conf
    (OpenCV camera-from-world extrinsics; the first view is the world frame); --ply / --glb also write
    the reconstruction for 3D viewers.
    """
    from ..predict import predict_images, predict_synthetic
    from ..visualize import ReconstructionOutputs

    reconstruction = ReconstructionOutputs(ply, glb, conf_percentile)
    if scene and images:
        raise click.UsageError("give IMAGES or --scene, not both")
    if not scene and not images:
        raise click.UsageError("no images given (pass image files, or --scene synthetic:SEED)")
    if scene:
        report = predict_synthetic(scene, checkpoint, views, image_size, out, device, reconstruction)
        for line in report:
            click.echo(line)
    else:
        from ..data.images import check_size
        from ..data.images import parse_image_size

        size = check_size(parse_image_size(image_size)) if image_size else None
        predict_images(images, checkpoint, mode, out, device, size, reconstruction)
    click.echo(f"wrote {out}")
