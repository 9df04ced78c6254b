"""The real CEL trainer under Ray Train on a real local Ray: 2 workers read Ray Data shards of a
Parquet dataset, train with splits and reassignments, checkpoint; and a run whose worker dies
mid-run resumes from its last checkpoint with the cluster state intact."""
from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest

ray = pytest.importorskip("ray")

from jobs.ray_train import final_metrics, run_ray_training  # noqa: E402
from trainer.config import config_to_dict, load_config  # noqa: E402

pytestmark = pytest.mark.ray
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ["data.synthetic.users=300", "data.synthetic.items=200", "data.synthetic.interactions=12000",
        "data.synthetic.clusters=4", "data.batch_size=256", "cel.items.max_clusters=8",
        "cel.users.max_clusters=4", "cel.split_interval=3", "cel.split_until=200",
        "cel.reassign_rule=every", "cel.reassign_period=10", "tracking.loggers=[jsonl]",
        "data.reader=ray", "ray.num_workers=2", "ray.cpus_per_worker=0.5"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def config(tmp_path, *extra):
    cfg = load_config(str(ROOT / "configs/synthetic_small.yaml"),
                      [*TINY, f"run.dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}",
                       "run.name=ray", *extra])
    return config_to_dict(cfg)


def die_once_after_first_checkpoint(config: dict, ctx) -> dict:
    """The real worker, except that rank 1 of the first attempt is killed right after the first
    checkpoint is committed (a marker file makes it happen once)."""
    from trainer.worker import ray_worker_entry
    marker = pathlib.Path(config["run"]["dir"]) / "killed-once"
    report = ctx.report

    def report_then_die(metrics, checkpoint_dir=None):
        report(metrics, checkpoint_dir=checkpoint_dir)
        if ctx.rank == 1 and not marker.exists():
            ctx.wait_committed()
            marker.write_text(json.dumps({"step": metrics.get("step")}))
            os._exit(1)
    ctx.report = report_then_die
    return ray_worker_entry(config, ctx)


def test_ray_train_two_workers_with_cluster_phases(local_ray, tmp_path):
    result = run_ray_training(config(tmp_path, "train.epochs=2"))
    metrics = final_metrics(result)
    run_dir = tmp_path / "runs" / "ray"
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val_rmse"] == pytest.approx(on_disk["val_rmse"])
    assert on_disk["num_clusters_items"] > 1 and on_disk["val_rmse"] < 1.2
    phases = [json.loads(line) for line in (run_dir / "phases.jsonl").read_text().splitlines()]
    assert {p["kind"] for p in phases} == {"split", "reassign"}
    assert result.checkpoint is not None
    with result.checkpoint.as_directory() as d:
        meta = json.loads((pathlib.Path(d) / "meta.json").read_text())
        assert meta["world_size"] == 2 and meta["epoch"] == 2
        assert meta["cluster_state"]["item"]["num_active"] == on_disk["num_clusters_items"]
        assert (pathlib.Path(d) / "sharded").is_dir() and (pathlib.Path(d) / "state.pt").exists()


def test_worker_killed_mid_run_resumes_with_cluster_state_intact(local_ray, tmp_path):
    result = run_ray_training(config(tmp_path, "train.epochs=3", "ray.max_failures=1"),
                              die_once_after_first_checkpoint)
    run_dir = tmp_path / "runs" / "ray"
    killed = json.loads((tmp_path / "runs" / "killed-once").read_text())
    resumes = [json.loads(line) for line in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert len(resumes) == 1
    # resumed from the checkpoint written just before the kill, and the loaded maps equal the
    # ones saved with it (the trainer checks the SHA-1 of every assignment map)
    assert resumes[0]["step"] == killed["step"] and resumes[0]["epoch"] == 1
    assert resumes[0]["verified"] is True and resumes[0]["cluster_state"]["item"]["num_active"] > 1
    metrics = final_metrics(result)
    assert metrics["epochs"] == 3 and metrics["val_rmse"] < 1.2
