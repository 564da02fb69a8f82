"""Reading and writing ONNX files: one-line errors for unusable files, atomic saves with external data.

Both the exporter (onnx_export) and the lowerings (lower) read and write models through here."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import InputError, QVGGTError
from ..io import TMP_SUFFIX, make_dirs, remove_empty_dirs, resource_error, resource_errors
from . import spec

# Protobuf cannot hold more than 2 GiB; above this many weight bytes the model goes to external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def save_onnx(write, path: Path) -> None:
    """Atomic save of a model that may come with `<name>.data` external data: `write(tmp)` writes the
    model (and its data) in a temporary folder beside `path` under their final names (the model refers
    to its data file by name), then both are moved, the model last, so a killed run never leaves a
    model without its data. A full disk is a ResourceError, and leaves no temporary folder, nor the
    folders made for `path`."""
    path = Path(path)
    created = make_dirs(path.parent)
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent))
    except OSError as exc:
        remove_empty_dirs(created)
        raise resource_error(exc, f"writing {path}") or QVGGTError(
            f"cannot write to {path.parent}: {exc.strerror or exc}") from None
    done = False
    try:
        with resource_errors(f"writing {path}"):
            tmp = tmpdir / path.name
            write(tmp)
            data, final_data = tmpdir / (path.name + ".data"), path.with_name(path.name + ".data")
            if data.exists():
                os.replace(data, final_data)
            elif final_data.exists():
                final_data.unlink()  # left by an earlier, larger export of the same name
            os.replace(tmp, path)
        done = True
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
        if not done:
            remove_empty_dirs(created)


def save_proto(model, path: Path) -> None:
    """A ModelProto -> `path` (atomically; external data above EXTERNAL_DATA_THRESHOLD)."""
    import onnx

    size = sum(len(t.raw_data) for t in model.graph.initializer)
    external = size > EXTERNAL_DATA_THRESHOLD
    save_onnx(lambda tmp: onnx.save_model(model, str(tmp), save_as_external_data=external,
                                          all_tensors_to_one_file=True, location=path.name + ".data"), path)


def load_onnx(path: str | os.PathLike, load_external_data: bool = True):
    """An ONNX file -> ModelProto, with one-line errors for missing, truncated or corrupt files."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InputError(f"ONNX model not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except Exception as exc:  # protobuf DecodeError, missing external data, ...: all mean unusable
        raise InputError(f"{path} is not a readable ONNX model (truncated or corrupt?): "
                         f"{type(exc).__name__}") from None
    outputs = {o.name for o in model.graph.output}
    if not model.graph.node or not outputs:
        raise InputError(f"{path} is not a complete ONNX model (no nodes or outputs; truncated?)")
    return model


def model_metadata(model) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def recorded_export_spec(model) -> dict:
    """The export spec (spec.ExportConfig.to_dict) an exported model carries in its metadata; {} if none."""
    return json.loads(model_metadata(model).get(spec.META_SPEC, "{}"))
