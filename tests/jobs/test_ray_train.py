"""jobs.ray_train end to end on a real local Ray: a small DDP matrix-factorisation worker reads
its Ray Data shard, reports checkpoints, and (second test) dies once and resumes from the last
checkpoint with its stand-in cluster state intact."""
from __future__ import annotations

import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")

from jobs.ray_train import final_metrics, format_metrics_table, run_ray_training  # noqa: E402

pytestmark = pytest.mark.ray

# Ray workers cannot import this test module by name: ship its functions by value instead.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

USERS, ITEMS, ROWS, DIM, CLUSTERS = 200, 100, 4096, 8, 7


def write_dataset(root: pathlib.Path) -> pathlib.Path:
    """train/ and val/ Parquet splits in data_pipeline.schema's columns, labels from a rank-2
    MF (only the splits: jobs.ray_train reads nothing else)."""
    rng = np.random.default_rng(0)
    user_f, item_f = rng.normal(size=(USERS, 2)), rng.normal(size=(ITEMS, 2))
    for split, rows in (("train", ROWS), ("val", ROWS // 4)):
        users = rng.integers(0, USERS, rows)
        items = rng.integers(0, ITEMS, rows)
        label = (user_f[users] * item_f[items]).sum(1) + 0.1 * rng.normal(size=rows)
        table = pa.table({"user_id": users.astype(np.int64), "item_id": items.astype(np.int64),
                          "label": label.astype(np.float32),
                          "timestamp": np.arange(rows, dtype=np.int64)})
        (root / split).mkdir(parents=True)
        for part in range(2):       # two files -> several blocks to split across workers
            pq.write_table(table.slice(part * rows // 2, rows // 2),
                           root / split / f"part-{part:05d}.parquet")
    return root


def evolve_assignment(assignment, epoch: int):
    """Stand-in for a CEL cluster phase: a deterministic change of the item->cluster map."""
    return (assignment * 3 + epoch + 1) % CLUSTERS


def mf_worker(config: dict, ctx) -> dict:
    """A real worker in the shape the trainer's will have: DDP model, per-epoch checkpoint of
    model + optimizer + cluster state written by rank 0, resume from ctx.latest_checkpoint_dir()."""
    import torch
    import torch.distributed as dist
    import ray.train.torch

    class MF(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.user = torch.nn.Embedding(USERS, DIM)
            self.item = torch.nn.Embedding(ITEMS, DIM)

        def forward(self, users, items):
            return (self.user(users) * self.item(items)).sum(-1)

    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(MF())          # DDP over gloo
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    assignment = torch.arange(ITEMS, dtype=torch.int32) % CLUSTERS
    start_epoch, losses = 0, []
    work = pathlib.Path(config["test"]["work_dir"])

    resume_dir = ctx.latest_checkpoint_dir()
    if resume_dir:
        state = torch.load(pathlib.Path(resume_dir) / "state.pt", weights_only=False)
        model.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        assignment, losses = state["assignment"], state["losses"]
        start_epoch = state["epoch"] + 1
        (work / f"resumed_rank{ctx.rank}.json").write_text(json.dumps(
            {"start_epoch": start_epoch, "assignment": assignment.tolist()}))

    epochs, batch_size = config["train"]["epochs"], config["data"]["batch_size"]
    fail_rank, marker = config["test"].get("fail_rank"), work / "failed_once"
    for epoch in range(start_epoch, epochs):
        total, count = torch.zeros(()), torch.zeros(())
        for step, batch in enumerate(ctx.iter_batches("train", batch_size, epoch)):
            if fail_rank == ctx.rank and epoch == 1 and step == 3 and not marker.exists():
                ctx.wait_committed()                      # epoch 0's checkpoint is registered
                marker.write_text(str(os.getpid()))
                os._exit(1)                               # a hard crash mid-epoch: no cleanup
            users = torch.from_numpy(batch["user_id"])
            items = torch.from_numpy(batch["item_id"])
            label = torch.from_numpy(batch["label"])
            loss = torch.nn.functional.mse_loss(model(users, items), label)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(label)
            count += len(label)
        stats = torch.stack([total, count])
        dist.all_reduce(stats)
        losses.append(float(stats[0] / stats[1]))
        assignment = evolve_assignment(assignment, epoch)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint_dir = None
            if ctx.rank == 0:
                torch.save({"model": model.module.state_dict(), "optimizer": optimizer.state_dict(),
                            "assignment": assignment, "epoch": epoch, "losses": losses},
                           pathlib.Path(tmp) / "state.pt")
                (pathlib.Path(tmp) / "meta.json").write_text(json.dumps({"epoch": epoch}))
                checkpoint_dir = tmp
            ctx.report({"epoch": epoch, "train_mse": losses[-1]}, checkpoint_dir=checkpoint_dir)
    return {"train_mse": losses[-1], "losses": losses, "epochs": len(losses),
            "assignment": assignment.tolist(), "rows_per_rank": ctx.dataset_rows["train"] // ctx.world_size}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()


def make_config(tmp_path: pathlib.Path, data_dir: pathlib.Path, **test) -> dict:
    return {"ray": {"num_workers": 2, "cpus_per_worker": 0.5, "max_failures": test.pop("max_failures", 0)},
            "run": {"dir": str(tmp_path / "runs"), "name": "mf"},
            "data": {"path": str(data_dir), "batch_size": 256},
            "train": {"epochs": test.pop("epochs", 2), "seed": 0},
            "test": {"work_dir": str(tmp_path), **test}}


@pytest.mark.slow   # the real trainer covers this path in the default suite (test_ray_cel.py)
def test_ray_train_local(local_ray, tmp_path):
    data_dir = write_dataset(tmp_path / "data")
    start = time.monotonic()
    result = run_ray_training(make_config(tmp_path, data_dir, epochs=2), mf_worker)
    print(f"\n[test] ray_train_local fit took {time.monotonic() - start:.1f}s")
    metrics = final_metrics(result)
    print(format_metrics_table(metrics))
    assert metrics["epochs"] == 2
    assert metrics["rows_per_rank"] == ROWS // 2
    assert metrics["losses"][1] < metrics["losses"][0]
    assert result.metrics["epoch"] == 1
    checkpoint = pathlib.Path(result.checkpoint.path)
    assert checkpoint.is_dir() and (checkpoint / "state.pt").is_file()
    assert json.loads((checkpoint / "meta.json").read_text()) == {"epoch": 1}
    assert checkpoint.parent == tmp_path / "runs" / "mf" / "ray_train"


@pytest.mark.slow   # the real trainer covers this path in the default suite (test_ray_cel.py)
def test_fault_tolerance(local_ray, tmp_path):
    import torch
    data_dir = write_dataset(tmp_path / "data")
    start = time.monotonic()
    result = run_ray_training(
        make_config(tmp_path, data_dir, epochs=3, max_failures=1, fail_rank=1), mf_worker)
    print(f"\n[test] fault_tolerance fit took {time.monotonic() - start:.1f}s")
    metrics = final_metrics(result)
    assert (tmp_path / "failed_once").exists(), "the worker never crashed"
    expected = torch.arange(ITEMS, dtype=torch.int32) % CLUSTERS
    after_epoch0 = evolve_assignment(expected, 0)
    for rank in (0, 1):
        resumed = json.loads((tmp_path / f"resumed_rank{rank}.json").read_text())
        assert resumed["start_epoch"] == 1
        assert resumed["assignment"] == after_epoch0.tolist()   # cluster state carried over
    for epoch in range(3):
        expected = evolve_assignment(expected, epoch)
    assert metrics["assignment"] == expected.tolist()
    assert metrics["epochs"] == 3 and len(metrics["losses"]) == 3
    assert metrics["losses"][2] < metrics["losses"][0]
    assert json.loads((pathlib.Path(result.checkpoint.path) / "meta.json").read_text()) == {"epoch": 2}


def test_materialized_datasets_get_equal_disjoint_presplit_shards(local_ray):
    """jobs.ingest: a materialized dataset is split in the driver into equal, disjoint worker
    shards (the remainder dropped, as streaming_split(equal=True) does); a lazy one keeps Ray
    Train's streaming split."""
    from ray.data._internal.iterator.stream_split_iterator import StreamSplitDataIterator

    from jobs.ingest import ShardMaterializedDataConfig
    train = ray.data.from_items([{"x": i} for i in range(11)]).materialize()
    val = ray.data.range(10)
    datasets = {"train": train, "val": val}
    config = ShardMaterializedDataConfig(datasets_to_split="all").presplit(datasets, 2)
    assert [s.count() for s in config._shards["train"]] == [5, 5] and "val" not in config._shards
    out = config.configure(datasets, world_size=2, worker_handles=None, worker_node_ids=None)
    shards = [sorted(row["x"] for row in out[rank]["train"].iter_rows()) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5
    assert not set(shards[0]) & set(shards[1]) and set(shards[0]) | set(shards[1]) <= set(range(11))
    assert all(isinstance(out[rank]["val"], StreamSplitDataIterator) for rank in range(2))
    # a world size other than the pre-split one is split at configure time
    out3 = config.configure({"train": train}, world_size=3, worker_handles=None, worker_node_ids=None)
    assert [len(list(out3[rank]["train"].iter_rows())) for rank in range(3)] == [3, 3, 3]
