"""Run a function on N gloo CPU processes (torch.multiprocessing, free port) and collect what
each rank returns."""
from __future__ import annotations

import gc
import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args, out_dir: str, backend: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except Exception:
        traceback.print_exc()
        raise
    finally:
        gc.collect()      # see trainer.dist.shutdown_distributed
        dist.destroy_process_group()


def run_ranks(fn, *args, world_size: int = 2, backend: str = "gloo") -> list:
    """`fn(rank, world_size, *args)` on `world_size` spawned processes; returns their results
    (anything torch.save can write). A failure on any rank raises here. `backend`: the process
    group's (`cpu:gloo,cuda:gloo` has the device-mapped form of a GPU run's `cpu:gloo,cuda:nccl`)."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_entry, args=(world_size, free_port(), fn, args, out_dir, backend),
                           nprocs=world_size, join=True, start_method="spawn")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
                for r in range(world_size)]
