"""The synthetic Criteo-like click data: schema, determinism, CTR, power-law popularity, the
planted click model, bounded-memory generation of 1e6 rows."""
from __future__ import annotations

import json
import os
import pathlib
import resource
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline import schema
from data_pipeline.__main__ import main
from data_pipeline.dataset import load_meta, load_planted, load_train_counts, load_vocab
from data_pipeline.errors import DataError
from data_pipeline.synthetic_ctr import CtrModel, generate_synthetic_ctr, vocab_sizes

ROOT = pathlib.Path(__file__).resolve().parents[2]
KW = dict(rows=40_000, vocab_max=20_000, seed=3)


@pytest.fixture(scope="module")
def ctr(tmp_path_factory):
    out = tmp_path_factory.mktemp("ctr") / "ds"
    meta = generate_synthetic_ctr(out, chunk_rows=9_000, **KW)          # 5 chunks
    return out, meta


def table(out, split="train") -> pa.Table:
    return pq.read_table(out / split)


def auc(score: np.ndarray, label: np.ndarray) -> float:
    rank = np.argsort(np.argsort(score, kind="stable")) + 1.0
    pos = label == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((rank[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_shapes_schema_vocab_and_planted_files(ctr):
    out, meta = ctr
    assert meta.label_kind == "click" and sum(meta.splits.values()) == 40_000
    assert 0.08 < meta.splits["val"] / 40_000 < 0.12
    sparse = [f"sparse_C{i}" for i in range(3, 27)]
    assert list(meta.sparse_features) == sparse
    assert meta.dense_features == [f"dense_I{j}" for j in range(1, 14)]
    sizes = [meta.num_users, meta.num_items, *meta.sparse_features.values()]
    assert sizes == vocab_sizes(26, 10, 20_000) and sizes[0] == 20_000 and sizes[-1] == 10
    ratios = np.array(sizes[:-1]) / np.array(sizes[1:])
    assert np.allclose(ratios, ratios.mean(), rtol=0.1)           # log-uniform spread
    train, val = table(out), table(out, "val")
    assert train.schema.equals(schema.arrow_schema(sparse, meta.dense_features))
    ts = np.concatenate([train.column("timestamp").to_numpy(), val.column("timestamp").to_numpy()])
    assert np.array_equal(np.sort(ts), np.arange(40_000))
    for column, entity, size in zip(["user_id", "item_id", *sparse], ["users", "items", *sparse], sizes):
        ids = train.column(column).to_numpy()
        assert 0 <= ids.min() and ids.max() < size
        assert np.array_equal(load_train_counts(out, entity), np.bincount(ids, minlength=size))
        assert load_vocab(out, entity).num_rows == size
        planted = load_planted(out, entity)
        assert planted.shape == (size,) and 0 <= planted.min() and planted.max() < 16
    assert set(load_planted(out, "users")) == set(range(16))
    dense = np.stack([train.column(c).to_numpy() for c in meta.dense_features], axis=1)
    assert dense.dtype == np.float32 and (dense >= 0).all() and (dense == 0).any()
    assert meta.extra["user_col"] == "C1" and meta.extra["synthetic_ctr"]["clusters"] == 16


def test_deterministic_for_a_seed(ctr, tmp_path):
    out, meta = ctr
    again = generate_synthetic_ctr(tmp_path / "again", chunk_rows=9_000, **KW)
    assert again.to_json() == meta.to_json()
    for split in ("train", "val"):
        assert table(out, split).equals(table(tmp_path / "again", split))
    for entity in ("users", "sparse_C26"):
        assert np.array_equal(load_planted(out, entity), load_planted(tmp_path / "again", entity))
    other = generate_synthetic_ctr(tmp_path / "other", chunk_rows=9_000, **{**KW, "seed": 4})
    assert not table(out).equals(table(tmp_path / "other"))
    assert other.splits != meta.splits or not np.array_equal(
        load_planted(out, "users"), load_planted(tmp_path / "other", "users"))


def test_click_rate_and_power_law(ctr):
    out, _ = ctr
    y = np.concatenate([table(out, s).column("label").to_numpy() for s in ("train", "val")])
    assert set(np.unique(y)) == {0.0, 1.0} and 0.15 <= y.mean() <= 0.35
    counts = np.bincount(table(out).column("user_id").to_numpy(), minlength=20_000)
    drawn = counts[counts > 0]
    assert counts.max() > 100 * np.median(drawn)          # a head value and a long tail
    assert (counts == 0).mean() > 0.3                     # many values never drawn
    assert (drawn == 1).mean() > 0.3                      # many seen once


def test_labels_follow_the_planted_logit(ctr):
    out, meta = ctr
    model = CtrModel(meta.extra["synthetic_ctr"])
    t = table(out)
    ids = [t.column(c).to_numpy() for c in meta.extra["vocab_sizes"]]
    dense = np.stack([t.column(c).to_numpy() for c in meta.dense_features], axis=1)
    y = t.column("label").to_numpy()
    logit = model.logit(ids, dense)
    assert auc(logit, y) > 0.7
    assert abs((1 / (1 + np.exp(-logit))).mean() - y.mean()) < 0.02        # calibrated
    # the planted clusters carry the signal: CTR differs between (user, item) cluster pairs
    pair = load_planted(out, "users")[ids[0]] * 16 + load_planted(out, "items")[ids[1]]
    rows = np.bincount(pair, minlength=256)
    ctr_of = np.bincount(pair, weights=y, minlength=256)[rows >= 200] / rows[rows >= 200]
    assert ctr_of.max() - ctr_of.min() > 0.2


def test_cli_and_bad_parameters(tmp_path, capsys):
    assert main(["synth-ctr", "--out", str(tmp_path / "c"), "--rows", "3000", "--vocab-max", "500",
                 "--categorical", "5", "--dense", "2", "--clusters", "4", "--seed", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 3000 and report["label_kind"] == "click" and report["users"] == 500
    meta = load_meta(tmp_path / "c")
    assert list(meta.sparse_features) == ["sparse_C3", "sparse_C4", "sparse_C5"]
    assert meta.dense_features == ["dense_I1", "dense_I2"]
    assert main(["synth-ctr", "--out", str(tmp_path / "c"), "--rows", "10"]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(DataError, match="categorical must be >= 2"):
        generate_synthetic_ctr(tmp_path / "x", categorical=1)
    with pytest.raises(DataError, match="unknown synthetic CTR parameters"):
        generate_synthetic_ctr(tmp_path / "x", users=3)


def test_million_rows_in_bounded_memory(tmp_path):
    """The CLI at the default sizes (1e6 values in the largest vocabulary), in a child process
    so its peak RSS can be read."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "data_pipeline", "synth-ctr", "--out",
                           str(tmp_path / "m"), "--rows", "1000000"], cwd=ROOT, text=True,
                          capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rows"] == 1_000_000
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    assert peak_mib < 1500, f"peak RSS {peak_mib:.0f} MiB"
    assert seconds < 60
