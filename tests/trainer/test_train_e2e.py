"""End-to-end runs of the trainer on a tiny synthetic dataset: one process in-process, and a
2-process torchrun smoke test (gloo)."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from trainer.config import load_config
from trainer.dist import init_distributed
from trainer.loop import TrainRecipe
from trainer.worker import run_worker

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ["data.synthetic.users=300", "data.synthetic.items=200", "data.synthetic.interactions=12000",
        "data.synthetic.clusters=4", "data.batch_size=256", "cel.items.max_clusters=8",
        "cel.users.max_clusters=4", "cel.split_interval=3", "cel.split_until=200",
        "cel.reassign_rule=every", "cel.reassign_period=10", "train.epochs=2",
        "tracking.loggers=[jsonl]"]


def tiny_config(tmp_path, *extra):
    return load_config(str(ROOT / "configs/synthetic_small.yaml"),
                       [*TINY, f"run.dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}",
                        "run.name=tiny", *extra])


def test_single_process_run_writes_metrics_and_clusters(tmp_path):
    metrics = run_worker(tiny_config(tmp_path))
    run_dir = tmp_path / "runs" / "tiny"
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    for key in ("val_rmse", "val_rmse_cold", "val_rmse_warm", "embedding_bytes",
                "num_clusters_items", "num_clusters_users", "train_time_s", "split_time_s"):
        assert key in on_disk, key
    assert on_disk["val_rmse"] == pytest.approx(metrics["val_rmse"])
    assert 1 < on_disk["num_clusters_items"] <= 8 and 1 < on_disk["num_clusters_users"] <= 4
    assert on_disk["val_rmse"] < 1.2          # ratings 1..5: far better than a constant guess
    kinds = {json.loads(line)["kind"] for line in (run_dir / "phases.jsonl").read_text().splitlines()}
    assert kinds == {"split", "reassign"}
    assert (run_dir / "checkpoint" / "state.pt").exists()
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("train_loss" in h for h in history) and any("val_rmse" in h for h in history)


def _predictions(recipe):
    recipe.emb.eval(), recipe.model.eval()
    out = []
    with torch.no_grad():
        for kjt, dense, label in recipe.val_source.epoch(0):
            out.append(recipe.model(recipe.emb(kjt).to_dict(), dense))
    return torch.cat(out)


def test_checkpoint_round_trip_resumes_identical_predictions_and_cluster_state(tmp_path):
    cfg = tiny_config(tmp_path, "train.epochs=1")
    first = TrainRecipe(cfg, init_distributed())
    first.setup()
    first.train()
    expected = _predictions(first)
    state = first.cel.cluster_states["item"]
    assert state.num_active > 1
    second = TrainRecipe(tiny_config(tmp_path, "train.epochs=1", "run.resume=true"), init_distributed())
    second.setup()                      # resumes from runs/tiny/checkpoint
    assert second.step == first.step and second.epoch == 1
    assert torch.equal(second.cel.cluster_states["item"].assignment, state.assignment)
    assert second.cel.cluster_states["item"].num_active == state.num_active
    for t in ("item", "user"):
        c1, e1, g1 = first.cel.window_gradients(t)
        c2, e2, g2 = second.cel.window_gradients(t)
        assert torch.equal(c1, c2) and torch.equal(e1, e2) and torch.equal(g1, g2)
    assert torch.equal(_predictions(second), expected)
    first.cleanup(), second.cleanup()


@pytest.mark.dist
def test_torchrun_two_processes_smoke(tmp_path):
    torchrun = pathlib.Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "trainer.main", "--config",
           str(ROOT / "configs/synthetic_small.yaml"), *TINY, "train.max_steps=12",
           f"run.dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}", "run.name=tr"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tr"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 12 and metrics["num_clusters_items"] > 1
    phases = [json.loads(line) for line in (run_dir / "phases.jsonl").read_text().splitlines()]
    assert any(p["kind"] == "split" and p["splits"] >= 1 for p in phases)
    assert "ranks 2 (gloo, table_wise, batch_scope global)" in proc.stdout
    assert (run_dir / "checkpoint" / "sharded").is_dir()


def test_cli_rejects_bad_config_and_missing_data_with_exit_2(tmp_path):
    base = [sys.executable, "-m", "trainer.main", "--config", str(ROOT / "configs/ml100k_mf.yaml")]
    bad_key = subprocess.run([*base, "cel.items.max_clusterz=3"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    assert bad_key.returncode == 2 and "unknown key 'cel.items.max_clusterz'" in bad_key.stderr
    no_data = subprocess.run([*base, f"data.path={tmp_path / 'nowhere'}", f"run.dir={tmp_path}"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert no_data.returncode == 2 and "not a prepared dataset" in no_data.stderr


def _group_owner_worker(rank, world):
    """Under a process group someone else created (Ray Train's case), the trainer neither claims
    nor destroys it."""
    import torch.distributed as dist

    from trainer.dist import shutdown_distributed
    env = init_distributed()
    shutdown_distributed(env)
    return (env.owns_process_group, env.world_size, dist.is_initialized())


def test_trainer_destroys_only_the_process_group_it_created():
    from tests.distributed.harness import run_ranks
    from trainer.dist import shutdown_distributed
    single = init_distributed()                       # one process: no group at all
    assert (single.owns_process_group, single.backend) == (False, None)
    shutdown_distributed(single)
    assert run_ranks(_group_owner_worker) == [(False, 2, True)] * 2


def test_a_fresh_run_in_a_reused_run_dir_starts_its_logs_afresh_and_a_resumed_one_appends(tmp_path):
    run_dir = tmp_path / "runs" / "tiny"

    def lines():
        return {n: len((run_dir / n).read_text().splitlines())
                for n in ("phases.jsonl", "metrics.jsonl")}

    run_worker(tiny_config(tmp_path, "train.epochs=1"))
    first = lines()
    assert first["phases.jsonl"] > 0 and first["metrics.jsonl"] > 0
    run_worker(tiny_config(tmp_path, "train.epochs=1"))           # run.resume=false: fresh
    assert lines() == first
    run_worker(tiny_config(tmp_path, "train.epochs=2", "run.resume=true"))
    resumed = lines()
    assert all(resumed[n] > first[n] for n in first)
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)             # one run's history, continued, not two interleaved


@pytest.mark.parametrize("fused", ["on", "off"])
def test_embedding_state_bytes_counts_tables_and_their_optimizer_state(tmp_path, fused):
    """Full tables under Adagrad: the rows plus one accumulator per element, whether FBGEMM's
    fused kernels hold them or torch's optimizer. CEL: its rows and maps plus its counters and
    split windows, and it stays below the full model's state even at this toy size."""
    full = run_worker(tiny_config(tmp_path, "embedding.method=full", "train.epochs=1",
                                  f"train.fused_tables={fused}"))
    assert 2 * full["embedding_bytes"] <= full["embedding_state_bytes"] \
        <= 2 * full["embedding_bytes"] + 4096
    cel = run_worker(tiny_config(tmp_path, "train.epochs=1", f"train.fused_tables={fused}",
                                 "run.name=tiny_cel"))
    assert cel["embedding_bytes"] < cel["embedding_state_bytes"] < full["embedding_state_bytes"]


def test_resume_restores_the_cel_lite_buffer_of_recent_batches(tmp_path):
    """Nothing lost on a crash: the batches since the last reassignment, which CEL-Lite scores
    at the next one, come back with the checkpoint."""
    cfg = tiny_config(tmp_path, "train.epochs=1", "cel.reassign_mode=lite")
    first = TrainRecipe(cfg, init_distributed())
    first.setup()
    first.train()
    saved = list(first.recent)
    assert len(first.recent) > 0 and saved            # the epoch ended between reassignments
    second = TrainRecipe(tiny_config(tmp_path, "train.epochs=1", "cel.reassign_mode=lite",
                                     "run.resume=true"), init_distributed())
    second.setup()
    restored = list(second.recent)
    assert len(second.recent) == len(first.recent) and len(restored) == len(saved)
    for (k1, d1, y1), (k2, d2, y2) in zip(saved, restored):
        assert k1.keys() == k2.keys()
        assert torch.equal(k1.values(), k2.values()) and torch.equal(k1.lengths(), k2.lengths())
        assert torch.equal(y1, y2) and (d1 is None) == (d2 is None)
    first.cleanup(), second.cleanup()


def test_reassign_per_epoch_keeps_the_phase_count_per_epoch_on_a_larger_dataset(tmp_path):
    """`cel.reassign_per_epoch` turns into steps from the dataset: twice the data, twice the
    steps between reassignments, the same reassignments per epoch."""
    periods = {}
    for n in (12000, 24000):
        r = TrainRecipe(tiny_config(tmp_path, f"data.synthetic.interactions={n}",
                                    "cel.reassign_per_epoch=2", "cel.reassign_rule=reference"),
                        init_distributed())
        r.setup()
        epoch_steps = -(-r.meta.splits["train"] // 256)
        assert r.schedule.reassign_rule == "every"
        assert r.schedule.reassign_period == round(epoch_steps / 2)
        periods[n] = r.schedule.reassign_period
        r.cleanup()
    assert abs(periods[24000] - 2 * periods[12000]) <= 1
    with pytest.raises(ValueError, match="reassign_per_epoch"):
        TrainRecipe(tiny_config(tmp_path, "cel.reassign_per_epoch=2", "cel.interval_unit=epoch"),
                    init_distributed()).setup()


def test_gmf_with_bce_trains_cel_on_clicks(tmp_path):
    """The CCE paper's harness model (GMF: dot product, sigmoid, BCE) with CEL on both tables:
    exact reassignment through its linear form; better than chance on planted clicks."""
    metrics = run_worker(tiny_config(tmp_path, "data.synthetic.label=click", "model.name=gmf",
                                     "model.embedding_dim=16", "train.loss=bce", "train.lr=0.05"))
    assert metrics["val_auc"] > 0.6, metrics["val_auc"]
    assert metrics["num_clusters_items"] > 1 and metrics["num_clusters_users"] > 1
