"""bench.plots through `python -m bench.report --plots DIR [--run RUN_DIR]`: small synthetic results
files and run directories in tmp_path; every PNG valid, missing inputs noted, a bad --run an error."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")
from matplotlib import image as mpimg  # noqa: E402

from bench import plots, report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _results(path, name, records):
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{name}.json").write_text(json.dumps(
        {"benchmark": name, "commit": "abc1234", "machine": "test 2 cpus", "records": records}))


def write_all_results(res):
    _results(res, "quality_ml100k", [
        {"dataset": "d", "model": "mf", "method": m, "embedding_bytes": b, "best_val_rmse": q,
         "item_clusters": k}
        for m, b, q, k in (("cel", 15000, 0.93, 10), ("cel", 20000, 0.92, 50),
                           ("full", 240000, 0.921, None), ("hash", 20000, 1.03, None))])
    _results(res, "ctr", [
        {"dataset": ds, "model": "dlrm", "method": m, "embedding_bytes": b, "val_auc": a}
        for ds in ("synthetic_ctr", "ml100k_click")
        for m, b, a in (("full", 2e7, 0.65), ("cel", 2e6, 0.68), ("qr", 1.8e6, 0.67))])
    _results(res, "surprise_peers", [{"method": "surprise-svd", "item_side_bytes": 679528, "val_rmse": 0.918},
                                     {"method": "ours: cel@50", "item_side_bytes": 20656, "val_rmse": 0.925}])
    _results(res, "retrieval", [{"dataset": "d", "model": "mf", "method": m, "item_side_bytes": b,
                                 "embedding_bytes": 2 * b, "recall_at_20": r}
                                for m, b, r in (("full", 200000, 0.37), ("cel", 20000, 0.36))])
    _results(res, "compression", [{"method": m, "embedding_bytes": b, "auc": a}
                                  for m, b, a in (("cel", 1e5, 0.75), ("hash", 1e5, 0.70),
                                                  ("cel", 5e4, 0.74))])


def write_run(run, sizes=True):
    run.mkdir(parents=True, exist_ok=True)
    phases, n = [], {"item": 1, "user": 1}
    for step in (2, 4, 6, 8):
        for table in ("item", "user"):
            if table == "user" and step > 4:
                continue
            n[table] *= 2
            phases.append({"step": step, "epoch": 0, "kind": "split", "table": table,
                           "seconds": 0.01, "num_clusters": n[table], "splits": n[table] // 2})
    for epoch, step in ((0, 40), (1, 80), (1, 120)):
        for table in ("item", "user"):
            phases.append({"step": step, "epoch": epoch, "kind": "reassign", "table": table,
                           "seconds": 0.02 + 0.01 * epoch, "num_clusters": n[table]})
    (run / "phases.jsonl").write_text("".join(json.dumps(p) + "\n" for p in phases))
    rows = [{"step": 50, "train_loss": 0.6, "num_clusters_items": 16, "num_clusters_users": 4}]
    last = {"step": 160, "val_rmse": 0.8, "num_clusters_items": 16, "num_clusters_users": 4}
    if sizes:
        last |= {"cluster_sizes_items": [300, 200, 150, 100, 80, 60, 40, 30, 20, 10, 5, 3, 1, 1, 0, 0],
                 "cluster_sizes_users": [900, 600, 400, 100]}
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + [last]))


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400 and img.shape[2] in (3, 4)


def test_all_plots_written_and_valid(tmp_path, capsys):
    res, run, out = tmp_path / "results", tmp_path / "runs" / "r1", tmp_path / "out"
    write_all_results(res)
    write_run(run)
    written = report.plots(str(out), str(run), [], res)
    names = sorted(p.name for p in written)
    assert names == sorted([f"quality_vs_bytes_{s.name}.png" for s in plots.QUALITY_SOURCES]
                           + list(plots.RUN_PLOTS))
    printed = capsys.readouterr().out.splitlines()
    for path in written:
        assert str(path) in printed
        assert_png(path)
    assert "skipped" not in "\n".join(printed)


def test_missing_inputs_are_notes_not_crashes(tmp_path, monkeypatch, capsys):
    """No results files and no runs/ under the cwd: a note per plot, nothing written."""
    monkeypatch.chdir(tmp_path)
    report.main(["--plots", "out", "--results", str(tmp_path / "none")])
    out = capsys.readouterr().out
    for s in plots.QUALITY_SOURCES:
        assert f"skipped quality_vs_bytes_{s.name}.png: none/{s.name}.json not found" in out
    assert ("no run directory under runs/ (pass --run RUN_DIR): skipped cluster_count.png, "
            "cluster_sizes.png, phase_time.png") in out
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_default_run_is_newest_under_runs_and_partial_runs(tmp_path, monkeypatch, capsys):
    res = tmp_path / "results"
    _results(res, "ctr", [{"method": "full", "model": "dlrm"}])        # no metric: a note
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path / "runs" / "old")
    (tmp_path / "runs" / "new").mkdir(parents=True)                     # a full-table run
    (tmp_path / "runs" / "new" / "metrics.jsonl").write_text(json.dumps({"step": 5, "val_rmse": 1.0}) + "\n")
    (tmp_path / "runs" / "not_a_run").mkdir()
    old = tmp_path / "runs" / "old"
    for f in ("metrics.jsonl", "phases.jsonl"):
        os.utime(old / f, (1_000_000, 1_000_000))
    report.main(["--plots", "out", "--results", str(res), "ctr", "scale"])
    out = capsys.readouterr().out
    assert "newest run under runs/: runs/new" in out
    assert "skipped quality_vs_bytes_ctr.png: its records have no val_auc" in out
    assert "scale: no quality-vs-bytes plot for this results file" in out
    for name in plots.RUN_PLOTS:
        assert f"skipped {name}" in out
    # only the older run has the cluster data; without sizes, that one plot is noted
    write_run(tmp_path / "runs" / "nosizes", sizes=False)
    written = plots.run_plots(tmp_path / "runs" / "nosizes", tmp_path / "out2")
    assert sorted(p.name for p in written) == ["cluster_count.png", "phase_time.png"]
    assert "skipped cluster_sizes.png" in capsys.readouterr().out


def test_bad_run_path_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    proc = subprocess.run([sys.executable, "-m", "bench.report", "--plots", str(tmp_path / "out"),
                           "--run", str(missing)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert f"error: --run {missing}: no such directory" in proc.stderr
    assert "Traceback" not in proc.stderr
    empty = tmp_path / "empty"                      # a directory, but no run files in it
    empty.mkdir()
    with pytest.raises(SystemExit) as exc:
        report.main(["--plots", str(tmp_path / "out"), "--run", str(empty)])
    assert exc.value.code == 2
    assert (f"error: --run {empty}: not a run directory (no metrics.jsonl or phases.jsonl there)"
            in capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_tables_still_print(tmp_path, capsys):
    res = tmp_path / "results"
    write_all_results(res)
    report.main(["--results", str(res), "ctr"])
    out = capsys.readouterr().out
    assert "### ctr (commit abc1234" in out and "| synthetic_ctr" in out
