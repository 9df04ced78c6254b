"""trainer.tracking: JSONL content, stdout lines, rank gating, and a real offline W&B run read
back from its `.wandb` file (no network: WANDB_MODE=offline, no API key)."""
import io
import json
import math
import sys
import time

import numpy as np
import pytest
import torch

from trainer.config import TrackingConfig
from trainer.tracking import (JsonlLogger, MetricLogger, MultiLogger, NullLogger, StdoutLogger,
                              WandbLogger, build_loggers, read_wandb_offline_run,
                              resolve_wandb_mode)


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B that cannot reach the network and writes nothing outside tmp_path."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true",
                       "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true",
                       "WANDB_CONSOLE": "off", "WANDB_X_DISABLE_STATS": "true",
                       "WANDB_DIR": str(tmp_path / "wandb_dir"),
                       "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
                       "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
                       "WANDB_DATA_DIR": str(tmp_path / "wandb_data")}.items():
        monkeypatch.setenv(key, value)
    return tmp_path


def test_jsonl_logger_lines_config_summary(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    logger = JsonlLogger(path)
    assert isinstance(logger, MetricLogger)
    logger.log_config({"train": {"lr": 0.1}})
    logger.log({"train_loss": 0.5, "tensor": torch.tensor(2.0), "np": np.float32(1.5),
                "sizes": [3, 2, 1], "bad": float("nan")}, step=1)
    # flushed at once: readable before close
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    logger.log({"train_loss": 0.25, "sizes": np.array([4, 1])}, step=2)
    logger.log_summary({"val_rmse": 0.9})
    logger.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["train_loss"] == 0.5 and rows[0]["tensor"] == 2.0 and rows[0]["np"] == 1.5
    assert rows[0]["sizes"] == [3, 2, 1] and rows[0]["bad"] is None
    assert rows[1]["sizes"] == [4, 1] and rows[1]["time"] >= rows[0]["time"] > 0
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == {"train": {"lr": 0.1}}
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == {"val_rmse": 0.9}
    again = JsonlLogger(path)                      # appends (resumed runs keep their history)
    again.log({"train_loss": 0.1}, step=3)
    again.close()
    assert len(path.read_text().splitlines()) == 3


def test_stdout_logger_one_compact_line():
    stream = io.StringIO()
    logger = StdoutLogger(stream)
    logger.log({"train_loss": 0.123456, "epoch": 2, "sizes": [1, 2]}, step=7)
    logger.log_summary({"val_rmse": 0.91})
    out = stream.getvalue().splitlines()
    assert out == ["[step 7] train_loss=0.1235 epoch=2"]      # the summary: the final table


def test_multi_logger_fans_out_and_closes_all(tmp_path):
    class Failing(NullLogger):
        def close(self):
            raise RuntimeError("boom")

    jsonl = JsonlLogger(tmp_path / "m.jsonl")
    multi = MultiLogger([Failing(), jsonl])
    multi.log({"a": 1}, step=0)
    with pytest.raises(RuntimeError):
        multi.close()
    assert jsonl._file.closed
    assert json.loads((tmp_path / "m.jsonl").read_text())["a"] == 1


def test_build_loggers_rank_gating_and_names(tmp_path, capsys):
    cfg = TrackingConfig(loggers=["stdout", "jsonl"])
    assert isinstance(build_loggers(cfg, tmp_path, {}, rank=1), NullLogger)
    logger = build_loggers(cfg, tmp_path, {"x": 1}, rank=0)
    logger.log({"loss": 1.0}, step=3)
    logger.close()
    assert "[step 3] loss=1" in capsys.readouterr().out
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 1.0
    assert not (tmp_path / "wandb").exists()
    with pytest.raises(ValueError, match="tensorboard"):
        build_loggers(TrackingConfig(loggers=["tensorboard"]), tmp_path, {}, rank=0)


def test_resolve_wandb_mode(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_wandb_mode(None) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode(None) == "disabled"
    assert resolve_wandb_mode("offline") == "offline"


def test_trainer_modules_import_wandb_lazily():
    import subprocess
    code = ("import sys, trainer.tracking, trainer.config, trainer.metrics, trainer.models; "
            "bad = [m for m in ('wandb', 'ray') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_wandb_offline_run_round_trip(offline_wandb):
    run_dir = offline_wandb / "runs" / "demo"
    config = {"model": {"name": "mf", "embedding_dim": 8}, "train": {"lr": 0.01}}
    logger = build_loggers(TrackingConfig(loggers=["wandb"], wandb_project="cel-test"),
                           run_dir, config, rank=0)
    assert isinstance(logger.loggers[0], WandbLogger) and logger.loggers[0].mode == "offline"
    logger.log_config({"extra": {"seed": 3}})
    logger.log({"train_loss": 0.5, "epoch": 0}, step=1)
    logger.log({"train_loss": 0.25, "cluster_sizes_items": [5, 3, 3, 1]}, step=2)
    logger.log({"val_rmse": 0.93}, step=3)
    logger.log({"num_clusters_items": 4}, step=3)          # same step: merged into one row
    logger.log_summary({"val_rmse": 0.91, "method": "cel"})
    logger.close()

    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    run = read_wandb_offline_run(run_dir)
    deadline = time.monotonic() + 20
    while run["project"] is None and time.monotonic() < deadline:
        # seen once on a heavily loaded machine: W&B's service process was still writing the
        # file after finish() returned; the records arrive, just late
        time.sleep(0.5)
        run = read_wandb_offline_run(run_dir)
    assert run["project"] == "cel-test" and run["name"] == "demo"
    assert run["config"]["model"] == {"name": "mf", "embedding_dim": 8}
    assert run["config"]["train"] == {"lr": 0.01} and run["config"]["extra"] == {"seed": 3}
    assert [row["_step"] for row in run["history"]] == [1, 2, 3]
    rows = {row["_step"]: row for row in run["history"]}
    assert rows[1]["train_loss"] == 0.5 and rows[2]["train_loss"] == 0.25
    hist = rows[2]["cluster_sizes_items"]
    assert hist["_type"] == "histogram" and sum(hist["values"]) == 4
    assert rows[3]["val_rmse"] == pytest.approx(0.93) and rows[3]["num_clusters_items"] == 4
    assert run["summary"]["val_rmse"] == pytest.approx(0.91) and run["summary"]["method"] == "cel"
    assert read_wandb_offline_run(runs[0])["history"] == run["history"]
    assert not math.isnan(run["summary"]["train_loss"])


def test_wandb_cluster_charts_over_training_step(offline_wandb):
    """cluster_sizes_<table> reaches W&B as a histogram, num_clusters_<table> as a scalar, every
    row carries the training step and the run defines it as the charts' x axis."""
    from wandb.proto import wandb_internal_pb2
    from trainer.tracking import _wandb_records

    run_dir = offline_wandb / "runs" / "charts"
    logger = WandbLogger("cel-test", run_dir, {})
    logger.log({"num_clusters_items": 8, "cluster_sizes_items": np.array([40, 30, 20, 10, 0, 0, 0, 0]),
                "num_clusters_users": 2, "cluster_sizes_users": torch.tensor([7, 5])}, step=40)
    logger.log({"num_clusters_items": 16, "cluster_sizes_items": [9] * 16}, step=80)
    logger.close()
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    metrics = []
    deadline = time.monotonic() + 20
    while True:
        run = read_wandb_offline_run(run_dir)
        for data in _wandb_records(files[0]):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(data)
            if rec.WhichOneof("record_type") == "metric":
                metrics.append(rec.metric)
        if len(run["history"]) == 2 or time.monotonic() > deadline:
            break
        metrics.clear()
        time.sleep(0.5)
    assert any(m.name == "step" for m in metrics)
    assert any(m.glob_name == "*" and m.step_metric == "step" for m in metrics)
    first, second = run["history"]
    assert first["step"] == first["_step"] == 40 and second["step"] == 80
    assert first["num_clusters_items"] == 8 and first["num_clusters_users"] == 2
    assert second["num_clusters_items"] == 16
    for row, key, count in ((first, "cluster_sizes_items", 8), (first, "cluster_sizes_users", 2),
                            (second, "cluster_sizes_items", 16)):
        assert row[key]["_type"] == "histogram" and sum(row[key]["values"]) == count


def test_wandb_logger_hands_histogram_objects_to_wandb(monkeypatch, tmp_path, capsys):
    """With a fake wandb module: the objects that reach `run.log` (no raw lists, nothing silently
    dropped) and the step metric definitions."""
    import types

    class Histogram:
        def __init__(self, sequence):
            self.sequence = list(sequence)

    class Run:
        def __init__(self):
            self.logged, self.defined = [], []
            self.config = types.SimpleNamespace(update=lambda *a, **k: None)
            self.summary = {}
            self.settings = types.SimpleNamespace(sync_dir=str(tmp_path / "wandb"))

        def define_metric(self, name, step_metric=None, **_):
            self.defined.append((name, step_metric))

        def log(self, row, step=None, commit=None):
            self.logged.append((dict(row), step))

        def finish(self):
            pass

    run = Run()
    fake = types.SimpleNamespace(init=lambda **_: run, Settings=lambda **kw: kw, Histogram=Histogram)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = WandbLogger("p", tmp_path, mode="offline")
    assert run.defined == [("step", None), ("*", "step")]
    logger.log({"num_clusters_items": 3, "cluster_sizes_items": [5, 2, 1],
                "cluster_sizes_users": [], "train_loss": float("nan")}, step=7)
    logger.log({"num_clusters_items": 4}, step=9)
    logger.close()
    (row, step), (row2, step2) = run.logged
    assert step == 7 and row["step"] == 7 and step2 == 9 and row2 == {"num_clusters_items": 4, "step": 9}
    assert isinstance(row["cluster_sizes_items"], Histogram)
    assert row["cluster_sizes_items"].sequence == [5, 2, 1] and row["num_clusters_items"] == 3
    assert "cluster_sizes_users" not in row and row["train_loss"] is None
    assert not any(isinstance(v, list) for v in row.values())
    assert "cluster_sizes_users has no finite numbers" in capsys.readouterr().err
