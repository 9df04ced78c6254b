"""The prepared GPU check cannot rot: its CPU smoke mode runs every part (the CUDA tests on CPU,
two trainer runs, the step and ops benchmarks at toy sizes) and writes its results file."""
import json
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_gpu_check_script_runs_end_to_end_in_cpu_mode(tmp_path):
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu", "--out-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    assert result["device"] == "cpu (smoke mode)" and result["torch"] and result["commit"]
    parts = {r["part"] for r in result["records"]}
    assert parts == {"tests", "ml100k", "step", "ops"}
    assert result["records"][0]["passed"] and "passed" in result["summary"]["pytest -m cuda"]
    steps = {r["method"]: r for r in result["records"] if r["part"] == "step"}
    assert set(steps) == {"cel", "cel_window", "full", "full_sparse"}
    assert all(r["step_s"] > 0 for r in steps.values()) and steps["full"]["vs_full"] == 1.0
    ml = [r for r in result["records"] if r["part"] == "ml100k"]
    assert {r["method"] for r in ml} == {"cel50", "full"} and all(r["best_val_rmse"] < 1.5 for r in ml)
    assert "GPCA split event ms (target <= 2)" in result["summary"]
    assert "[gpu_check]" in proc.stdout and "CEL step / full step" in proc.stdout


def test_the_gpu_check_refuses_a_gpu_run_without_cuda_and_unknown_parts():
    import sys
    bad = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--cpu", "--skip", "tests,nope"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown parts ['nope']" in bad.stderr
