"""Synthetic data: planted clusters, power-law popularity, chunked writing, the cache."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_pipeline.dataset import load_meta, load_planted, load_train_counts
from data_pipeline.errors import DataError
from data_pipeline.synthetic import ensure_synthetic, generate_synthetic


def test_chunked_generation_is_complete_and_deterministic(tmp_path):
    kw = dict(users=300, items=200, interactions=20_000, clusters=4, seed=5)
    meta = generate_synthetic(tmp_path / "a", chunk_rows=3_000, **kw)      # 7 chunks
    generate_synthetic(tmp_path / "b", chunk_rows=3_000, **kw)
    assert sum(meta.splits.values()) == 20_000
    assert 0.15 < meta.splits["val"] / 20_000 < 0.25
    a, b = pq.read_table(tmp_path / "a" / "train"), pq.read_table(tmp_path / "b" / "train")
    assert a.equals(b)
    ts = np.concatenate([pq.read_table(tmp_path / "a" / s).column("timestamp").to_numpy()
                         for s in ("train", "val")])
    assert np.array_equal(np.sort(ts), np.arange(20_000))
    labels = a.column("label").to_numpy()
    assert set(np.unique(labels)) == {1.0, 2.0, 3.0, 4.0, 5.0}
    counts = load_train_counts(tmp_path / "a", "items")
    assert np.array_equal(counts, np.bincount(a.column("item_id").to_numpy(), minlength=200))
    # power law: the top 10% of items take far more than 10% of the interactions
    top = np.sort(counts)[::-1]
    assert top[:20].sum() > 0.4 * top.sum()


def test_planted_clusters_drive_ratings(tmp_path):
    generate_synthetic(tmp_path / "s", users=400, items=300, interactions=40_000, clusters=3, seed=1)
    users, items = load_planted(tmp_path / "s", "users"), load_planted(tmp_path / "s", "items")
    assert set(users) == set(items) == {0, 1, 2}
    t = pq.read_table(tmp_path / "s" / "train")
    u, i, y = (t.column(c).to_numpy() for c in ("user_id", "item_id", "label"))
    pair = users[u] * 3 + items[i]
    means = np.bincount(pair, weights=y, minlength=9) / np.bincount(pair, minlength=9)
    assert means.max() - means.min() > 1.0, "cluster pairs must differ in mean rating"


def test_click_labels_and_cold_entities(tmp_path):
    meta = generate_synthetic(tmp_path / "c", users=5000, items=3000, interactions=10_000,
                              clusters=4, label="click")
    assert meta.label_kind == "click"
    y = pq.read_table(tmp_path / "c" / "train").column("label").to_numpy()
    assert set(np.unique(y)) == {0.0, 1.0} and 0.1 < y.mean() < 0.6
    assert (load_train_counts(tmp_path / "c", "items") == 0).mean() > 0.2    # many cold items


def test_ensure_synthetic_caches(tmp_path):
    kw = dict(users=100, items=80, interactions=3000, clusters=2, seed=0, label="rating")
    path = ensure_synthetic(tmp_path, **kw)
    stamp = (tmp_path / path / "meta.json").stat().st_mtime_ns
    assert ensure_synthetic(tmp_path, **kw) == path
    assert (tmp_path / path / "meta.json").stat().st_mtime_ns == stamp
    assert ensure_synthetic(tmp_path, **{**kw, "seed": 1}) != path
    assert load_meta(path).extra["synthetic"]["users"] == 100
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_parameters(tmp_path):
    with pytest.raises(DataError, match="users must be >= 1"):
        generate_synthetic(tmp_path / "x", users=0)
    with pytest.raises(DataError, match="unknown synthetic parameters"):
        generate_synthetic(tmp_path / "x", colors=3)


def test_progress_bar_on_stderr_only_for_long_work(tmp_path, capsys, monkeypatch):
    import data_pipeline.dataset as dataset
    generate_synthetic(tmp_path / "quick", users=50, items=40, interactions=1000, clusters=2)
    assert "synth" not in capsys.readouterr().err          # short work: no bar
    monkeypatch.setattr(dataset, "PROGRESS_DELAY_S", 0.0)  # as if the work took long
    generate_synthetic(tmp_path / "long", users=50, items=40, interactions=1000, clusters=2)
    captured = capsys.readouterr()
    assert "synth" in captured.err and "rows" in captured.err and captured.out == ""
