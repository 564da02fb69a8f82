#!/usr/bin/env python
"""Where an exported graph's peak memory goes as the number of views S grows: ONNX Runtime runs the whole
graph and sub-graphs that stop at some outputs (pose only: aggregator + camera head; depth: + one DPT head),
each S in a process of its own, and prints peak RSS, RSS once loaded, and their growth per doubling of S.

  python scripts/graph_memory.py runs/bench518/w4a16.ort.onnx --frames 2,4,8 [--threads 1]

The differences between the rows attribute memory to parts: whole - depth = the point head, depth - pose =
the depth head (the two DPT heads are the same shape), pose = aggregator + camera head.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qvggt_export.bench import rss_mb  # noqa: E402
from qvggt_export.export import spec  # noqa: E402

PARTS = {"pose": ("pose_enc",), "depth": ("pose_enc", "depth", "depth_conf"), "whole": spec.OUTPUT_NAMES}


def measure(path: str, outputs: tuple[str, ...], frames: int, threads: int | None, queue) -> None:
    import numpy as np

    from qvggt_export.export.runtime import ort_session

    session = ort_session(path, threads=threads)
    shape = session.get_inputs()[0].shape
    images = np.random.default_rng(frames).random((1, frames, 3, shape[3], shape[4]), dtype=np.float32)
    loaded = rss_mb("VmRSS")
    session.run(list(outputs), {spec.INPUT_NAME: images})
    queue.put({"loaded_mb": loaded, "peak_mb": rss_mb("VmHWM")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="an ONNX Runtime graph (e.g. the `ort` lowering)")
    parser.add_argument("--frames", default="2,4,8")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"subset of {', '.join(PARTS)}")
    args = parser.parse_args()
    import onnx

    frames = [int(v) for v in args.frames.split(",")]
    parts = {name: PARTS[name] for name in args.parts.split(",")}
    context = multiprocessing.get_context("spawn")
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for part, outputs in parts.items():
            path = args.model
            if part != "whole":
                path = Path(work) / f"{part}.onnx"
                onnx.utils.extract_model(str(args.model), str(path), [spec.INPUT_NAME], list(outputs))
            for s in frames:
                queue = context.Queue()
                process = context.Process(target=measure, args=(str(path), outputs, s, args.threads, queue))
                process.start()
                process.join()
                results[part, s] = queue.get() if process.exitcode == 0 and not queue.empty() else None
                print(part, s, results[part, s], flush=True)
    print(f"{'part':<8}" + "".join(f"{'S=' + str(s):>16}" for s in frames) + "   (peak / above loaded, MB)")
    for part in parts:
        cells = [results[part, s] for s in frames]
        print(f"{part:<8}" + "".join(f"{c['peak_mb']:>9.0f} /{c['peak_mb'] - c['loaded_mb']:>5.0f}" if c else
                                    f"{'failed':>16}" for c in cells))
    for part in parts:
        growth = [(a, b) for a, b in zip(frames, frames[1:]) if b == 2 * a and results[part, a] and results[part, b]]
        above = {s: results[part, s]["peak_mb"] - results[part, s]["loaded_mb"] for s in frames if results[part, s]}
        print(f"{part}: memory above the loaded graph per doubling of S: "
              + ", ".join(f"{a}->{b} {above[b] / above[a]:.2f}x" for a, b in growth))


if __name__ == "__main__":
    main()
