"""Resumable quantize runs: the quantizer's state after every finished block, in the calibration directory.

  quantize-<key>/progress.json        blocks finished, their report entries, the run's bookkeeping
  quantize-<key>/<block>.safetensors  the block's tensors after its decisions (scaled, folded, rounded
                                      weights; prescaled inputs) and the quantization scales of its linears

`key` hashes everything the result depends on (model and calibration content, the plan, the whole
QuantConfig, the package version), so a changed setting starts afresh in its own directory. A killed run
continues at the next unfinished block and, the computation being deterministic, writes a byte-identical
checkpoint. Rank 0 writes; every rank reads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import Tensor, nn

from ..io import load_cache_tensors, read_cache_json, save_cache_tensors, sha256_json, write_cache_json
from ..log import logger
from .linear import PrescaledLinear
from .modules import replace_module

PROGRESS_FILE = "progress.json"
SCALE_PREFIX = "qscale/"
INPUT_SCALE = "input_scale"


class QuantizeProgress:
    def __init__(self, directory: Path | None, key: dict, writer: bool = True) -> None:
        self.directory = None if directory is None else Path(directory) / f"quantize-{sha256_json(key)[:16]}"
        self.key, self.writer = key, writer
        self.done: dict[str, dict] = {}  # block name -> report entries of its linears
        # A damaged progress.json is discarded with one warning (io.read_cache_json): the run starts afresh.
        saved = read_cache_json(self.directory / PROGRESS_FILE) if self.directory is not None else None
        if saved is not None and saved.get("key") == json.loads(json.dumps(key, default=str)):
            self.done = saved["blocks"]
            if self.done:
                logger.info("quantize: resuming from %s (%d blocks done)", self.directory, len(self.done))

    def is_done(self, block: str) -> bool:
        return block in self.done

    def save_block(self, model: nn.Module, block: str, scales: dict[str, Tensor], entries: dict) -> None:
        # Entries as they read back from progress.json (sorted keys), so a resumed run reports the same bytes.
        self.done[block] = json.loads(json.dumps(entries, sort_keys=True))
        if self.directory is None or not self.writer:
            return
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.get_submodule(block).state_dict().items()}
        tensors.update({SCALE_PREFIX + name: s.detach().cpu().contiguous() for name, s in scales.items()})
        save_cache_tensors(tensors, self.directory / f"{block}.safetensors")
        write_cache_json(self.directory / PROGRESS_FILE, {"key": self.key, "blocks": self.done})

    def load_block(self, model: nn.Module, block: str) -> dict[str, Tensor] | None:
        """Puts a finished block back into `model`; returns its linears' quantization scales. None when its
        file is missing or damaged (discarded with one warning): the caller quantizes the block again, which
        gives the same result (the blocks before it are in place)."""
        path = self.directory / f"{block}.safetensors"
        if not path.is_file():
            logger.warning("quantize: the saved state of %s is missing (%s); quantizing it again", block, path)
        loaded = load_cache_tensors(path)  # warns once when damaged
        if loaded is None:
            self.done.pop(block, None)
            return None
        tensors = loaded[0]
        device = next(model.parameters()).device
        scales = {k[len(SCALE_PREFIX):]: v.to(device) for k, v in tensors.items() if k.startswith(SCALE_PREFIX)}
        state = {k: v for k, v in tensors.items() if not k.startswith(SCALE_PREFIX)}
        for key in state:
            if key.endswith("." + INPUT_SCALE):  # a linear the run turned into a PrescaledLinear
                name = f"{block}.{key[: -len(INPUT_SCALE) - 1]}"
                replace_module(model, name, PrescaledLinear.from_linear(model.get_submodule(name)))
        model.get_submodule(block).load_state_dict(state)
        return scales

    def clear(self) -> None:
        """Drops the per-block state once the checkpoint it leads to is written."""
        if self.directory is not None and self.writer and self.directory.is_dir():
            shutil.rmtree(self.directory)

