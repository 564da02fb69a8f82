"""Runs ONNX graphs in whatever onnxruntime this interpreter has (needs only numpy + onnxruntime, so it
runs in the separate venv that holds the package's minimum onnxruntime).

    python ort_floor_run.py images.npy out.npz graph.onnx [graph.onnx ...]

Writes out.npz with `<graph file name>/<output name>` arrays and prints the onnxruntime version.
"""

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

# Same setting as qvggt_export.export.runtime: MatMulNBits keeps activations in float.
ACCURACY_LEVEL_CONFIG = ("session.qdq_matmulnbits_accuracy_level", "0")


def main(images_path: str, out_path: str, *graphs: str) -> None:
    images = np.load(images_path)
    options = ort.SessionOptions()
    options.add_session_config_entry(*ACCURACY_LEVEL_CONFIG)
    options.log_severity_level = 3
    results = {}
    for graph in graphs:
        session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        for name, value in zip(names, session.run(names, {session.get_inputs()[0].name: images})):
            results[f"{Path(graph).name}/{name}"] = value
    np.savez(out_path, **results)
    print(ort.__version__)


if __name__ == "__main__":
    main(*sys.argv[1:])
