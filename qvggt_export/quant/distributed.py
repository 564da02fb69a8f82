"""Data parallelism over torch.distributed ranks (`torchrun --nproc-per-node N qvggt-export quantize ...`).

Calibration scenes are dealt round-robin over the ranks. Everything that combines scenes (statistics,
Hessians, task losses, camera tokens) is gathered and combined in scene order, never summed in rank
order, so the result is bit-identical to one process whatever the number of ranks. NCCL on GPUs, gloo
on CPUs; only rank 0 writes artifacts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import reduce

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import InputError


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def indices(self, total: int) -> list[int]:
        """The scene indices this rank holds."""
        if total < self.world:
            raise InputError(f"{total} calibration scene(s) cannot be shared by {self.world} processes; "
                             "use at least one scene per process")
        return list(range(self.rank, total, self.world))


def init_from_environment(device: torch.device) -> Shard:
    """Joins the process group torchrun describes (WORLD_SIZE > 1), or stays a single process."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device if device.index is not None else int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return current_shard()


def leave_group(shard: Shard) -> None:
    """The end of a successful run: every rank waits for the others, then leaves the process group. A rank
    that exits with a live gloo group while a peer still works (rank 0 saving the checkpoint) can abort at
    interpreter exit ("terminate called without an active exception", seen in CI). After an error no rank
    waits: the others fail in their next collective, as before."""
    if shard.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def current_shard() -> Shard:
    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    return Shard()


def gather_in_order(local: list, shard: Shard, total: int) -> list:
    """Per-scene values held by each rank (for shard.indices(total)) -> every scene's value, in scene order,
    on every rank. Values are picklable (tensors on the CPU)."""
    if shard.world == 1:
        return list(local)
    per_rank = [None] * shard.world
    dist.all_gather_object(per_rank, list(local))
    ordered = [None] * total
    for rank, values in enumerate(per_rank):
        for index, value in zip(range(rank, total, shard.world), values):
            ordered[index] = value
    return ordered


def sum_in_order(local: list[Tensor], shard: Shard, total: int) -> Tensor:
    """Sum of per-scene tensors of one shape, added in scene order (((t0 + t1) + t2) ...) on every rank."""
    if shard.world == 1:
        return reduce(lambda a, b: a + b, local)
    mine = dict(zip(shard.indices(total), local))
    result = None
    for index in range(total):
        owner = index % shard.world
        buffer = mine[index].contiguous() if owner == shard.rank else torch.empty_like(local[0])
        dist.broadcast(buffer, src=owner)
        result = buffer.clone() if result is None else result + buffer
    return result


def barrier(shard: Shard) -> None:
    if shard.world > 1:
        dist.barrier()
