"""Data parallelism over ``torch.distributed`` (any backend; gloo on CPU, nccl on GPUs).

Every rank holds the whole model. A step's microbatches are dealt round-robin to the ranks; the
gradients of the continuous parameters are all-reduced, so every rank takes the same P step. The
V step is sharded: each quantized layer has one owner rank, the dense-weight gradient of the
layer is reduced onto its owner only, the owner re-encodes the codes and broadcasts the layer's
buffers. With one process all of this reduces to plain single-process training.

Launch with ``torchrun --nproc_per_node N -m nibble.cli finetune ...``; torchrun sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, which ``init_from_env`` reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def owner(self, index: int) -> int:
        """The rank that runs the V step of quantized layer number ``index``."""
        return index % self.world

    def share(self, items: list) -> list:
        """This rank's items of a list dealt round-robin."""
        return items[self.rank :: self.world]

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(tensor)
        return tensor

    def reduce_to_(self, tensor: torch.Tensor, owner: int) -> torch.Tensor:
        if self.active:
            dist.reduce(tensor, dst=owner)
        return tensor

    def broadcast_(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        if self.active:
            dist.broadcast(tensor, src=src)
        return tensor

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum_scalars(self, *values: float) -> list[float]:
        """Sum a few floats over ranks (float64)."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self._device())
        return self.all_reduce_(tensor).tolist()

    def max_scalar(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self._device())
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.item()

    def _device(self) -> torch.device:
        if self.active and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def init_from_env(device: torch.device | None = None) -> tuple[Dist, torch.device | None]:
    """Join the process group torchrun describes (WORLD_SIZE > 1); return it and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (device is None or device.type == "cuda")
        if use_cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size()), device


def current() -> Dist:
    """The process group already initialised (e.g. by a test), or a single process."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size())
    return Dist()


def _local_worker(rank: int, world: int, port: int, threads: int, target, args: tuple, kwargs: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        target(*args, dist=Dist(rank, world), **kwargs)
    finally:
        dist.destroy_process_group()


def spawn_local(world: int, target, *args, threads: int = 1, start_method: str = "spawn", **kwargs) -> None:
    """Run ``target(*args, dist=..., **kwargs)`` in ``world`` local CPU processes over gloo.

    For tests and single-machine experiments without torchrun; ``target`` must be importable
    (a module-level function), as must its arguments be picklable. ``start_method="fork"``
    skips re-importing torch in every child (much faster; Linux only, parent must not have
    started intra-op worker threads, e.g. after ``torch.set_num_threads(1)``).
    """
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_local_worker, args=(world, port, threads, target, args, kwargs), nprocs=world,
                       join=True, start_method=start_method)
