#!/usr/bin/env python
"""A released-layout VGGT-1B checkpoint with random weights (fixed seed), full precision or round-to-nearest
W4A16 (uniform plan): real speed and memory for scale work where the released weights cannot be downloaded.

  python scripts/random_vggt1b.py runs/vggt1b/w4a16.safetensors --w4a16 [--depth N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qvggt_export.bench import rtn_quantized  # noqa: E402
from qvggt_export.model import VGGT, VGGTConfig, save_quantized, save_vggt  # noqa: E402
from qvggt_export.model.presets import vggt1b_shallow_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--w4a16", action="store_true", help="RTN W4A16 (uniform plan) instead of fp32")
    parser.add_argument("--depth", type=int, default=None, help="aggregator and encoder blocks (default: 24)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = VGGT(vggt1b_shallow_config(args.depth) if args.depth else VGGTConfig(carry_track_head=False)).eval()
    path = save_quantized(rtn_quantized(model), args.out) if args.w4a16 else save_vggt(model, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
