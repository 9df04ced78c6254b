"""jobs.submit against a real Ray head on 127.0.0.1 (Jobs API through the dashboard): a job that
succeeds, one that fails, the dry-run spec, and the usage errors."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
RAY = pathlib.Path(sys.executable).with_name("ray")


def submit(*args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.submit", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout, env={**os.environ, **(env or {})})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    return [int(pid) for pid, s in (line.split() for line in out.splitlines()) if int(s) == sid]


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head with its dashboard on free local ports, in its own session and temp dir.
    Teardown stops exactly the processes of that session (by pid) rather than `ray stop --force`,
    which would also stop other Ray instances running on this machine."""
    import ray
    if ray.is_initialized():
        ray.shutdown()
    port, dashboard_port = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")   # short: Ray's socket paths
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={temp_dir}",
         # the job agent's ports too: the defaults (52365...) clash with any other Ray on the
         # machine, and then the head answers "No available agent to submit job"
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        from ray.job_submission import JobSubmissionClient

        from jobs.submit import use_token_if_available
        use_token_if_available()          # the head enables token auth when ~/.ray has one
        start, deadline = time.monotonic(), time.monotonic() + 120
        while True:
            assert head.poll() is None, f"ray start exited with {head.returncode}"
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        print(f"\n[test] Ray head + dashboard up in {time.monotonic() - start:.1f}s")
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)        # `ray start --block` stops its children
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        for pid in _session_pids(head.pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.ray
def test_submit_job(ray_head):
    start = time.monotonic()
    ok = submit("--address", ray_head, "--entrypoint",
                "python -c 'import os, ray; print(12345, ray.__version__, "
                "os.path.isfile(\"jobs/submit.py\"), os.path.isdir(\".venv\"))'")
    print(f"[test] succeeding job took {time.monotonic() - start:.1f}s")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # the venv's interpreter ran it (ray imports), in a copy of the repo without .venv
    assert "12345 2.60.0 True False" in ok.stdout
    assert "SUCCEEDED" in ok.stdout

    start = time.monotonic()
    bad = submit("--address", ray_head, "--entrypoint",
                 "python -c 'import sys; print(\"about to fail\"); sys.exit(3)'")
    print(f"[test] failing job took {time.monotonic() - start:.1f}s")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "about to fail" in bad.stdout and "FAILED" in bad.stdout


def test_dry_run_spec():
    out = submit("--address", "http://127.0.0.1:8265", "--config", "configs/synthetic_small.yaml",
                 "train.epochs=1", "--dry-run", "--env", "EXTRA_FLAG=1",
                 env={"WANDB_MODE": "offline", "WANDB_API_KEY": "secret-value"}, timeout=60)
    assert out.returncode == 0, out.stderr
    spec = json.loads(out.stdout)
    runtime_env = spec["runtime_env"]
    assert runtime_env["working_dir"] == str(ROOT)
    assert {"/.venv/", "/data/", "/runs/", "/wandb/", "/.git/", "/bench/results/"} <= set(
        runtime_env["excludes"])
    assert runtime_env["env_vars"]["WANDB_MODE"] == "offline"
    assert runtime_env["env_vars"]["WANDB_API_KEY"] == "***"       # forwarded, never printed
    assert runtime_env["env_vars"]["EXTRA_FLAG"] == "1"
    assert "secret-value" not in out.stdout
    assert spec["entrypoint"].startswith(f"{sys.executable} -m jobs.ray_train --config "
                                         f"configs/synthetic_small.yaml train.epochs=1")
    assert f"run.dir={ROOT / 'runs'}" in spec["entrypoint"]


def test_usage_errors():
    missing = submit("--config", "configs/does_not_exist.yaml", "--dry-run", timeout=60)
    assert missing.returncode == 2 and "not found" in missing.stderr
    unreachable = submit("--address", f"http://127.0.0.1:{free_port()}", "--entrypoint",
                         "python -c 'print(1)'", timeout=60)
    assert unreachable.returncode == 2 and "cannot reach" in unreachable.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_submit_training_job(ray_head, tmp_path):
    """The whole path: jobs.submit -> (job) jobs.ray_train CLI -> Ray Train workers reading the
    Parquet splits -> checkpoints in run.dir -> final metrics table in the job's logs."""
    from tests.jobs.test_ray_train import write_dataset
    data_dir = write_dataset(tmp_path / "data")
    config = tmp_path / "tiny.yaml"
    config.write_text(f"ray: {{num_workers: 2, cpus_per_worker: 0.5}}\n"
                      f"run: {{dir: {tmp_path / 'runs'}, name: tiny}}\n"
                      f"data: {{path: {data_dir}, batch_size: 256}}\n"
                      f"train: {{epochs: 2, seed: 0}}\ntest: {{work_dir: {tmp_path}}}\n")
    start = time.monotonic()
    out = submit("--address", ray_head, "--entrypoint",
                 f"python -m jobs.ray_train --config {config} "
                 f"--worker tests.jobs.test_ray_train:mf_worker", timeout=400)
    print(f"[test] training job took {time.monotonic() - start:.1f}s")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[ray_train] report 2" in out.stdout and "rows_per_rank  2048" in out.stdout
    assert list((tmp_path / "runs" / "tiny" / "ray_train").glob("checkpoint_*/state.pt"))
