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


def test_torchs_own_console_handler_is_quieted_and_its_records_reach_the_run_log(
        fresh_logging, tmp_path, capsys, monkeypatch):
    import sys
    torch_logger = logging.getLogger("torch")        # torch's import installs such a handler
    monkeypatch.setattr(torch_logger, "handlers", [logging.StreamHandler(sys.stderr)])
    monkeypatch.setattr(torch_logger, "propagate", False)
    logs.quiet_console(verbose=False)
    handler = logs.attach_run_log(tmp_path, rank=0)
    logging.getLogger("torch.fx._symbolic_trace").warning("is_fx_tracing will return true")
    logging.getLogger("torch.mine").warning("a torch warning of ours")
    logs.detach_run_log(handler)
    assert handler not in torch_logger.handlers
    assert "is_fx_tracing" in (tmp_path / "logs" / "rank0.log").read_text()
    err = capsys.readouterr().err
    assert "is_fx_tracing" not in err and "a torch warning of ours" in err


def test_the_ray_drivers_skip_regex_drops_rays_own_noise_only():
    import re

    from jobs.ray_train import quiet_ray_env
    env = quiet_ray_env({})
    skip = re.compile(env["RAY_DEDUP_LOGS_SKIP_REGEX"])
    assert env["RAY_AUTH_MODE"] == "token"           # Ray's own default for a local cluster
    for noise in ("Failed to query Ray Train Controller actor state. State API may be ...",
                  "Dataset dataset_035AK_0 execution finished in 0.01 seconds",
                  "Progress bars disabled. To enable, set `ray.data...`",
                  "  self.exclude_resources = exclude_resources"):
        assert skip.search(noise), noise
    for ours in ("[step 40] val_rmse=0.79", "[train] run dir runs/x", "Traceback (most recent call last):",
                 "RuntimeError: worker failed"):
        assert not skip.search(ours), ours
    remote = quiet_ray_env({"ray": {"address": "ray://head:10001"}})
    assert "RAY_AUTH_MODE" not in remote and "Failed to query" not in remote["RAY_DEDUP_LOGS_SKIP_REGEX"]
    assert quiet_ray_env({}, verbose=True) == {}
