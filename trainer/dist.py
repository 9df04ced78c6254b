"""The one place that chooses device and process-group backend: on GPUs `cpu:gloo,cuda:nccl`
(CUDA tensors over nccl, the host-side bookkeeping of the loop and the phases over gloo, so no
collective ever hands nccl a CPU tensor), on CPU gloo."""
from __future__ import annotations

import atexit
import gc
import os
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None          # None: single process, no process group
    owns_process_group: bool = False   # created here (torchrun), not by Ray Train

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


GPU_BACKEND = "cpu:gloo,cuda:nccl"


def choose_backend(requested: str = "auto", cuda: bool | None = None) -> str:
    """`auto` -> nccl for CUDA tensors when CUDA is available (`GPU_BACKEND`, with gloo for CPU
    tensors), else gloo. `nccl` asks for the same device map."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if requested == "auto":
        return GPU_BACKEND if cuda else "gloo"
    if requested not in ("nccl", "gloo"):
        raise ValueError(f"dist.backend must be auto|nccl|gloo, got {requested!r}")
    if requested == "nccl" and not cuda:
        raise ValueError("dist.backend=nccl needs CUDA devices")
    return GPU_BACKEND if requested == "nccl" else requested


def init_distributed(requested_backend: str = "auto") -> DistEnv:
    """Join the process group described by torchrun/Ray Train environment variables (or the one
    Ray Train already created); a plain single process gets no process group here (the
    recipe makes a 1-rank one for fused tables, `init_single_process_group`)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    owns = False
    if dist.is_available() and dist.is_initialized() and not _own_single_group():
        backend = dist.get_backend()
        world_size, rank = dist.get_world_size(), dist.get_rank()
    elif world_size > 1:
        backend = choose_backend(requested_backend, cuda)
        dist.init_process_group(backend=backend)
        owns = True
    else:
        backend = None
    if cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                   backend=backend, owns_process_group=owns)


# the 1-rank group `init_single_process_group` created (None: it created none, or it is gone)
_single_group: dist.ProcessGroup | None = None
_at_exit_registered = False


def _own_single_group() -> bool:
    return (_single_group is not None and dist.is_available() and dist.is_initialized()
            and dist.GroupMember.WORLD is _single_group)


def init_single_process_group(env: DistEnv, requested_backend: str = "auto") -> DistEnv:
    """A process group for a single process, so that its tables are sharded by TorchRec's
    `DistributedModelParallel` on 1 rank, with FBGEMM's fused kernels and optimizer, exactly
    like a multi-process run's. Joins the group that exists (Ray Train's 1-worker group, or the
    one made here before), else creates a 1-rank group on an in-memory store (no port, no
    files). The group made here stays for the process's later recipes; `shutdown_distributed`
    (run_worker's exit) or, failing that, interpreter exit destroys it."""
    global _single_group, _at_exit_registered
    if env.world_size != 1:
        raise ValueError(f"init_single_process_group: world size {env.world_size}, not 1")
    if dist.is_initialized():
        return replace(env, backend=dist.get_backend(), owns_process_group=_own_single_group())
    backend = choose_backend(requested_backend, env.device.type == "cuda")
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    _single_group = dist.GroupMember.WORLD
    if not _at_exit_registered:
        atexit.register(_destroy_single_group)
        _at_exit_registered = True
    return replace(env, backend=backend, owns_process_group=True)


def _destroy_single_group() -> None:
    global _single_group
    if _own_single_group():
        gc.collect()
        dist.destroy_process_group()
    _single_group = None


def shutdown_distributed(env: DistEnv) -> None:
    """Destroy the process group `init_distributed` (or `init_single_process_group`) created
    (Ray Train owns its own), after collecting garbage: a process group kept alive by reference
    cycles until interpreter exit lets a gloo worker thread free a finished work's tensors
    during finalization, which aborts the process (SIGABRT, "terminate called without an
    active exception"; seen in our 2-process tests)."""
    if _own_single_group():
        _destroy_single_group()
    elif env.owns_process_group and dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def all_reduce_(tensor: torch.Tensor, env: DistEnv, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce across ranks (no-op on a single process), on a device the backend
    takes (`cel_torchrec.distributed.collectives.all_reduce_`)."""
    if env.distributed:
        from cel_torchrec.distributed.collectives import all_reduce_ as reduce_
        reduce_(tensor, op)
    return tensor


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()
