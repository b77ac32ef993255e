"""Process-group helpers for torchrun (single-node and multi-node) and plain single-process runs.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous variables; when WORLD_SIZE > 1 we join
the default process group with NCCL on GPUs and gloo on CPUs. Without torchrun (or WORLD_SIZE=1)
nothing is initialised and every helper degrades to the single-process answer.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialised: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the torchrun process group if there is one; pick the device (cuda:LOCAL_RANK or cpu)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device in (None, "auto") else device.startswith("cuda")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():  # two ranks on one GPU would fail later, in NCCL
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are "
                               "visible: run at most one process per GPU (torchrun --nproc_per_node)")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    initialised = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        kwargs = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        initialised = True
    elif world > 1:
        initialised = True
    return DistInfo(rank, world, local_rank, dev, initialised)


def cleanup(info: DistInfo, sync: bool = True) -> None:
    """Leaves the process group. sync=False after an error: a failing rank must not enter a barrier the
    others never reach (they wait in the next collective; the job would hang until the timeout instead of
    torchrun stopping it)."""
    if info.initialised and dist.is_initialized():
        if sync:
            dist.barrier()
            dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def all_gather_objects(obj, info: DistInfo) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: torch.nn.Module, info: DistInfo, src: int = 0) -> None:
    """Every buffer of module (BatchNorm running statistics) from rank src to all ranks. After a training
    step each rank's BatchNorm has updated its running statistics with its own batch; DDP re-broadcasts
    them only at the next forward of the wrapped model, so evaluation and checkpoints need this first."""
    if info.distributed:
        for buf in module.buffers():
            dist.broadcast(buf, src=src)


def broadcast_object(obj, info: DistInfo, src: int = 0):
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
