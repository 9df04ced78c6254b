"""The CLI through subprocess (one success, one error), and inspect."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from data_pipeline.__main__ import main
from data_pipeline.inspect import summarize
from data_pipeline.sources.movielens import prepare_movielens

ROOT = pathlib.Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_pipeline", *args], cwd=ROOT, text=True,
                          capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_cli_prepare_success_and_error(udata, tmp_path):
    src, raw = udata
    done = cli("prepare", "movielens", "--src", str(src), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["rows"] == 500 and report["splits"] == {"train": 401, "val": 99}
    (src / "u.data").write_text("1\t2\t3\t4\n1\tx7\t3\t5\n")
    failed = cli("prepare", "movielens", "--src", str(src), "--out", str(tmp_path / "out2"))
    assert failed.returncode == 2
    assert failed.stderr.startswith("error: ") and "column 'item' row 1 (line 2)" in failed.stderr
    assert "'x7'" in failed.stderr and not (tmp_path / "out2").exists()


def test_main_synth_and_inspect(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "s"), "--users", "60", "--items", "50",
                 "--interactions", "3000", "--clusters", "3", "--seed", "2", "--label", "click"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 3000
    assert main(["inspect", str(tmp_path / "s")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["label_kind"] == "click" and summary["num_users"] == 60
    assert set(summary["splits"]["train"]["label_histogram"]) == {"0", "1"}
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "meta.json: missing" in capsys.readouterr().err


def test_inspect_counts_and_cold_shares(udata, tmp_path):
    src, raw = udata
    prepare_movielens(src, tmp_path / "out", split="temporal", cut_quantile=0.5)
    s = summarize(tmp_path / "out")
    assert s["rows"] == 500 and s["splits"]["train"]["rows"] == 250
    assert sum(s["splits"]["val"]["label_histogram"].values()) == 250
    train = s["splits"]["train"]
    assert train["cold_users_share"] == 0.0 and train["cold_items_share"] == 0.0
    assert 0.0 <= s["splits"]["val"]["cold_items_share"] <= 1.0
    assert train["density"] == 250 / (train["users"] * train["items"])


def test_main_other_prepare_kinds(tmp_path, capsys):
    from dp_inputs import write_criteo
    write_criteo(tmp_path / "criteo" / "day_0", n=50)
    assert main(["prepare", "criteo", "--src", str(tmp_path / "criteo"), "--out", str(tmp_path / "c"),
                 "--split", "random", "--ratio", "0.6"]) == 0
    assert json.loads(capsys.readouterr().out)["label_kind"] == "click"
    (tmp_path / "x.tsv").write_text("a\tb\tc\n" + "1\t2\t3\n2\t3\t4\n3\t1\t5\n" * 4)
    assert main(["prepare", "csv", "--src", str(tmp_path / "x.tsv"), "--out", str(tmp_path / "x"),
                 "--delimiter", "\\t", "--columns", "user=a,item=b,label=c", "--split", "leave-last"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"] == {"train": 9, "val": 3}
