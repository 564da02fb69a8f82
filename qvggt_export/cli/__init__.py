"""Thin Click layer: commands parse options and call the Python API.

Each stage keeps its commands in its own module here; heavy modules are imported inside the
commands so that `--help` stays fast.
"""

import sys

import click

from ..errors import QVGGTError
from ..io import resource_error, resource_exceptions
from ..log import setup_logging


class _Group(click.Group):
    """Turns QVGGTError, bad option values (click's usage errors), a few OS errors on user paths and running
    out of disk or memory (io.resource_error) into one line and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(2)
        except QVGGTError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except resource_exceptions() as exc:  # disk or memory ran out where no API function said what it did
            error = resource_error(exc)
            if error is None:
                raise
            click.echo(f"error: {error}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="qvggt-export")
def main(verbose: bool) -> None:
    """qvggt-export: quantize VGGT to W4A16 (QVGGT), export ONNX, build TensorRT engines."""
    setup_logging(verbose)


def check_device(ctx, param, value):
    """--device callback: cpu, cuda or cuda:N that this machine has, else a one-line error."""
    if value is not None:
        from ..quant.forward import resolve_device

        resolve_device(value)
    return value


def _register() -> None:
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name.endswith("_cmds"):
            importlib.import_module(f"{__name__}.{info.name}")


_register()
