"""ONNX Runtime sessions with W4A16 semantics."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError

# ORT fuses DequantizeLinear+MatMul into MatMulNBits with accuracy_level 4 by default, i.e. it
# quantizes activations to int8 on the fly (~0.7% error, docs/extending.md): level 0 keeps them float.
ACCURACY_LEVEL_CONFIG = ("session.qdq_matmulnbits_accuracy_level", "0")


def session_options(threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry(*ACCURACY_LEVEL_CONFIG)
    options.log_severity_level = 3
    # ORT's memory pattern replays the first run's allocations as one block on every later run: at VGGT-1B
    # width and 518x518 that took the W4A16 graph from 4.8 to 7.7 GB peak RSS at S = 4 (docs/deploy.md),
    # for no measurable speed (the layers' arithmetic dwarfs allocation).
    options.enable_mem_pattern = False
    if threads:
        options.intra_op_num_threads = threads
    return options


def ort_session(model, threads: int | None = None, providers: list[str] | None = None):
    """`model`: a ModelProto, serialized bytes or a path."""
    import onnxruntime as ort

    if isinstance(model, (str, os.PathLike)):
        source = str(model)
    elif isinstance(model, bytes):
        source = model
    else:
        source = model.SerializeToString()
    try:
        return ort.InferenceSession(source, session_options(threads), providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
        where = source if isinstance(source, str) else "the model"
        raise InputError(f"ONNX Runtime cannot load {where}: {str(exc).splitlines()[0][:300]}") from None


def has_custom_nodes(path: Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(n.domain == "qvggt" for n in model.graph.node)
