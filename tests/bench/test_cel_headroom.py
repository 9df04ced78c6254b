"""bench.cel_headroom on a tiny prepared dataset: every variant measured, byte counts as CEL and the
full table lay them out, the spread over seeds and the recall ratio computed, the file written."""
import json
import pathlib

from bench import cel_headroom
from data_pipeline.synthetic import ensure_synthetic


def test_cel_headroom_quick_on_a_tiny_dataset(tmp_path):
    data = pathlib.Path(ensure_synthetic(tmp_path / "cache", users=150, items=100, interactions=4000,
                                         clusters=4, seed=0, label="rating"))
    records = cel_headroom.main(["--data", str(data), "--quick", "--results", str(tmp_path)])
    rating = {r["variant"]: r for r in records if r["part"] == "rating"}
    retrieval = {r["variant"]: r for r in records if r["part"] == "retrieval"}
    assert set(rating) == {v[0] for v in cel_headroom.RATING_VARIANTS}
    assert set(retrieval) == {v[0] for v in cel_headroom.RETRIEVAL_VARIANTS} | {"cel-4 (10x)"}
    assert retrieval["cel-4 (10x)"]["item_side_bytes"] <= retrieval["full"]["item_side_bytes"] / 10
    assert rating["full"]["item_side_bytes"] == 100 * 36 * 4
    assert rating["cel-50"]["item_side_bytes"] == 50 * 36 * 4 + 100 * 8
    assert rating["cel-50 d=128"]["item_side_bytes"] == 50 * 132 * 4 + 100 * 8
    for r in rating.values():
        assert r["seeds"] == 1 and r["best_val_rmse_std"] == 0.0
        assert 0.3 < r["best_val_rmse_mean"] < 3, r
        assert r["vs_target"] == round(r["best_val_rmse_mean"] - cel_headroom.SURPRISE_SVD_RMSE, 4)
    assert retrieval["cel-200"]["item_clusters"] == 200
    assert retrieval["full"]["vs_full_recall_at_20"] == 1.0
    for r in retrieval.values():
        assert 0 <= r["recall_at_20"] <= 1
    written = json.loads((tmp_path / "cel_headroom.json").read_text())
    assert len(written["records"]) == len(records)
    assert written["clusters_at_10x"] == (100 * 36 * 4 // 10 - 100 * 8) // 144
