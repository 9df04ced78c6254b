"""Collectives valid under nccl: GPU runs get a device-mapped backend (`cpu:gloo,cuda:nccl`), the
library moves a tensor to a device its group's backend takes, and the trainer runs end to end
under a check of every collective's tensors."""
import pytest
import torch
import torch.distributed as dist

from cel_torchrec.distributed.collectives import device_types_of
from tests.distributed.collective_check import WrongDevice, checked_collectives
from tests.distributed.harness import run_ranks
from trainer.dist import GPU_BACKEND, choose_backend


def test_gpu_runs_get_gloo_for_cpu_tensors_and_nccl_for_cuda_tensors():
    assert choose_backend("auto", cuda=True) == GPU_BACKEND == "cpu:gloo,cuda:nccl"
    assert choose_backend("nccl", cuda=True) == GPU_BACKEND
    assert choose_backend("auto", cuda=False) == choose_backend("gloo", cuda=True) == "gloo"
    with pytest.raises(ValueError, match="needs CUDA"):
        choose_backend("nccl", cuda=False)
    assert device_types_of(GPU_BACKEND) == {"cpu", "cuda"}
    assert device_types_of("nccl") == {"cuda"}          # plain nccl: no CPU tensors
    assert device_types_of("cpu:gloo,cuda:gloo") == device_types_of("gloo") == {"cpu", "cuda"}


def test_the_check_refuses_a_cpu_tensor_on_a_backend_without_a_cpu_device():
    # `cuda:gloo` has nccl's device map (CUDA only) and runs on a CPU-only machine
    dist.init_process_group("cuda:gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with checked_collectives(), pytest.raises(WrongDevice, match="all_reduce got a tensor on cpu"):
            dist.all_reduce(torch.ones(2))
    finally:
        dist.destroy_process_group()


def _train_checked(rank, world, tmp):
    from tests.trainer.test_train_e2e import tiny_config
    from trainer.worker import run_worker
    cfg = tiny_config(tmp, "train.epochs=1", "cel.users.enabled=true",
                      "cel.reassign_mode=exact", "train.eval_every_steps=20")
    with checked_collectives() as calls:
        metrics = run_worker(cfg)
    return dict(calls), dist.get_backend_config(), metrics["val_rmse"]


def test_a_two_rank_cel_run_hands_every_collective_tensors_its_backend_takes(tmp_path):
    results = run_ranks(_train_checked, tmp_path, backend="cpu:gloo,cuda:gloo")
    for calls, backend, rmse in results:
        assert backend == "cpu:gloo,cuda:gloo"
        # the data-loop sync, the sharded lookups and the cluster phases all went through it
        assert calls.get("all_reduce", 0) > 20 and calls.get("all_to_all_single", 0) > 0, calls
        assert rmse < 1.2
    assert results[0][2] == results[1][2]
