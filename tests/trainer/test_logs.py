"""Quiet by default: third-party logging below ERROR reaches the run's log file, not the console
(`tracking.verbose=true` lets it through), and what was logged before the run directory existed
(FBGEMM's import-time lines) is written to the file too."""
import logging

import pytest

import trainer.logs as logs


@pytest.fixture
def fresh_logging(monkeypatch):
    """A root logger without handlers and trainer.logs in its initial state (restored after)."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    monkeypatch.setattr(logs, "_installed", False)
    monkeypatch.setattr(logs, "_held", None)
    monkeypatch.setattr(logs, "_filter", None)
    root.handlers[:] = []
    yield root
    root.handlers[:], _ = saved
    root.setLevel(saved[1])
    logging.captureWarnings(False)


def record(name, level=logging.INFO, pathname="/x/site-packages/mine.py", msg="m"):
    return logging.LogRecord(name, level, pathname, 1, msg, None, None)


def test_the_filter_keeps_our_lines_and_third_party_errors_only():
    f = logs.QuietThirdParty()
    assert not f.filter(record("torchrec.distributed.planner.stats"))
    assert not f.filter(record("root", pathname="/v/site-packages/fbgemm_gpu/__init__.py"))   # FBGEMM logs on root
    assert not f.filter(record("ray.train.v2._internal.x", logging.WARNING))
    assert not f.filter(record("py.warnings", logging.WARNING, msg="/v/site-packages/torchrec/x.py:5: FutureWarning"))
    assert f.filter(record("torchrec.distributed", logging.ERROR))
    assert f.filter(record("trainer.loop", logging.WARNING)) and f.filter(record("root"))


def test_held_back_lines_and_later_ones_reach_the_run_log_but_not_the_console(fresh_logging, tmp_path, capsys):
    logs.quiet_console(verbose=False)
    logging.getLogger().info("Successfully loaded: 'libfbgemm.so'")     # before the run log exists
    logging.getLogger("torchrec.distributed.planner").warning("planner table row")
    logging.getLogger("mine").warning("our own warning")
    handler = logs.attach_run_log(tmp_path, rank=0)
    logging.getLogger("torchrec.distributed.planner").info("Parameter Info")
    logs.detach_run_log(handler)
    text = (tmp_path / "logs" / "rank0.log").read_text()
    for line in ("Successfully loaded", "planner table row", "our own warning", "Parameter Info"):
        assert line in text
    err = capsys.readouterr().err
    assert "our own warning" in err and "planner table row" not in err and "Successfully" not in err


def test_verbose_lets_third_party_lines_through(fresh_logging, capsys):
    logs.quiet_console(verbose=True)
    logging.getLogger("torchrec.distributed.planner").warning("planner table row")
    assert "planner table row" in capsys.readouterr().err


def test_a_training_run_writes_torchrecs_planner_to_its_log_file(tmp_path):
    from tests.trainer.test_train_e2e import tiny_config
    from trainer.worker import run_worker
    run_worker(tiny_config(tmp_path, "train.epochs=1"))       # fused tables: sharded by DMP
    text = (tmp_path / "runs" / "tiny" / "logs" / "rank0.log").read_text()
    assert "torchrec" in text and "Parameter Info" in text


def test_local_ray_workers_get_ray_trains_print_patch_off(monkeypatch):
    import ray

    from jobs.ray_train import QUIET_RAY_ENV, init_ray
    from jobs.submit import collect_env
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PRINT_PATCH", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: None)
    assert init_ray({}) is True
    import os
    assert os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0" == QUIET_RAY_ENV["RAY_TRAIN_ENABLE_PRINT_PATCH"]
    assert collect_env([])["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"        # submitted jobs too
