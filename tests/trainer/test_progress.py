"""Quiet by default, with progress: bars on rank 0 only (tqdm in a plain process, one reused
tqdm_ray bar in a Ray worker), none with `tracking.progress=false`, the stdout logger's line per
logged step printed once and whole around a bar, and a real short run that fits on a screen."""
import io
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

import trainer.progress as progress_mod
from tests.trainer.test_train_e2e import ROOT, TINY, tiny_config
from trainer.progress import close_progress, console_write, progress
from trainer.tracking import StdoutLogger


def pieces(text: str) -> list[str]:
    """What a terminal shows over time: the text split at carriage returns and newlines."""
    return [p for p in re.split(r"[\r\n]", text) if p.strip()]


def run_console(cmd, env=None, timeout=120) -> tuple[str, str]:
    """stdout and stderr of a command as bytes decoded as they are (text mode would turn the
    bars' carriage returns into newlines)."""
    env = env or {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=timeout)
    out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out, err


def test_bar_on_rank_0_only():
    buf = io.StringIO()
    assert list(progress(range(4), desc="epoch 1/2", rank=0, ray=False, file=buf)) == [0, 1, 2, 3]
    shown = buf.getvalue()
    assert "epoch 1/2" in shown and "/4 [" in shown
    assert "\n" not in shown                       # transient, on one line: no line left behind
    other = io.StringIO()
    items = range(4)
    assert progress(items, desc="epoch 1/2", rank=1, ray=False, file=other) is items
    assert other.getvalue() == ""


def test_rank_defaults_to_the_launchers_RANK(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    buf = io.StringIO()
    assert list(progress(range(3), desc="eval", ray=False, file=buf)) == [0, 1, 2]
    assert buf.getvalue() == ""
    monkeypatch.setenv("RANK", "0")
    list(progress(range(3), desc="eval", ray=False, file=buf))
    assert "eval" in buf.getvalue()


def test_disabled_gives_the_plain_iterable_and_no_output():
    buf = io.StringIO()
    items = [1, 2]
    assert progress(items, desc="x", enabled=False, rank=0, ray=False, file=buf) is items
    assert buf.getvalue() == ""


def test_step_lines_appear_once_and_whole_around_the_bars():
    buf = io.StringIO()                            # bars and log lines on one stream
    logger = StdoutLogger(buf)
    for step in progress(range(1, 31), desc="epoch 1/1", rank=0, ray=False, file=buf):
        for _ in progress(range(3), desc="reassign item", rank=0, ray=False, file=buf):
            pass
        if step % 10 == 0:
            logger.log({"train_loss": 0.5, "val_count": 7}, step=step)
    assert not progress_mod._open_bars
    lines = [p for p in pieces(buf.getvalue()) if p.startswith("[step")]
    assert lines == [f"[step {s}] train_loss=0.5" for s in (10, 20, 30)]   # counts: jsonl only
    # each log line is its own console line (the bar is cleared first, redrawn after)
    assert all(line.split("\r")[-1].startswith("[step") or "[step" not in line
               for line in buf.getvalue().split("\n"))


def test_console_write_without_a_bar_is_a_print(capsys):
    console_write("[step 1] a=1")
    assert capsys.readouterr().out == "[step 1] a=1\n"


class FakeRayBar:
    """Records what ray.experimental.tqdm_ray.tqdm would send to the driver."""
    made = []

    def __init__(self, desc, total, unit):
        self.desc, self.total, self.n, self.closed, self.shown = desc, total, 0, False, []
        FakeRayBar.made.append(self)

    def set_description(self, desc):
        self.desc = desc
        self.shown.append((desc, self.total, self.n))

    def update(self, n=1):
        self.n += n
        self.shown.append((self.desc, self.total, self.n))

    def close(self):
        self.closed = True
        self.shown.append(("closed", self.total, self.n))


def test_ray_workers_reuse_one_driver_rendered_bar(monkeypatch):
    FakeRayBar.made = []
    monkeypatch.setattr(progress_mod, "_ray_tqdm", FakeRayBar)
    monkeypatch.setattr(progress_mod, "_ray_bar", None)
    assert list(progress(range(2), desc="x", rank=1, ray=True)) == [0, 1]
    assert FakeRayBar.made == []                   # rank 1: nothing sent
    for epoch in range(2):
        for step in progress(range(4), desc=f"epoch {epoch + 1}/2", total=4, rank=0, ray=True):
            if step == 2:
                list(progress(range(3), desc="reassign item", rank=0, ray=True))
                bar = FakeRayBar.made[0]           # the outer loop has its bar back
                assert (bar.desc, bar.total, bar.n) == (f"epoch {epoch + 1}/2", 4, 3)
    assert len(FakeRayBar.made) == 1 and not FakeRayBar.made[0].closed   # no line per epoch
    bar = FakeRayBar.made[0]
    assert ("reassign item", 3, 3) in bar.shown and ("epoch 2/2", 4, 4) in bar.shown
    close_progress("trained 2 epochs", 8)
    assert bar.closed and bar.shown[-2:] == [("trained 2 epochs", 8, 8), ("closed", 8, 8)]
    close_progress()                               # idempotent
    assert progress_mod._ray_bar is None


def test_no_progress_config_draws_no_bar(tmp_path, capsys):
    from trainer.worker import run_worker
    run_worker(tiny_config(tmp_path, "train.epochs=1", "tracking.progress=false",
                           "tracking.loggers=[stdout]", "tracking.log_every_steps=10"))
    out = capsys.readouterr()
    assert "[step 10]" in out.out
    assert "epoch 1/1" not in out.err and "batch/s" not in out.err and "\r" not in out.err


def test_a_short_run_prints_few_console_lines_with_bars(tmp_path):
    """The CLI on a tiny dataset: bars on stderr, the per-step lines once each, the whole
    console (stdout + stderr, as a terminal shows it after the bars clear) within 30 lines."""
    cmd = [sys.executable, "-m", "trainer.main", "--config",
           str(ROOT / "configs/synthetic_small.yaml"), *TINY, "tracking.loggers=[stdout,jsonl]",
           "tracking.log_every_steps=20", f"run.dir={tmp_path / 'runs'}",
           f"data.cache_dir={tmp_path / 'cache'}", "run.name=quiet"]
    out, err = run_console(cmd)
    assert out.count("\n") + err.count("\n") <= 30, out + err
    assert "epoch 1/2" in err and "eval val" in err and "reassign" in err
    logged = [json.loads(line)["step"] for line in
              (tmp_path / "runs" / "quiet" / "metrics.jsonl").read_text().splitlines()]
    printed = [int(m) for m in re.findall(r"^\[step (\d+)\]", out, re.M)]
    assert printed == logged and len(printed) >= 3
    assert "[train] run dir" in out and "val_rmse" in out.split("final metrics")[-1]
    assert "Parameter Info" not in out + err                         # TorchRec's planner table


@pytest.mark.slow
@pytest.mark.ray
def test_a_short_ray_run_fits_on_a_screen(tmp_path):
    """`make train`'s path (jobs.ray_train, 2 workers) on a tiny dataset: no Ray banner, no
    per-worker or per-report lines, the bars rendered by the driver, the final table."""
    cmd = [sys.executable, "-m", "jobs.ray_train", "--config",
           str(ROOT / "configs/synthetic_small.yaml"), *TINY, "tracking.loggers=[stdout]",
           "tracking.log_every_steps=20", f"run.dir={tmp_path / 'runs'}",
           f"data.cache_dir={tmp_path / 'cache'}", "run.name=quiet_ray", "ray.num_cpus=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RAY_DEDUP_LOGS_SKIP_REGEX", "RAY_AUTH_MODE", "RAY_ADDRESS"):
        env.pop(key, None)
    out = "".join(run_console(cmd, env, timeout=300))
    assert out.count("\n") <= 30, out
    assert "epoch 1/2" in out and "[ray_train] finished" in out and "best_val_rmse" in out
    for noise in ("Started a local Ray instance", "Token authentication", "report 1",
                  "Failed to query", "Setting up process group", "execution finished"):
        assert noise not in out, noise
